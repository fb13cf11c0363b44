"""The front door of a warm pool (``casfs serve MODEL --park N``): one address for a pool of
parked replicas, unparking one on demand and parking it again when idle (issue 12).

Requests to the OpenAI routes (everything but the front door's own) are forwarded to an active
replica; when none is active, one is unparked first (``WarmPool.acquire``: free GPU memory
reserved, driver resume, weights back) and the request waits for it. A replica idle for
``idle_s`` seconds with nothing in flight is parked again. Streams are relayed chunk by chunk.

Own routes: ``GET /health`` (200 while the pool has a replica), ``GET /pool`` (each replica's
pid, address and state, the park/unpark reports), ``GET /metrics`` (serve.pool's metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from casfs import parse_listen

from .http import HttpServer, Request, Response, StreamResponse
from .pool import NoCapacity, WarmPool

__all__ = ["FrontDoor"]

log = logging.getLogger("serve.front")

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FrontDoor:
    """See the module docstring. ``pool``: a WarmPool whose replicas are parked or serving."""

    def __init__(self, pool: WarmPool, idle_s: float = 60.0) -> None:
        self.pool = pool
        self.idle_s = idle_s
        self.server = HttpServer(self._handle)
        self._active: Any = None  # the ParkedReplica serving now
        self._in_flight = 0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()
        self._idle_task: asyncio.Task | None = None

    async def start(self, listen: str) -> tuple[str, int]:
        host, port = parse_listen(listen)
        await self.server.start(host, port)
        self._idle_task = asyncio.create_task(self._park_when_idle())
        return self.server.address

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
        await self.server.close()

    async def _park_when_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_s / 4))
            async with self._lock:
                p = self._active
                if p is None or self._in_flight or time.monotonic() - self._last < self.idle_s:
                    continue
                try:
                    await asyncio.to_thread(self.pool.release, p)
                    self._active = None
                except Exception as e:  # noqa: BLE001 - stays active; logged
                    log.warning("parking idle replica pid %d failed: %s", p.replica.pid, e)

    async def _replica(self) -> Any:
        async with self._lock:
            if self._active is None:
                self._active, _ = await asyncio.to_thread(self.pool.acquire, probe=False)
            self._in_flight += 1
            return self._active

    async def _handle(self, req: Request) -> Response | StreamResponse:
        if req.path == "/health":
            ok = bool(self.pool.replicas)
            return Response(200 if ok else 503, json.dumps({"replicas": len(self.pool.replicas)}).encode())
        if req.path == "/metrics":
            return Response(200, self.pool.render_metrics().encode(), content_type="text/plain; version=0.0.4")
        if req.path == "/pool":
            state = [{"pid": p.replica.pid, "listen": p.replica.listen, "parked": p.parked} for p in self.pool.replicas]
            return Response(200, json.dumps({"replicas": state, "events": self.pool.events[-20:],
                                             "failed": self.pool.failed}, default=str).encode())
        try:
            p = await self._replica()
        except NoCapacity as e:
            return Response(503, json.dumps({"error": {"message": str(e), "type": "no_capacity"}}).encode())
        except Exception as e:  # noqa: BLE001 - BootError: no replica could be unparked
            return Response(503, json.dumps({"error": {"message": str(e), "type": "unavailable"}}).encode())
        try:
            return await self._forward(p.replica.listen, req)
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        self._in_flight -= 1
        self._last = time.monotonic()

    async def _forward(self, listen: str, req: Request) -> Response | StreamResponse:
        host, port = parse_listen(listen)
        reader, writer = await asyncio.open_connection(host, port)
        head = [f"{req.method} {req.path}{'?' + req.query if req.query else ''} HTTP/1.1", f"Host: {listen}",
                "Connection: close", f"Content-Length: {len(req.body)}"]
        head += [f"{k}: {v}" for k, v in req.headers.items() if k not in HOP_HEADERS]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + req.body)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        ctype = headers.get("content-type", "application/json")
        extra = {k: v for k, v in headers.items() if k not in HOP_HEADERS and k != "content-type"}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return StreamResponse(status, self._relay(reader, writer), content_type=ctype, headers=extra,
                                  on_disconnect=writer.close)
        n = headers.get("content-length")
        body = await (reader.readexactly(int(n)) if n is not None else reader.read())
        writer.close()
        self._done()
        return Response(status, body, content_type=ctype, headers=extra)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[bytes]:
        try:
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size)
                await reader.readline()
                yield data
        finally:
            writer.close()
            self._done()
