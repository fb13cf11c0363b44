"""A hostile HTTP server on 127.0.0.1 that lies about its bodies: a real socket server (stdlib
``http.server``), for the tests that prove casfs's HTTP clients bound what they read.

``LyingServer(mode)`` answers every GET (any path) with a body that never ends:

- ``"declares"``: a ``Content-Length`` of 1 TiB, then bytes until the client hangs up;
- ``"chunked"``: chunked framing, 64 KiB chunks, no last chunk;
- ``"unframed"``: no framing at all (``Connection: close``), bytes until the client hangs up.

``status`` (default 200) is the status sent; with ``ranges=True`` a request with
``Range: bytes=a-b`` gets a 206 with an honest ``Content-Range`` but the same endless body (a
server that sends more than the range it names). HEAD gets the headers only. Body byte ``i``
is ``i % 251`` (``pattern(offset, n)``), so a client that reads a prefix can be checked.
A response stops after ``max_send`` bytes (so a client without bounds fails a test instead of
reading forever); ``sent`` counts the body bytes written, ``requests`` the requests answered.
"""

from __future__ import annotations

import http.server
import re
import threading

_PERIOD = 251
_BLOCK = bytes(i % _PERIOD for i in range(_PERIOD * 261))  # 65511 bytes, a whole number of periods


def pattern(offset: int, n: int) -> bytes:
    """Bytes ``offset`` .. ``offset + n`` of every lying body."""
    return bytes((offset + i) % _PERIOD for i in range(n))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        srv: LyingServer = self.server.owner  # type: ignore[attr-defined]
        with srv.lock:
            srv.requests += 1
        status = srv.status
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if srv.ranges and m and status == 200:
            status = 206
        self.send_response(status)
        if status == 206 and m:
            self.send_header("Content-Range", f"bytes {m.group(1)}-{m.group(2)}/{1 << 40}")
        self.send_header("Content-Type", "application/octet-stream")
        if srv.mode == "declares":
            self.send_header("Content-Length", str(1 << 40))
        elif srv.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        sent = 0
        try:
            while sent < srv.max_send:
                block = _BLOCK
                if srv.mode == "chunked":
                    block = b"%x\r\n" % len(_BLOCK) + _BLOCK + b"\r\n"
                self.wfile.write(block)
                sent += len(_BLOCK)
                with srv.lock:
                    srv.sent += len(_BLOCK)
        except OSError:  # the client hung up: what a bounded client does
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class LyingServer:
    """See the module doc. A context manager; ``url`` is ``http://127.0.0.1:PORT/``."""

    def __init__(self, mode: str = "declares", *, status: int = 200, ranges: bool = False,
                 max_send: int = 256 << 20) -> None:
        if mode not in ("declares", "chunked", "unframed"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.status = status
        self.ranges = ranges
        self.max_send = max_send
        self.sent = 0
        self.requests = 0
        self.lock = threading.Lock()
        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._srv.daemon_threads = True
        self._srv.owner = self  # type: ignore[attr-defined]
        self.port = self._srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    def __enter__(self) -> "LyingServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._srv.shutdown()
        self._srv.server_close()
