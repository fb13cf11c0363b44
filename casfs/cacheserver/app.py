"""Routing for the cache server: object paths, byte ranges, auth, /health and /metrics.

Path layout (what any HTTP cache must offer to work as the ``azcache`` tier):

- ``GET|HEAD /<kind>/<hex[:2]>/<hex>``: the store object ``<kind>/<hex>``, the same layout as a
  local store directory served by a static web server (``casfs.objects.http``), where
  ``<kind>`` is ``chunks``, ``packs`` or ``indexes`` and ``<hex>`` is 64 hex digits;
- ``GET|HEAD /<kind>/<hex>``: the same object, flat (the layout of S3 keys under a prefix);
- ``Range: bytes=a-b`` (one range; ``a-`` and ``-n`` too) answers 206 with ``Content-Range``;
  packed chunks and pack spans are read that way. A multi-range request gets the whole object.

A GET fills from the blob store on a miss, except with ``Cache-Control: only-if-cached``
(the azcache tier's first-stage hedges), which gets 504 when no local tier holds the object;
a HEAD only looks (caches, then the blob store's size) and never fills. Objects are immutable: replies carry ``Cache-Control: immutable`` and
an ``ETag`` equal to the digest. ``X-Casfs-Source`` says which tier answered (memory, ssd,
host, blob). ``/health`` is always open; everything else needs ``Authorization: Bearer
<token>`` when the server has a token.
"""

from __future__ import annotations

import hmac
import logging
import re
import time

from ..errors import CorruptChunk, StoreError
from ..layout import name_of, parse_object_path
from .http import HttpServer, Request, Response
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .objects import KINDS, ObjectCache

log = logging.getLogger("casfs.cacheserver")

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
_TEXT = [("Content-Type", "text/plain; charset=utf-8")]
_IMMUTABLE = "public, max-age=31536000, immutable"
_BEYOND = 1 << 63  # a position past any object: what a number of more than 18 digits means here


def _position(digits: str) -> int:
    """A Range number; one too long for any object (Python refuses to convert 4,300 digits or
    more, and converting is quadratic) means "past the end"."""
    return int(digits) if len(digits) <= 18 else _BEYOND


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """``Range`` header -> (start, end_exclusive), None (serve the whole object), or
    ``"unsatisfiable"`` (reply 416). Multiple ranges and malformed headers give None (RFC 9110
    lets a server ignore Range). Never raises, whatever the header (a hostile client's)."""
    m = _RANGE.match(header.strip())
    if not m:
        return None
    a, b = m.groups()
    if a == "" and b == "":
        return None
    if a == "":  # the last b bytes
        n = _position(b)
        if n == 0:
            return "unsatisfiable"
        if size == 0:
            return None  # the last bytes of nothing: the whole (empty) object, no "bytes 0--1/0"
        return max(0, size - n), size
    start = _position(a)
    end = size if b == "" else min(size, _position(b) + 1)
    if b != "" and _position(b) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class CacheApp:
    """The request handler of a cache server over an ``ObjectCache``.

    Args:
        cache: where objects come from.
        token: the bearer token clients must present (None: no auth).
        metrics: counters shared with the cache.
    """

    def __init__(self, cache: ObjectCache, *, token: str | None = None, metrics: Metrics | None = None) -> None:
        self.cache = cache
        self.token = token
        self.metrics = metrics or cache.metrics
        self.server: HttpServer | None = None  # set by CacheServer for the connection gauge
        self._expected_auth = f"Bearer {token}".encode() if token else None

    def __call__(self, req: Request) -> Response:
        t0 = time.perf_counter()
        resp, is_object = self._route(req)
        self.metrics.inc("casfs_cache_requests_total", code=str(resp.status))
        if resp.status in (200, 206) and req.method == "GET":
            self.metrics.inc("casfs_cache_bytes_sent_total", len(resp.body))
        if is_object:
            self.metrics.observe("casfs_cache_request_seconds", time.perf_counter() - t0)
        return resp

    def _route(self, req: Request) -> tuple[Response, bool]:
        """The response, and whether the request named an object (for the latency histogram)."""
        try:
            key, bad_path = parse_object_path(req.path), ""
        except ValueError as e:  # an object path whose fan-out directory is wrong
            key, bad_path = None, str(e)
        if key is not None or bad_path:
            if req.method not in ("GET", "HEAD"):
                return Response(405, b"only GET and HEAD\n", _TEXT + [("Allow", "GET, HEAD")]), False
            if not self._authorized(req):
                return self._unauthorized(), False
            if key is None:
                return Response(404, f"{bad_path}\n".encode(), _TEXT), False
            return self._object(req, key, name_of(key)), True
        return self._other(req), False

    def _unauthorized(self) -> Response:
        return Response(401, b"missing or wrong bearer token\n",
                        _TEXT + [("WWW-Authenticate", 'Bearer realm="casfs"')])

    def _other(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", _TEXT + [("Allow", "GET, HEAD")])
        if req.path == "/health":
            return Response(200, b'{"status": "ok"}\n', [("Content-Type", "application/json")])
        if not self._authorized(req):
            return self._unauthorized()
        if req.path == "/metrics":
            return Response(200, self.render_metrics().encode(),
                            [("Content-Type", METRICS_CONTENT_TYPE)])
        return Response(404, f"no such path; objects live at /<{'|'.join(KINDS)}>/<hh>/<hex>\n".encode(), _TEXT)

    def _authorized(self, req: Request) -> bool:
        if self._expected_auth is None:
            return True
        got = req.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(got, self._expected_auth)

    def _object(self, req: Request, key: str, name: str) -> Response:
        headers = [("Content-Type", "application/octet-stream"), ("ETag", f'"{name}"'),
                   ("Cache-Control", _IMMUTABLE), ("Accept-Ranges", "bytes")]
        try:
            if req.method == "HEAD" and "range" not in req.headers:
                size = self.cache.size(key)
                if size is None:
                    return Response(404, b"", _TEXT)
                return Response(200, b"", headers, length=size)
            if "only-if-cached" in req.headers.get("cache-control", ""):
                got = self.cache.get_cached(key)
                if got is None:  # RFC 9111: 504 when not stored here; nothing is fetched
                    return Response(504, b"not cached here (only-if-cached)\n", _TEXT)
                data, source = got
            else:
                data, source = self.cache.get(key)
        except KeyError:
            return Response(404, f"{key} is not in the blob store\n".encode(), _TEXT)
        except CorruptChunk as e:
            log.error("blob store returned a corrupt %s: %s", key, e)
            return Response(502, f"the blob store returned a corrupt {key}: {e}\n".encode(), _TEXT)
        except StoreError as e:
            log.warning("blob fill of %s failed: %s", key, e)
            return Response(502, f"blob store failed: {e}\n".encode(), _TEXT + [("Retry-After", "1")])
        headers.append(("X-Casfs-Source", source))
        size = len(data)
        rng = parse_range(req.headers["range"], size) if "range" in req.headers else None
        if rng == "unsatisfiable":
            return Response(416, b"", [("Content-Range", f"bytes */{size}")] + _TEXT)
        body = memoryview(data)
        if rng is None:
            return Response(200, body, headers)
        start, end = rng  # type: ignore[misc]
        headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        return Response(206, body[start:end], headers)

    def render_metrics(self) -> str:
        gauges = {("casfs_cache_tier_bytes", (("tier", t),)): float(n) for t, n in self.cache.tier_bytes().items()}
        if self.server is not None:
            gauges[("casfs_cache_connections", ())] = float(self.server.connections)
        return self.metrics.render(gauges)
