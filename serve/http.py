"""A small HTTP/1.1 server on stdlib asyncio: just what an OpenAI-style API needs.

Why not FastAPI/uvicorn or aiohttp: serve/ runs in two environments, the main ``.venv`` (tests
with a stand-in engine; no web framework installed) and ``.venv-vllm`` (vLLM brings
FastAPI/uvicorn/uvloop). One stdlib server behaves the same in both, adds no import time to a
cold boot, and keeps the process CRIU-friendly: uvloop's bundled libuv always creates an
io_uring, which CRIU cannot dump; asyncio's default loop uses epoll. The surface is small:
request line + headers + a Content-Length body in, a full body or a chunked stream out.

Contract:
* Requests: HTTP/1.0 or 1.1, ``Content-Length`` bodies up to ``max_body`` bytes (chunked
  request bodies are answered 411), headers up to ``MAX_HEADER_BYTES``. Keep-alive is the
  HTTP/1.1 default; ``Connection: close`` is honoured.
* A handler gets a :class:`Request` and returns a :class:`Response` (whole body) or a
  :class:`StreamResponse` (an async iterator of byte chunks, sent with chunked encoding).
* Client disconnects: the connection's reader signals the peer's close at once (no polling);
  ``Request.disconnected`` is then set, the handler task (or the stream's pending ``__anext__``) is
  cancelled and the stream iterator is closed, so the work behind it (a generation) is aborted.
* A handler exception becomes a 500 from ``on_error`` (the server keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable, Union

log = logging.getLogger("serve.http")

MAX_HEADER_BYTES = 64 << 10
DEFAULT_MAX_BODY = 16 << 20
HEADER_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 75.0


@dataclass
class Request:
    """One parsed HTTP request. ``headers`` keys are lower-case; ``body`` is the raw bytes."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes
    peer: str = ""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Response:
    """A whole response. ``headers`` must not include Content-Length (it is computed)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResponse:
    """A streamed response: ``chunks`` is consumed and written as it yields (chunked encoding).

    ``on_disconnect`` (optional) is called once if the client goes away before the stream ends.
    """

    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    on_disconnect: Callable[[], None] | None = None


Handler = Callable[[Request], Awaitable[Union[Response, StreamResponse]]]
ErrorHandler = Callable[[int, str], Response]


def _plain_error(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode(), content_type="text/plain; charset=utf-8")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    """Serve ``handler`` over HTTP/1.1 on a TCP socket.

    Args:
        handler: coroutine function Request -> Response | StreamResponse.
        on_error: builds the response for protocol errors (bad request line, body too large,
            unknown transfer encoding, handler crash): ``on_error(status, message)``.
        max_body: largest accepted request body in bytes (413 above it).
    """

    def __init__(self, handler: Handler, *, on_error: ErrorHandler = _plain_error,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self._handler = handler
        self._on_error = on_error
        self._max_body = max_body
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (port 0 resolves to the kernel's choice)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind (or adopt ``sock``) and start accepting; returns the bound (host, port).

        Raises:
            OSError: when the address cannot be bound (in use, bad host).
        """
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(_WatchedReader(MAX_HEADER_BYTES), self._connection)

        if sock is not None:
            self._server = await loop.create_server(protocol, sock=sock)
        else:
            self._server = await loop.create_server(protocol, host, port, reuse_address=True)
        return self.address

    async def close(self) -> None:
        """Stop accepting, then cancel open connections (in-flight streams end)."""
        if self._server is not None:
            self._server.close()
        for t in list(self._connections):
            t.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # -- one connection ----------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        try:
            first = True
            while True:
                try:
                    req = await self._read_request(reader, peer_s,
                                                   HEADER_TIMEOUT_S if first else IDLE_TIMEOUT_S)
                except _BadRequest as e:
                    await self._write_response(writer, self._on_error(e.status, str(e)), keep_alive=False)
                    break
                if req is None:
                    break
                first = False
                keep_alive = _wants_keep_alive(req)
                ok = await self._dispatch(req, writer, keep_alive)
                if not ok or not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, peer: str, timeout: float) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise _BadRequest(400, "incomplete request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, f"request head larger than {MAX_HEADER_BYTES} bytes") from None
        except (TimeoutError, asyncio.TimeoutError):
            return None
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(400, "malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"unsupported protocol {version!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, f"malformed header line {line[:80]!r}")
            key = name.lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "chunked request bodies are not supported: send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest(400, "Content-Length is not a number") from None
        if length < 0:
            raise _BadRequest(400, "Content-Length is negative")
        if length > self._max_body:
            raise _BadRequest(413, f"request body of {length} bytes is larger than the limit of {self._max_body}")
        body = await asyncio.wait_for(reader.readexactly(length), HEADER_TIMEOUT_S) if length else b""
        path, _, query = target.partition("?")
        closed = reader.closed if isinstance(reader, _WatchedReader) else asyncio.Event()
        return Request(method=method.upper(), path=path, query=query, version=version,
                       headers=headers, body=body, peer=peer, disconnected=closed)

    async def _dispatch(self, req: Request, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
        """Run the handler racing the client's disconnect; write its response.

        Returns False when the connection must be dropped (the client left, or a stream broke).
        """
        handler_task = asyncio.ensure_future(self._handler(req))
        gone = asyncio.ensure_future(req.disconnected.wait())
        try:
            await asyncio.wait({handler_task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not handler_task.done():  # the client left before the response was ready
            handler_task.cancel()
            with contextlib.suppress(BaseException):
                await handler_task
            return False
        try:
            resp = handler_task.result()
        except Exception as e:  # noqa: BLE001 - a crashed handler must not take the server down
            log.exception("handler failed for %s %s", req.method, req.path)
            resp = self._on_error(500, f"internal error: {type(e).__name__}: {e}")
        if isinstance(resp, StreamResponse):
            return await self._write_stream(writer, req, resp, keep_alive)
        await self._write_response(writer, resp, keep_alive)
        return True

    async def _write_response(self, writer: asyncio.StreamWriter, resp: Response, keep_alive: bool) -> None:
        head = _status_line(resp.status) + _header_lines({
            "Content-Type": resp.content_type, "Content-Length": str(len(resp.body)),
            "Connection": "keep-alive" if keep_alive else "close", **resp.headers})
        writer.write(head + resp.body)
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, req: Request, resp: StreamResponse,
                            keep_alive: bool) -> bool:
        head = _status_line(resp.status) + _header_lines({
            "Content-Type": resp.content_type, "Transfer-Encoding": "chunked", "Cache-Control": "no-cache",
            "Connection": "keep-alive" if keep_alive else "close", **resp.headers})
        it = resp.chunks
        completed = False
        try:
            writer.write(head)
            await writer.drain()
            gone = asyncio.ensure_future(req.disconnected.wait())
            try:
                while True:
                    nxt = asyncio.ensure_future(it.__anext__())
                    await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        nxt.cancel()
                        with contextlib.suppress(BaseException):
                            await nxt
                        break
                    try:
                        chunk = nxt.result()
                    except StopAsyncIteration:
                        completed = True
                        break
                    if chunk:
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await writer.drain()
            finally:
                gone.cancel()
            if completed:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, RuntimeError):
            completed = False
        finally:
            if not completed:
                req.disconnected.set()
                if resp.on_disconnect is not None:
                    with contextlib.suppress(Exception):
                        resp.on_disconnect()
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
        return completed


class _WatchedReader(asyncio.StreamReader):
    """A StreamReader that also signals, through ``closed``, the moment the peer closes."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.closed = asyncio.Event()

    def feed_eof(self) -> None:
        super().feed_eof()
        self.closed.set()

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        self.closed.set()


def _wants_keep_alive(req: Request) -> bool:
    conn = req.headers.get("connection", "").lower()
    if req.version == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def _header_lines(headers: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") + b"\r\n"
