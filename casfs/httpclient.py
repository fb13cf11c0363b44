"""The HTTP client pieces casfs's remote readers share: a keep-alive pool, one request on it,
Content-Range parsing, and the retry backoff.

Used by the HTTP object store (``casfs.objects.http``: retries with backoff), the cache-server
client tier (``casfs.tiers.azcache``: no retries, it fails over to the next node) and the S3
store (``casfs.objects.s3``: Content-Range and the backoff of its cut-body retries; botocore
owns its connections). Standard library only (``http.client``).

Rules written once here:

- a pooled connection is used by one thread at a time; a response that says it will close
  its connection, or a pool already holding ``maxsize`` idle ones, closes it;
- a *reused* connection that fails before any answer arrived was most likely closed by the
  server while idle (keep-alive timeout): the request is sent once more at once, on a fresh
  connection, without counting as a retry. A timeout, a body cut short or an unframed answer
  is not that case (the server did answer, or is slow): those go to the caller;
- a 2xx answer to a GET that has neither Content-Length nor chunked framing may have been cut
  inside its headers (http.client then reads "to the end" and sees a complete empty body):
  with ``framed=True`` it is an error (``Unframed``), not data;
- backoff: full jitter, ``base * 2**(retry-1)`` capped at ``cap``, and at least a short
  ``Retry-After`` (whole seconds, capped too);
- every body read is bounded by what the caller expects, so a hostile or broken server (a
  cache node, a CDN, a registry) cannot make a client allocate without bound: a 2xx body
  longer than ``limit`` (declared in Content-Length, or streamed chunked or to the close) is
  refused with ``TooLarge`` before or while it is read, never buffered whole. A request with
  ``Range: bytes=a-b`` bounds itself: a 206 body may hold at most ``b-a+1`` bytes, and a 200
  (the server ignored the range and sends the whole object) is read only up to byte ``b``
  (the caller slices it) and its connection closed. Other answers (errors, redirects) keep at
  most ``ERROR_BODY_LIMIT`` bytes of their body (enough for any error document).
"""

from __future__ import annotations

import http.client
import random
import re
import ssl
import threading
from dataclasses import dataclass

from .errors import StoreError

__all__ = ["Answer", "Backoff", "ConnectionPool", "ContentRange", "DEFAULT_LIMIT", "ERROR_BODY_LIMIT",
           "NET_ERRORS", "RETRY_STATUS", "TooLarge", "Unframed", "exchange", "parse_content_range"]

NET_ERRORS = (OSError, http.client.HTTPException)  # timeouts, resets, refused, short bodies
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # worth asking again after a backoff

DEFAULT_LIMIT = 16 << 20  # bytes of a 2xx body when the caller names no bound (JSON, small objects)
ERROR_BODY_LIMIT = 64 << 10  # bytes kept of a non-2xx body (error documents are small)
_PIECE = 1 << 20  # read size for bodies of unknown length

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range: bytes first-last/total`` (``total`` None for ``*``)."""

    first: int
    last: int
    total: int | None

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def parse_content_range(value: str | None) -> ContentRange | None:
    """``bytes a-b/n`` (or ``/*``) -> ContentRange; None for anything else (absent, malformed,
    ``bytes */n``, last before first)."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        return None
    return ContentRange(first, last, None if m.group(3) == "*" else int(m.group(3)))


class Unframed(http.client.HTTPException):
    """A 2xx answer without Content-Length or chunked framing (possibly cut off)."""


class TooLarge(StoreError):
    """A server sent (or declared) a larger body than the request can have: a broken or hostile
    server, not a network failure (so not retried as one)."""


@dataclass
class Answer:
    """An HTTP answer: status, reason, headers and the body (for a 200 to a ranged request,
    its first bytes up to the range's end; for a non-2xx answer, at most ``ERROR_BODY_LIMIT``)."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class ConnectionPool:
    """Keep-alive connections to one host, each used by one thread at a time. Thread-safe.

    Args:
        scheme: "http" or "https" (the system's default TLS context).
        host, port: the server (port None: the scheme's default).
        maxsize: idle connections kept (busy ones are not capped).
        timeout: seconds for each socket operation.
        connect_timeout: when set, connections are opened at once with this (shorter) timeout
            and then use ``timeout``; else they connect lazily within ``timeout``.
    """

    def __init__(self, scheme: str, host: str, port: int | None, *, maxsize: int = 32,
                 timeout: float = 30.0, connect_timeout: float | None = None) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.maxsize = maxsize
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context() if scheme == "https" else None

    def acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was used before (the server may have closed it since).

        Raises:
            OSError: with ``connect_timeout``, when connecting fails.
        """
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        first = self.connect_timeout if self.connect_timeout is not None else self.timeout
        if self._ssl is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=first, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=first)
        if self.connect_timeout is not None:
            conn.connect()
            conn.sock.settimeout(self.timeout)
        return conn, False

    def release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Give back ``conn`` after ``resp`` was read whole (closed if it will not be reused)."""
        if not resp.will_close:
            with self._lock:
                if len(self._idle) < self.maxsize:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (the pool stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def _stale(e: BaseException, reused: bool) -> bool:
    return reused and not isinstance(e, (TimeoutError, http.client.IncompleteRead, Unframed))


def _bounds(status: int, headers: dict[str, str], limit: int) -> tuple[int, bool]:
    """(most body bytes kept, whether a longer body is cut there rather than refused)."""
    m = _RANGE.fullmatch((headers.get("Range") or "").strip())
    if 200 <= status < 300:
        if m and status == 206:
            return max(0, int(m.group(2)) - int(m.group(1)) + 1), False
        if m and status == 200:  # the whole object although a range was asked: its head will do
            return int(m.group(2)) + 1, True
        return limit, False
    return ERROR_BODY_LIMIT, True


def _read_body(resp: http.client.HTTPResponse, cap: int, cut: bool, where: str) -> tuple[bytes, bool]:
    """At most ``cap`` bytes of ``resp``'s body and whether it was read whole.

    Raises:
        TooLarge: a body over ``cap`` when ``cut`` is False (declared or streamed).
        http.client.IncompleteRead: a body shorter than its Content-Length.
    """
    declared = resp.length  # None: chunked, or read to the close
    if declared is not None:
        if declared <= cap:
            return resp.read(), True  # IncompleteRead on a short body
        if not cut:
            raise TooLarge(f"{where} declared a body of {declared} bytes where at most {cap} can "
                           "come; refused (a broken or hostile server?)")
        data = resp.read(cap)
        if len(data) < cap:
            raise http.client.IncompleteRead(data, cap - len(data))
        return data, False
    parts: list[bytes] = []
    got = 0
    while True:
        piece = resp.read(min(_PIECE, cap + 1 - got))
        if not piece:
            return b"".join(parts), True
        parts.append(piece)
        got += len(piece)
        if got > cap:
            if not cut:
                raise TooLarge(f"{where} sent a body of more than {cap} bytes where at most {cap} "
                               "can come; refused (a broken or hostile server?)")
            return b"".join(parts)[:cap], False


def exchange(pool: ConnectionPool, method: str, path: str, headers: dict[str, str], *,
             framed: bool = False, body: bytes | memoryview | None = None,
             limit: int = DEFAULT_LIMIT) -> Answer:
    """One request and its answer on a pooled connection (see the module doc for the one
    immediate resend on a stale keep-alive connection, and for how bodies are bounded).

    Args:
        framed: raise ``Unframed`` for a 2xx answer to a GET without Content-Length or
            chunked framing.
        body: the request body (sent with its Content-Length), e.g. a registry blob upload.
        limit: the most bytes a 2xx body may have (a request with a ``Range`` header bounds
            itself by the range instead).

    Raises:
        TooLarge: the body is (or claims to be) longer than the request allows; the
            connection is closed.
        TimeoutError, OSError, http.client.HTTPException (``Unframed``,
        ``IncompleteRead`` ...): the connection failed; it is closed, never pooled.
    """
    where = f"{pool.scheme}://{pool.host}{':' + str(pool.port) if pool.port else ''}{path.split('?')[0]}"
    for attempt in (0, 1):
        conn, reused = pool.acquire()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            cap, cut = _bounds(resp.status, headers, limit)
            data, whole = _read_body(resp, cap, cut, f"{method} {where}")  # IncompleteRead if short
            if framed and method == "GET" and 200 <= resp.status < 300 \
                    and resp.headers.get("Content-Length") is None and not resp.chunked:
                raise Unframed(f"HTTP {resp.status} without Content-Length (cut off?)")
        except NET_ERRORS as e:
            conn.close()
            if attempt == 0 and _stale(e, reused):
                continue  # a keep-alive connection the server had closed: once, at once
            raise
        except TooLarge:
            conn.close()
            raise
        if whole:
            pool.release(conn, resp)
        else:
            conn.close()  # the rest of the body is still on the wire
        return Answer(resp.status, resp.reason, resp.headers, data)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: full jitter over ``base * 2**(retry-1)`` seconds, at most
    ``cap``; a ``Retry-After`` of whole seconds raises the delay to it (capped)."""

    base: float = 0.1
    cap: float = 5.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        d = random.uniform(0, min(self.cap, self.base * 2 ** max(0, retry - 1)))
        if retry_after and retry_after.strip().isdigit():
            d = max(d, min(float(retry_after), self.cap))
        return d
