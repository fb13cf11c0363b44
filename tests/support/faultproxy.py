"""A threaded TCP relay that injects faults on demand (latency, bandwidth caps, cuts, canned
HTTP errors, hangs) between a client and a real server on 127.0.0.1. See ``FaultProxy``."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

__all__ = ["DOWN", "UP", "FaultProxy"]

UP = "up"      # client -> target
DOWN = "down"  # target -> client
_RECV = 64 << 10
_QUEUE_CHUNKS = 256  # per direction and connection: at most 16 MiB in flight (backpressure)
_STATUS_TEXT = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                504: "Gateway Timeout", 429: "Too Many Requests"}


class _RateLimit:
    """A token bucket shared by every connection of one direction (bytes per second)."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time at which the link is free again

    def wait(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            delay = self._next - now
        if delay > 0:
            stop.wait(delay)


class _Conn:
    """One proxied connection: a reader and a writer thread per direction."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, target: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.target = target
        self.closed = threading.Event()
        self.drop_left: dict[str, int | None] = {UP: None, DOWN: None}
        self._done = 0
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        qs = {UP: queue.Queue(_QUEUE_CHUNKS), DOWN: queue.Queue(_QUEUE_CHUNKS)}
        reader_up = self._read_http if self.proxy.http else self._read_raw
        specs = [(reader_up, (self.client, qs[UP])), (self._read_raw, (self.target, qs[DOWN])),
                 (self._write, (UP, self.target, qs[UP])), (self._write, (DOWN, self.client, qs[DOWN]))]
        for fn, args in specs:
            t = threading.Thread(target=fn, args=args, daemon=True, name="faultproxy")
            self.threads.append(t)
            t.start()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.proxy._forget(self)

    def _half_done(self) -> None:
        with self._lock:
            self._done += 1
            both = self._done == 2
        if both:
            self.close()

    def _enqueue(self, direction: str, q: queue.Queue, data: bytes | None) -> None:
        item = (time.monotonic() + self.proxy.latency[direction], data)
        while not self.closed.is_set():
            try:
                q.put(item, timeout=0.1)  # blocks while the writer is behind: backpressure
                return
            except queue.Full:
                continue

    def _read_raw(self, src: socket.socket, q: queue.Queue) -> None:
        direction = UP if src is self.client else DOWN
        try:
            while True:
                data = src.recv(_RECV)
                if not data:
                    break
                self._enqueue(direction, q, data)
        except OSError:
            pass
        self._enqueue(direction, q, None)

    def _read_http(self, src: socket.socket, q: queue.Queue) -> None:
        """Client -> target, request by request, so that a canned error can replace one."""
        buf = bytearray()

        def fill() -> bool:
            data = src.recv(_RECV)
            if not data:
                return False
            buf.extend(data)
            return True

        def forward(n: int) -> bool:  # forward exactly n bytes of body
            while n > 0:
                if not buf and not fill():
                    return False
                take = min(n, len(buf))
                self._enqueue(UP, q, bytes(buf[:take]))
                del buf[:take]
                n -= take
            return True

        def line() -> bytes | None:
            while b"\r\n" not in buf:
                if len(buf) > 65536 or not fill():
                    return None
            i = buf.index(b"\r\n") + 2
            out = bytes(buf[:i])
            del buf[:i]
            return out

        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    if len(buf) > 65536 or not fill():
                        raise EOFError
                end = buf.index(b"\r\n\r\n") + 4
                head = bytes(buf[:end])
                del buf[:end]
                status = self.proxy._take_failure()
                if status is not None:
                    self._reply_error(status, head)
                    return
                self._enqueue(UP, q, head)
                headers = {}
                for raw in head.split(b"\r\n")[1:]:
                    k, _, v = raw.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    while True:
                        size_line = line()
                        if size_line is None:
                            raise EOFError
                        self._enqueue(UP, q, size_line)
                        size = int(size_line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, up to the empty line
                                t = line()
                                if t is None:
                                    raise EOFError
                                self._enqueue(UP, q, t)
                                if t == b"\r\n":
                                    break
                            break
                        if not forward(size + 2):
                            raise EOFError
                else:
                    if not forward(int(headers.get(b"content-length", b"0") or 0)):
                        raise EOFError
        except (OSError, EOFError, ValueError):
            pass
        if buf:
            self._enqueue(UP, q, bytes(buf))
        self._enqueue(UP, q, None)

    def _reply_error(self, status: int, request_head: bytes) -> None:
        text = _STATUS_TEXT.get(status, "Error")
        body = f"{status} {text} (injected by FaultProxy)\n".encode()
        resp = (f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        if request_head.startswith(b"HEAD "):
            resp = resp[:resp.index(b"\r\n\r\n") + 4]
        delay = self.proxy.latency[DOWN] + self.proxy.latency[UP]
        if delay:
            self.proxy._stop.wait(delay)
        with contextlib.suppress(OSError):
            self.client.sendall(resp)
        self.close()

    def _write(self, direction: str, dst: socket.socket, q: queue.Queue) -> None:
        p = self.proxy
        try:
            while True:
                try:
                    due, data = q.get(timeout=0.1)
                except queue.Empty:
                    if self.closed.is_set():
                        return
                    continue
                if data is None:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                wait = due - time.monotonic()
                if wait > 0 and p._stop.wait(wait):
                    break
                while not p._flowing.is_set():  # hung: hold the bytes until released
                    if p._stop.wait(0.05) or self.closed.is_set():
                        return
                p._rate[direction].wait(len(data), p._stop)
                if self.drop_left[direction] is None:
                    self.drop_left[direction] = p._claim_drop(direction)
                left = self.drop_left[direction]
                if left is not None and len(data) >= left:
                    with contextlib.suppress(OSError):
                        dst.sendall(data[:left])
                    p._count("drops")
                    self.close()
                    return
                dst.sendall(data)
                if left is not None:
                    self.drop_left[direction] = left - len(data)
                p._count(f"bytes_{direction}", len(data))
        except OSError:
            self.close()
            return
        self._half_done()


class FaultProxy:
    """A TCP relay ``127.0.0.1:self.port -> target_host:target_port`` that injects faults.

    Start it with ``with FaultProxy(port) as proxy:`` (or ``start()``/``close()``) and point the
    client at ``proxy.url`` / ``proxy.port``. Faults are armed and cleared while it runs, from
    any thread; every method is thread-safe. Each proxied connection uses four threads (a reader
    and a writer per direction), so latency delays bytes without limiting throughput: the
    emulated link is a pipe of length ``latency``, not a stop-and-wait relay. Caveat: the relay
    models no TCP window, so one connection is not window-limited at high latency as a real
    long-distance TCP connection would be (up to 16 MiB per direction and connection is in
    flight); cap bandwidth with ``set_rate`` and state the settings with every number.

    Faults (``UP`` = client -> target, ``DOWN`` = target -> client):

    - ``set_latency(up=s, down=s, connect=s)``: every byte forwarded in a direction is delayed
      by that many seconds (a round trip gains ``up + down``); ``connect`` delays each new
      connection before it reaches the target (a TCP handshake's round trip).
    - ``set_rate(up=B/s, down=B/s)``: a bandwidth cap per direction shared by all connections
      (0 = unlimited).
    - ``drop_after(nbytes, direction=DOWN, count=1)``: the next ``count`` connections that
      forward data in ``direction`` are cut (both sockets closed) after ``nbytes`` more bytes.
      Counted in ``stats["drops"]``.
    - ``fail_next(n, status=503)`` (HTTP targets, ``http=True``): the next ``n`` HTTP requests
      are answered by the proxy with ``status`` and ``Connection: close`` instead of reaching
      the target. The proxy tracks request boundaries on keep-alive connections (Content-Length
      and chunked bodies), so connections opened before arming are affected too. Counted in
      ``stats["failed"]``.
    - ``hang()``: nothing is forwarded in either direction (new connections are accepted and
      held) until ``release()``; clients see timeouts.
    - ``reset()``: clear every fault and restore zero latency / unlimited rate.

    ``stats`` counts ``connections``, ``failed``, ``drops``, ``bytes_up``, ``bytes_down``.
    ``close_connections()`` cuts every open connection (a target restart, seen from a client).

    Args:
        target_port: the port of the server to relay to.
        target_host: its host (default 127.0.0.1).
        http: parse client requests (needed for ``fail_next``; turn off for non-HTTP targets).
        port: the listening port (0: any free port).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, http: bool = True,
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.http = http
        self.latency = {UP: 0.0, DOWN: 0.0}
        self.connect_latency = 0.0
        self._rate = {UP: _RateLimit(), DOWN: _RateLimit()}
        self._lock = threading.Lock()
        self._fail: list[int] = []  # statuses still to be injected, in order
        self._drops = {UP: [], DOWN: []}  # nbytes per armed drop
        self._flowing = threading.Event()
        self._flowing.set()
        self._stop = threading.Event()
        self._conns: set[_Conn] = set()
        self.stats = {"connections": 0, "failed": 0, "drops": 0, "bytes_up": 0, "bytes_down": 0}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._accept_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._listener.listen(128)
        self._accept_thread = threading.Thread(target=self._accept, daemon=True, name="faultproxy-accept")
        self._accept_thread.start()
        return self

    def close(self) -> None:
        """Stop listening, cut every connection and join the threads."""
        self._stop.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._accept_thread:
            self._accept_thread.join(5)
        self.close_connections()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        for c in conns:
            for t in c.threads:
                t.join(5)

    # -- faults ----------------------------------------------------------------------------

    def set_latency(self, up: float = 0.0, down: float = 0.0, connect: float = 0.0) -> None:
        """Seconds added to every byte in each direction, and to each new connection."""
        self.latency = {UP: float(up), DOWN: float(down)}
        self.connect_latency = float(connect)

    def set_rate(self, up: float = 0.0, down: float = 0.0) -> None:
        """Bandwidth caps in bytes per second (0 = unlimited)."""
        self._rate[UP].rate = float(up)
        self._rate[DOWN].rate = float(down)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` HTTP requests with ``status`` (needs ``http=True``)."""
        if not self.http:
            raise ValueError("fail_next needs an HTTP proxy (http=True)")
        with self._lock:
            self._fail.extend([int(status)] * n)

    def drop_after(self, nbytes: int, direction: str = DOWN, count: int = 1) -> None:
        """Cut the next ``count`` connections that send in ``direction`` after ``nbytes`` more bytes."""
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}")
        with self._lock:
            self._drops[direction].extend([int(nbytes)] * count)

    def hang(self) -> None:
        """Stop forwarding anything (connections stay open) until ``release()``."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def reset(self) -> None:
        """Clear every armed fault; zero latency; no rate cap; not hung."""
        with self._lock:
            self._fail.clear()
            self._drops = {UP: [], DOWN: []}
        self.set_latency()
        self.set_rate()
        self.release()

    @property
    def pending_failures(self) -> int:
        with self._lock:
            return len(self._fail)

    # -- internals -------------------------------------------------------------------------

    def _take_failure(self) -> int | None:
        with self._lock:
            if not self._fail:
                return None
            self.stats["failed"] += 1
            return self._fail.pop(0)

    def _claim_drop(self, direction: str) -> int | None:
        with self._lock:
            return self._drops[direction].pop(0) if self._drops[direction] else None

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True, name="faultproxy-open").start()

    def _open(self, client: socket.socket) -> None:
        if self.connect_latency and self._stop.wait(self.connect_latency):
            client.close()
            return
        try:
            target = socket.create_connection(self.target, timeout=10)
            target.settimeout(None)
        except OSError:
            client.close()  # the client sees a refused/closed connection, like a dead target
            return
        for s in (client, target):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(self, client, target)
        with self._lock:
            if self._stop.is_set():
                conn.closed.set()
                client.close()
                target.close()
                return
            self._conns.add(conn)
            self.stats["connections"] += 1
        conn.start()
