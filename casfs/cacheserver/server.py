"""CacheServer: an HTTP chunk server over one blob store (the AZ cache tier's server side)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from ..errors import StoreError
from ..objects.base import ObjectStore
from .app import CacheApp
from .http import HttpServer
from .metrics import Metrics
from .objects import ObjectCache

log = logging.getLogger("casfs.cacheserver")

TOKEN_ENV = "CASFS_CACHE_TOKEN"


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) only listens on the loopback interface."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


class CacheServer:
    """Serve the immutable objects of ``objects`` over HTTP from memory + ssd caches.

    Args:
        objects: the blob store to fill from.
        host, port: where to listen (port 0: any free port; see ``url``).
        memory_bytes, cache_dir, cache_bytes: the cache tiers (see ``ObjectCache``).
        token: bearer token clients must send; required when ``host`` is not loopback.
            Default: ``$CASFS_CACHE_TOKEN``.
        fsync: fsync ssd cache files.
        max_connections, max_per_client, header_timeout: connection limits (see
            ``casfs.cacheserver.http.HttpServer``: slow clients cannot hold the slots).

    Raises:
        StoreError: when listening off loopback without a token.
        OSError: when the address cannot be bound.

    Use ``start()`` (background threads) or ``serve_forever()``; ``close()`` stops it.
    """

    def __init__(self, objects: ObjectStore, host: str = "127.0.0.1", port: int = 0, *,
                 memory_bytes: int = 1 << 30, cache_dir: str | None = None,
                 cache_bytes: int = 50 << 30, token: str | None = None, fsync: bool = True,
                 max_connections: int = 1024, max_per_client: int = 256,
                 header_timeout: float = 10.0) -> None:
        token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        if not token and not is_loopback(host):
            raise StoreError(f"refusing to serve on {host} without a token: chunks would be open to "
                             f"the network; pass --token (or set ${TOKEN_ENV}), or listen on 127.0.0.1")
        self.metrics = Metrics()
        self.cache = ObjectCache(objects, memory_bytes=memory_bytes, cache_dir=cache_dir,
                                 cache_bytes=cache_bytes, metrics=self.metrics, fsync=fsync)
        self.app = CacheApp(self.cache, token=token, metrics=self.metrics)
        self.http = HttpServer(host, port, self.app, max_connections=max_connections,
                               max_per_client=max_per_client, header_timeout=header_timeout,
                               on_drop=lambda why: self.metrics.inc("casfs_cache_connections_dropped_total",
                                                                     reason=why))
        self.app.server = self.http
        self.objects = objects

    @property
    def url(self) -> str:
        """``http://host:port/``: what the ``azcache`` tier is given."""
        return self.http.url

    @property
    def port(self) -> int:
        return self.http.port

    def start(self) -> "CacheServer":
        self.http.start()
        return self

    def serve_forever(self) -> None:
        self.http.serve_forever()

    def close(self) -> None:
        self.http.close()
        self.cache.close()

    def __enter__(self) -> "CacheServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
