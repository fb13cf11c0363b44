"""A small threaded HTTP/1.1 server for GET and HEAD of immutable bytes.

Contract: one thread per client connection (clients keep a few pooled keep-alive connections
each, so connections, not requests, set the thread count), requests parsed with hard bounds
(a 16 KiB head, 100 header lines), pipelined requests answered in order, bodies sent with
``sendall`` of a memoryview (no copy of a cached object). Requests with a body are refused
(this server only reads): ``Content-Length`` other than 0 or any ``Transfer-Encoding`` gets a
400 and the connection is closed.

Why not ``http.server`` (measured with ``benchmarks/bench_tier_table.py --http-stacks``, numbers
in ``docs/benchmarks.md``): it serves 4 MiB bodies about as fast (both >= 3.5 GiB/s on two
idle cores; the kernel's copy dominates), but by default it answers small requests behind
Nagle's algorithm (~23 requests/s per keep-alive connection), and with TCP_NODELAY it spent
15-25% more server CPU per small request; this server also keeps its limits explicit (head
size, header count, no bodies, a connection cap answered with 503, idle timeouts).
Why not asyncio: a cache miss blocks on the blob store; threads keep that path plain, and the
GIL is released during ``sendall``/``recv`` of large bodies.

Slow clients (slowloris; issue 17 measured 1,030 connections sending one byte every 50 s hold
every slot past a per-recv idle timeout, /health refused for minutes): a request head must
arrive whole within ``header_timeout`` seconds of its first byte, and a new connection must
send its first byte within that time too (the deadline does not move with each byte); one
client address holds at most ``max_per_client`` connections; and when every slot is taken a
new connection takes the slot of the connection idle longest between requests (or silent since
it connected), else of the request head that has been arriving longest (a well-behaved client
sends its head in one packet: microseconds), so a new client (and /health) always gets in
unless every connection is busy with a request.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

log = logging.getLogger("casfs.cacheserver")

MAX_HEAD = 16 << 10
MAX_HEADERS = 100
SMALL_BODY = 64 << 10  # bodies up to this size go out in the same send as the head

REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


class BadRequest(Exception):
    """A request this server will not parse; ``status`` is the reply, the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    """A parsed request head. Header names are lower case; repeated headers are joined by ','."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


@dataclass(slots=True)
class Response:
    """What a handler returns. ``body`` may be a memoryview of a cached object (not copied)."""

    status: int
    body: bytes | memoryview = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    length: int | None = None  # Content-Length of a HEAD reply that carries no body


Handler = Callable[[Request], Response]


def parse_head(head: bytes) -> Request:
    """Parse a request head (without the final blank line).

    Raises:
        BadRequest: for a malformed request line or header, or too many headers.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes everything; kept for clarity
        raise BadRequest(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505, f"unsupported protocol {version[:20]!r}")
    if not method.isalpha() or not target.startswith("/"):
        raise BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    path, _, query = target.partition("?")
    return Request(method, target, unquote(path), query, version, headers)


class _Conn:
    """What the accept thread knows of one connection: its client, and what it is doing
    (``new``: no byte yet; ``idle``: waiting for the next request's first byte; ``head``: a
    head arriving; ``busy``: a request being handled or answered) since when."""

    __slots__ = ("sock", "client", "state", "since")

    def __init__(self, sock: socket.socket, client: str) -> None:
        self.sock, self.client = sock, client
        self.state, self.since = "new", time.monotonic()


class HttpServer:
    """Serve ``handler`` on ``host:port`` (port 0 picks a free one) until ``close()``.

    Args:
        handler: maps a Request to a Response; an exception becomes a 500 (logged).
        max_connections: open connections; beyond it a new one takes an idle or slow
            connection's slot, or is answered 503 (see the module doc).
        idle_timeout: seconds a keep-alive connection may sit idle between requests.
        header_timeout: seconds from a request's first byte (or a new connection's start) to
            the end of its head, whatever arrives meanwhile; then 408 and close.
        max_per_client: open connections from one client address; beyond it 503.
        send_timeout: seconds a send may block on a client that stopped reading.
        on_drop: called with "refused", "evicted" or "header_timeout" for each connection
            closed to keep slots free (for metrics).

    Raises:
        OSError: when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, handler: Handler, *, max_connections: int = 1024,
                 idle_timeout: float = 120.0, header_timeout: float = 10.0, max_per_client: int = 256,
                 send_timeout: float = 60.0, backlog: int = 512,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.handler = handler
        self._on_drop = on_drop or (lambda why: None)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        self.send_timeout = send_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=backlog)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._conns: dict[socket.socket, _Conn] = {}
        self._per_client: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "HttpServer":
        """Accept connections on a background thread; returns self."""
        self._accept_thread = threading.Thread(target=self._accept, name="casfs-http-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections on this thread until ``close()``."""
        self._accept()

    def close(self) -> None:
        """Stop accepting, cut every open connection, return when the accept loop ended."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(5)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- internals ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = addr[0] if isinstance(addr, tuple) else str(addr)
            victim = None
            why = ""
            with self._lock:
                if self._per_client.get(client, 0) >= self.max_per_client:
                    why = f"too many connections from {client} (at most {self.max_per_client})"
                elif len(self._conns) >= self.max_connections:
                    victim = self._pick_victim()
                    if victim is None:
                        why = "server busy"
                    else:
                        self._forget(victim)
                if not why:
                    conn = _Conn(sock, client)
                    self._conns[sock] = conn
                    self._per_client[client] = self._per_client.get(client, 0) + 1
            if victim is not None:
                self._on_drop("evicted")
                with contextlib.suppress(OSError):
                    victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and ends
            if why:
                self._on_drop("refused")
                self._refuse(sock, why)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="casfs-http-conn", daemon=True).start()

    def _pick_victim(self) -> _Conn | None:
        """The connection to close for a new one (lock held): the one idle longest (between
        requests, or since it connected), else the head that has been arriving longest; None
        when every connection is busy with a request."""
        idle = [c for c in self._conns.values() if c.state in ("idle", "new")]
        if idle:
            return min(idle, key=lambda c: c.since)
        heads = [c for c in self._conns.values() if c.state == "head"]
        return min(heads, key=lambda c: c.since) if heads else None

    def _forget(self, conn: _Conn) -> None:
        """Drop ``conn`` from the books (lock held); a second call is a no-op."""
        if self._conns.pop(conn.sock, None) is not None:
            n = self._per_client.get(conn.client, 1) - 1
            if n > 0:
                self._per_client[conn.client] = n
            else:
                self._per_client.pop(conn.client, None)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        body = f"{why}\n".encode()
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(_head(503, [("Retry-After", "1"), ("Content-Type", "text/plain")], len(body),
                               close=True) + body)
        with contextlib.suppress(OSError):
            sock.close()

    def _read_head(self, conn: _Conn, buf: bytearray) -> bytes | None:
        """The next request head from ``conn`` (None when the client closed). Waits up to
        ``idle_timeout`` for the first byte of a keep-alive request (``header_timeout`` for a
        new connection's first), then ``header_timeout`` in all for the rest of the head."""
        sock = conn.sock
        first = conn.state == "new"
        wait = self.header_timeout if first else self.idle_timeout
        deadline = None
        if buf:  # pipelined bytes already here: the head has begun
            deadline = time.monotonic() + self.header_timeout
            self._set_state(conn, "head")
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise BadRequest(431, f"request head over {MAX_HEAD} bytes")
            if deadline is None:
                sock.settimeout(wait)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._on_drop("header_timeout")
                    raise BadRequest(408, f"request head not complete within {self.header_timeout:g} s")
                sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if deadline is None:
                    return None  # idle too long between requests: close quietly
                self._on_drop("header_timeout")
                raise BadRequest(408, f"request head not complete within {self.header_timeout:g} s") from None
            if not data:
                return None
            if deadline is None:
                deadline = time.monotonic() + self.header_timeout
                self._set_state(conn, "head")
            buf += data
            end = buf.find(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise BadRequest(431, f"request head over {MAX_HEAD} bytes")
        head = bytes(buf[:end])
        del buf[:end + 4]
        return head

    def _set_state(self, conn: _Conn, state: str) -> None:
        conn.state, conn.since = state, time.monotonic()

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        buf = bytearray()
        try:
            while not self._stopping.is_set():
                head = self._read_head(conn, buf)
                if head is None:
                    return
                self._set_state(conn, "busy")
                req = parse_head(head)
                if req.headers.get("content-length", "0") not in ("0", "") or "transfer-encoding" in req.headers:
                    raise BadRequest(400, "this server takes no request bodies")
                try:
                    resp = self.handler(req)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the connection silently
                    log.exception("handler failed for %s %s", req.method, req.target[:200])
                    resp = Response(500, b"internal error\n", [("Content-Type", "text/plain")], close=True)
                close = resp.close or not req.keep_alive
                sock.settimeout(self.send_timeout)
                self._send(sock, resp, req.method == "HEAD", close)
                if close:
                    return
                self._set_state(conn, "idle")
        except BadRequest as e:
            with contextlib.suppress(OSError):
                body = f"{e}\n".encode()
                sock.settimeout(1.0)
                sock.sendall(_head(e.status, [("Content-Type", "text/plain")], len(body), close=True) + body)
        except OSError:
            pass  # the client went away or stalled past a timeout
        finally:
            with self._lock:
                self._forget(conn)
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _send(sock: socket.socket, resp: Response, head_only: bool, close: bool) -> None:
        body = resp.body
        length = resp.length if resp.length is not None and not body else len(body)
        head = _head(resp.status, resp.headers, length, close=close)
        if head_only or not body:
            sock.sendall(head)
        elif len(body) <= SMALL_BODY:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)


def _head(status: int, headers: list[tuple[str, str]], length: int, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
