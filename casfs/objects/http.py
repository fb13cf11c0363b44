"""Read-only HTTP(S) blob store: images published by any static web server or CDN.

Layout: the SAME as a local store directory (``casfs.objects.local``): object
``kind/name`` is fetched from ``<base>/<kind>/<name[:2]>/<name>`` (``casfs.layout.FANOUT``). So a local store directory
served as static files is a valid read-only store, e.g. with nginx::

    location /casfs/ {
        alias /var/lib/casfs/store/;
        autoindex on;               # optional: lets `casfs` list tags and images
        autoindex_format json;
    }

and then ``casfs.open_store("https://host/casfs/")``. Copying the directory to any static
host, bucket website or CDN works the same way.

Behaviour:

- ``get_range`` sends ``Range: bytes=a-b``; a 206 is checked against the asked range, and a
  server that ignores ranges (200 with the whole object) is sliced locally.
- 404 is a KeyError; 5xx, 429, timeouts and broken connections are retried with jittered
  exponential backoff (honouring a short ``Retry-After``), then a ``StoreError``. This is the
  one retry layer of an HTTP blob read (the tier walk above does not retry).
- connections are HTTP/1.1 keep-alive, from a small thread-safe pool; pool, resend on a stale
  connection, Content-Range and backoff are ``casfs.httpclient`` (stdlib ``http.client``: no
  dependency beyond Python).
- answers are bounded (``casfs.httpclient``): a whole object by the largest its kind can be
  (``max_object_len``), a range by its length, a listing by ``MAX_LISTING``; a server that
  sends or declares more is refused with a ``StoreError`` (``TooLarge``), not retried.
- ``put``/``delete`` raise ``StoreError`` (read-only).
- ``list`` needs a JSON directory index (nginx ``autoindex_format json``); without one it
  raises ``StoreError``. Opening an image by tag or full id never lists: tags are fetched as
  ``tags/<name>`` objects.
"""

from __future__ import annotations

import json
import time
from typing import Iterator
from urllib.parse import SplitResult, quote, urlsplit

from ..errors import StoreError
from ..httpclient import (DEFAULT_LIMIT, NET_ERRORS, RETRY_STATUS, Answer, Backoff, ConnectionPool, exchange,
                          parse_content_range)
from ..layout import FANOUT, check_key, relpath
from .base import max_object_len

MAX_LISTING = 64 << 20  # bytes of one JSON directory listing (~500k entries)


def from_url(url: str, parts: SplitResult) -> "HttpObjectStore":
    """The read-only store at ``http(s)://host[:port]/path/`` (``casfs.objects``'s table)."""
    return HttpObjectStore(url)


class HttpObjectStore:
    """A read-only store at base URL ``url`` (``http://`` or ``https://``). Thread-safe.

    Args:
        url: the base URL (a trailing '/' is implied).
        timeout: seconds for connecting and for each socket read, per attempt.
        attempts: tries per request, first included.
        backoff: first retry delay in seconds (doubling, with full jitter).
        max_backoff: cap on one retry delay in seconds.
        pool_size: idle keep-alive connections kept (busy ones are not capped).
        headers: extra request headers (e.g. an Authorization for a private CDN).

    Raises:
        StoreError: for a URL that is not http(s) or has no host.
    """

    read_only = True

    def __init__(self, url: str, *, timeout: float = 30.0, attempts: int = 5, backoff: float = 0.1,
                 max_backoff: float = 5.0, pool_size: int = 32,
                 headers: dict[str, str] | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise StoreError(f"{url}: an HTTP store URL looks like http(s)://host[:port]/path/")
        if u.query or u.fragment:
            raise StoreError(f"{url}: an HTTP store URL takes no query or fragment")
        self.base_path = u.path.rstrip("/") + "/"
        self.url = f"{u.scheme}://{u.netloc}{self.base_path}"
        self.attempts = max(1, attempts)
        self.backoff = Backoff(backoff, max_backoff)
        try:
            port = u.port
        except ValueError:
            raise StoreError(f"{url}: invalid port") from None
        self._pool = ConnectionPool(u.scheme, u.hostname, port, maxsize=pool_size, timeout=timeout)
        self._headers = {"User-Agent": "casfs", **(headers or {})}
        self._can_list: bool | None = None

    def __repr__(self) -> str:
        return f"<HttpObjectStore {self.url}>"

    def close(self) -> None:
        """Close idle connections (the store stays usable)."""
        self._pool.close()

    # -- HTTP ------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return self.base_path + quote(relpath(key, FANOUT), safe="/")

    def _request(self, method: str, path: str, headers: dict[str, str] | None = None,
                 what: str = "", limit: int = DEFAULT_LIMIT) -> Answer:
        """One request with retries. Returns any non-retryable answer (2xx, 3xx, 4xx).

        A 2xx GET must be framed (Content-Length or chunked): a connection cut inside the
        headers otherwise looks like a complete response with an empty body. ``limit`` bounds a
        2xx body of a request without ``Range`` (``casfs.httpclient.exchange``).

        Raises:
            StoreError: when every attempt failed (5xx/429, timeouts, broken connections);
                ``TooLarge`` (at once) for a body over the bound.
        """
        hdrs = {**self._headers, **(headers or {})}
        last = ""
        for attempt in range(1, self.attempts + 1):
            retry_after = None
            try:
                resp = exchange(self._pool, method, path, hdrs, framed=True, limit=limit)
            except NET_ERRORS as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if resp.status not in RETRY_STATUS:
                    return resp
                last = f"HTTP {resp.status} {resp.reason}"
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.attempts:
                time.sleep(self.backoff.delay(attempt, retry_after))
        raise StoreError(f"{what or method} from {self.url} failed after {self.attempts} attempts "
                         f"({last}); check that the server is up and reachable")

    def _fail(self, what: str, resp: Answer) -> StoreError:
        if resp.status in (401, 403):
            return StoreError(f"{what}: {self.url} answered {resp.status} (access denied); "
                              "check the URL and any credentials passed as headers")
        return StoreError(f"{what}: {self.url} answered HTTP {resp.status} unexpectedly")

    # -- the ObjectStore protocol ----------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The whole object. Raises KeyError if missing (404), StoreError on failure."""
        resp = self._request("GET", self._path(key), what=f"get {key}", limit=max_object_len(key))
        if resp.status == 200:
            return resp.body
        if resp.status == 404:
            raise KeyError(key)
        raise self._fail(f"get {key}", resp)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the object, b"" past it).

        Raises:
            ValueError: for a negative offset or length.
            KeyError: if the object is missing.
            StoreError: on failure, or a 206 for another range than asked.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        if length == 0:
            if not self.contains(key):
                raise KeyError(key)
            return b""
        what = f"get_range {key} [{offset}, +{length})"
        resp = self._request("GET", self._path(key),
                             {"Range": f"bytes={offset}-{offset + length - 1}"}, what=what)
        if resp.status == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr.first != offset or len(resp.body) != cr.length or len(resp.body) > length:
                raise StoreError(f"{what}: {self.url} sent a different range "
                                 f"({resp.headers.get('Content-Range')!r}, {len(resp.body)} bytes)")
            return resp.body
        if resp.status == 200:  # the server ignored Range: slice the whole object
            return resp.body[offset:offset + length]
        if resp.status == 416:
            return b""  # offset at or past the end, like pread
        if resp.status == 404:
            raise KeyError(key)
        raise self._fail(what, resp)

    def _head(self, key: str, what: str) -> Answer | None:
        resp = self._request("HEAD", self._path(key), what=what)
        if resp.status == 200:
            return resp
        if resp.status == 404:
            return None
        raise self._fail(what, resp)

    def contains(self, key: str) -> bool:
        """Whether ``key`` exists (HEAD). Raises StoreError on failure."""
        return self._head(key, f"contains {key}") is not None

    def size(self, key: str) -> int:
        """Bytes in object ``key``. Raises KeyError if missing, StoreError on failure.

        A 1-byte ranged GET, not a HEAD: a HEAD cut off inside its headers can carry a
        truncated Content-Length that nothing reveals; a body byte after the headers proves
        they arrived whole, and Content-Range carries the total.
        """
        what = f"size {key}"
        resp = self._request("GET", self._path(key), {"Range": "bytes=0-0"}, what=what)
        if resp.status == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is not None and cr.total is not None and len(resp.body) == 1:
                return cr.total
            raise StoreError(f"{what}: {self.url} sent no usable Content-Range "
                             f"({resp.headers.get('Content-Range')!r})")
        if resp.status == 200:  # ranges ignored: the object's head came (the rest was not read)
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and resp.body:
                return int(declared)  # a body byte arrived: the headers are whole
            return len(self.get(key))  # chunked: read it (bounded by its kind)
        if resp.status == 416:  # nothing at offset 0: an empty object
            return 0
        if resp.status == 404:
            raise KeyError(key)
        raise self._fail(what, resp)

    def put(self, key: str, data: bytes) -> None:
        raise StoreError(f"{self.url} is a read-only HTTP store: build into a local or S3 store "
                         "and publish its directory")

    def delete(self, key: str) -> None:
        raise StoreError(f"{self.url} is a read-only HTTP store: nothing can be deleted through it")

    # -- listing ---------------------------------------------------------------------------

    def _index(self, path: str, what: str) -> list[dict] | None:
        """A JSON autoindex of directory ``path``; None for 404; StoreError when there is none."""
        resp = self._request("GET", path, {"Accept": "application/json"}, what=what, limit=MAX_LISTING)
        if resp.status == 404:
            return None
        entries = None
        if resp.status == 200:
            try:
                entries = json.loads(resp.body)
            except ValueError:
                entries = None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise StoreError(f"{what}: {self.url} has no JSON directory listing (HTTP {resp.status}); "
                             "listing an HTTP store needs one (nginx: `autoindex on; "
                             "autoindex_format json;`); open images by tag or full id instead")
        return entries

    def list(self, prefix: str) -> Iterator[str]:
        """Keys ``kind/name`` under ``prefix`` (a kind such as "tags/"), sorted.

        Raises:
            StoreError: when the server offers no JSON directory index.
        """
        kind = prefix.rstrip("/")
        check_key(f"{kind}/x")
        what = f"list {prefix}"
        if self._can_list is None:
            self._index(self.base_path, what)  # raises without an autoindex at the root
            self._can_list = True
        subdirs = self._index(self.base_path + quote(kind) + "/", what)
        if subdirs is None:
            return
        for sub in sorted(e["name"] for e in subdirs if e.get("type") == "directory"):
            files = self._index(self.base_path + quote(f"{kind}/{sub}") + "/", what) or []
            for name in sorted(e["name"] for e in files if e.get("type") == "file"):
                yield f"{kind}/{name}"
