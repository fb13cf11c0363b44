"""Listen addresses: ``HOST:PORT`` as the cache server and serve's replicas take them."""

from __future__ import annotations

__all__ = ["parse_listen"]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; PORT 0 picks a free one) -> (host, port).

    Raises:
        ValueError: naming the accepted form.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: use HOST:PORT (port 0-65535), e.g. 127.0.0.1:8470 "
                         "or 0.0.0.0:8470")
    return host.strip("[]"), int(port)
