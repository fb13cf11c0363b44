"""A client of the OCI distribution API (registry v2): blobs, manifests and tags of one
repository, over ``casfs.httpclient`` (stdlib ``http.client``, keep-alive pool, retries).

What it speaks (the subset casfs needs, checked against Debian's docker-registry 2.8):

- blobs: ``HEAD`` (exists? size), ``GET`` whole or ``Range: bytes=a-b`` (206), ``DELETE``;
  upload as ``POST /blobs/uploads/`` then one ``PUT ?digest=`` with the whole body
  (monolithic), or ``PATCH`` parts (``Content-Range: a-b``) then an empty ``PUT ?digest=``
  (chunked, from ``chunk_threshold`` bytes: registries and proxies cap request bodies). A
  single-request ``POST ?digest=`` upload is not used: distribution 2.8 answers it with 202
  and ignores the body;
- a blob ``GET`` answered by a redirect (S3-backed registries send 307 to a signed URL) is
  followed on a pool of the target's own, without the registry's credentials;
- manifests: ``GET``/``HEAD`` by tag or digest with an ``Accept`` list, ``PUT`` with the
  manifest's media type, ``DELETE`` by digest; a manifest fetched by digest is checked against
  that digest (sha256 of the body);
- tags: ``GET /tags/list`` with ``n``/``last`` pagination;
- auth: none, or HTTP Basic (``user:password@`` in the URL, or ``CASFS_OCI_USERNAME`` /
  ``CASFS_OCI_PASSWORD``). Bearer-token registries (Docker Hub, GHCR, ECR) are not supported
  yet: their 401 challenge becomes a StoreError saying so.

Transport: ``http`` for ``127.0.0.1``/``localhost``/``::1`` or when ``insecure`` is set, else
``https`` with the system's CA store.

Errors: 404 is ``None``/``KeyError`` where the caller asks "is it there"; 5xx, 429, timeouts
and broken connections are retried with jittered backoff; everything else is a
``casfs.errors.StoreError`` with the registry's own error code in the message.

Bounds: no answer is buffered beyond what its request can have (``casfs.httpclient``): a blob
by its descriptor's size (``MAX_BLOB`` when unknown), a range by its length, a manifest by
``max_bytes`` (``MAX_MANIFEST`` unless the caller expects more), other JSON by 16 MiB; more is
a ``StoreError`` (``TooLarge``) at once, not retried.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

from ..errors import StoreError
from ..httpclient import (DEFAULT_LIMIT, NET_ERRORS, RETRY_STATUS, Answer, Backoff, ConnectionPool, exchange,
                          parse_content_range)

__all__ = ["LOCAL_HOSTS", "REPO_RE", "Registry", "TAG_RE", "sha256_digest"]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK_THRESHOLD = 64 << 20  # blobs this large or larger upload in PATCH parts of this size
MAX_MANIFEST = 4 << 20  # bytes of a manifest by default (the distribution spec's suggested limit)
MAX_BLOB = 512 << 20  # bytes of a whole blob fetched without a known size (held in memory)


def sha256_digest(data: bytes | memoryview) -> str:
    """``sha256:<hex>`` of ``data``: a blob's or manifest's registry digest."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"invalid registry digest {digest!r} (sha256:<64 hex>)")
    return digest


@dataclass(frozen=True)
class Manifest:
    """A manifest as fetched: its media type, exact bytes and digest."""

    media_type: str
    body: bytes
    digest: str

    def json(self) -> dict:
        """The parsed body. Raises StoreError when it is not a JSON object."""
        try:
            doc = json.loads(self.body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise StoreError(f"manifest {self.digest} is not a JSON object")
        return doc


class Registry:
    """One repository of one registry. Thread-safe.

    Args:
        host: ``host`` or ``host:port``.
        repo: repository name (``casfs/images``), lower-case, '/'-separated.
        insecure: plain http even for a non-local host.
        username, password: HTTP Basic credentials (default: ``CASFS_OCI_USERNAME`` /
            ``CASFS_OCI_PASSWORD``).
        timeout: seconds per socket operation and attempt.
        attempts: tries per request, first included.
        chunk_threshold: blobs of this many bytes or more upload in parts of this size.

    Raises:
        StoreError: for a malformed host or repository name.
    """

    def __init__(self, host: str, repo: str, *, insecure: bool = False, username: str | None = None,
                 password: str | None = None, timeout: float = 30.0, attempts: int = 5,
                 backoff: float = 0.1, max_backoff: float = 5.0, pool_size: int = 32,
                 chunk_threshold: int = CHUNK_THRESHOLD) -> None:
        if not REPO_RE.match(repo) or len(repo) > 255:
            raise StoreError(f"invalid registry repository {repo!r}: lower-case letters, digits and "
                             "separators (._-), path components joined by '/'")
        parts = urlsplit(f"//{host}")
        try:
            port = parts.port
        except ValueError:
            raise StoreError(f"invalid registry host {host!r}") from None
        if not parts.hostname:
            raise StoreError(f"invalid registry host {host!r}")
        self.hostname = parts.hostname
        self.port = port
        self.host = host
        self.repo = repo
        self.insecure = insecure
        self.scheme = "http" if insecure or self.hostname in LOCAL_HOSTS else "https"
        self.attempts = max(1, attempts)
        self.backoff = Backoff(backoff, max_backoff)
        self.chunk_threshold = chunk_threshold
        self.timeout = timeout
        self._pool = ConnectionPool(self.scheme, self.hostname, port, maxsize=pool_size, timeout=timeout)
        self._pools: dict[tuple[str, str, int | None], ConnectionPool] = {}
        self._pools_lock = threading.Lock()
        self._uploading: dict[str, threading.Lock] = {}
        self._uploading_lock = threading.Lock()
        user = username if username is not None else os.environ.get("CASFS_OCI_USERNAME")
        pw = password if password is not None else os.environ.get("CASFS_OCI_PASSWORD")
        self._headers = {"User-Agent": "casfs"}
        if user:
            token = base64.b64encode(f"{user}:{pw or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self.base = f"/v2/{repo}"

    def __repr__(self) -> str:
        return f"<Registry {self.scheme}://{self.host}/{self.repo}>"

    @property
    def where(self) -> str:
        return f"{self.scheme}://{self.host}/{self.repo}"

    def close(self) -> None:
        """Close idle connections (the client stays usable)."""
        self._pool.close()
        with self._pools_lock:
            for p in self._pools.values():
                p.close()

    # -- requests --------------------------------------------------------------------------

    def _send(self, method: str, path: str, headers: dict[str, str] | None = None, *,
              body: bytes | memoryview | None = None, what: str = "",
              pool: ConnectionPool | None = None, auth: bool = True, limit: int = DEFAULT_LIMIT) -> Answer:
        """One request with retries; returns any answer that is not worth retrying. ``limit``
        bounds a 2xx body (``casfs.httpclient.exchange``; TooLarge is not retried)."""
        hdrs = {**(self._headers if auth else {"User-Agent": "casfs"}), **(headers or {})}
        last = ""
        for attempt in range(1, self.attempts + 1):
            retry_after = None
            try:
                resp = exchange(pool or self._pool, method, path, hdrs, framed=True, body=body, limit=limit)
            except NET_ERRORS as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if resp.status not in RETRY_STATUS:
                    if resp.status == 401 and auth:
                        raise self._unauthorized(resp, what or method)
                    return resp
                last = f"HTTP {resp.status} {resp.reason}"
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.attempts:
                time.sleep(self.backoff.delay(attempt, retry_after))
        raise StoreError(f"{what or method} on {self.where} failed after {self.attempts} attempts "
                         f"({last}); check that the server is up and reachable")

    def _unauthorized(self, resp: Answer, what: str) -> StoreError:
        challenge = resp.headers.get("WWW-Authenticate", "")
        if challenge.lower().startswith("bearer"):
            return StoreError(f"{what}: {self.where} wants token (Bearer) auth, which casfs does not "
                              "speak yet; use a registry with Basic auth or none (or a local mirror)")
        return StoreError(f"{what}: {self.where} refused the credentials (401); set "
                          "CASFS_OCI_USERNAME/CASFS_OCI_PASSWORD or user:password@ in the URL")

    def _fail(self, what: str, resp: Answer) -> StoreError:
        """A StoreError naming the registry's error code(s)."""
        codes = ""
        try:
            errs = json.loads(resp.body).get("errors") or []
            codes = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs if isinstance(e, dict))
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
        if resp.status == 403:
            return StoreError(f"{what}: {self.where} denied access (403){': ' + codes if codes else ''}")
        if resp.status == 405 and "DELETE" in what.upper():
            return StoreError(f"{what}: {self.where} does not allow deletes (405); enable "
                              "storage.delete in the registry's configuration")
        return StoreError(f"{what}: {self.where} answered HTTP {resp.status}"
                          + (f" ({codes})" if codes else ""))

    def _pool_for(self, url: str) -> tuple[ConnectionPool, str, bool]:
        """(pool, path, same origin) for an absolute or relative URL from a Location header."""
        u = urlsplit(url)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if not u.netloc:
            return self._pool, path, True
        scheme = u.scheme or self.scheme
        port = u.port
        if u.hostname == self.hostname and port == self.port and scheme == self.scheme:
            return self._pool, path, True
        key = (scheme, u.hostname or "", port)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = ConnectionPool(scheme, u.hostname or "", port, timeout=self.timeout)
        return pool, path, False

    # -- blobs -----------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> str:
        return f"{self.base}/blobs/{_check_digest(digest)}"

    def blob_size(self, digest: str) -> int | None:
        """Size of blob ``digest`` in bytes (-1: present behind a redirect, size unknown), None
        when the repository does not have it. A 200 without Content-Length (headers cut off on
        the way) is asked again."""
        what = f"HEAD blob {digest[:19]}"
        for attempt in range(1, self.attempts + 1):
            resp = self._send("HEAD", self._blob_path(digest), what=what)
            if resp.status == 404:
                return None
            if resp.status in (301, 302, 303, 307, 308):
                return -1
            if resp.status != 200:
                raise self._fail(what, resp)
            try:
                return int(resp.headers.get("Content-Length", ""))
            except ValueError:
                if attempt < self.attempts:
                    time.sleep(self.backoff.delay(attempt))
        raise StoreError(f"{what}: {self.where} failed after {self.attempts} attempts (answers without "
                         "Content-Length); check that the server is up and reachable")

    def _get_blob(self, digest: str, headers: dict[str, str], what: str,
                  limit: int = MAX_BLOB) -> Answer | None:
        """GET a blob (following up to 3 redirects); None for 404."""
        pool, path, same = self._pool, self._blob_path(digest), True
        for _ in range(4):
            resp = self._send("GET", path, headers, what=what, pool=pool, auth=same, limit=limit)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                pool, path, same = self._pool_for(resp.headers["Location"])
                continue
            if resp.status == 404:
                return None
            return resp
        raise StoreError(f"{what}: {self.where} redirected too many times")

    def get_blob(self, digest: str, size: int | None = None) -> bytes:
        """The whole blob, checked against its digest.

        Args:
            size: the blob's size when known (from a descriptor): a longer answer is refused
                before it is read; unknown: at most ``MAX_BLOB`` bytes.

        Raises:
            KeyError: the repository has no such blob.
            StoreError: on failure, a longer answer than ``size``, or bytes that do not match
                the digest.
        """
        what = f"GET blob {digest[:19]}"
        for attempt in range(1, self.attempts + 1):
            resp = self._get_blob(digest, {}, what, MAX_BLOB if size is None else size)
            if resp is None:
                raise KeyError(digest)
            if resp.status != 200:
                raise self._fail(what, resp)
            if sha256_digest(resp.body) == digest:
                return resp.body
            if attempt < self.attempts:  # damaged on the way? ask again
                time.sleep(self.backoff.delay(attempt))
        raise StoreError(f"{what}: {self.where} sent bytes that do not match the digest "
                         f"{self.attempts} times (a corrupt blob in the registry)")

    def get_blob_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of blob ``digest`` at ``offset`` (``length`` >= 1, inside the blob:
        a range past the end makes distribution 2.8 send a malformed answer). Not verifiable
        against the blob digest: callers verify what they read (casfs frames carry blake3).

        Raises:
            KeyError: the repository has no such blob.
            StoreError: on failure, or an answer for another range.
        """
        what = f"GET blob {digest[:19]} [{offset}, +{length})"
        resp = self._get_blob(digest, {"Range": f"bytes={offset}-{offset + length - 1}"}, what)
        if resp is None:
            raise KeyError(digest)
        if resp.status == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr.first != offset or len(resp.body) != cr.length or len(resp.body) > length:
                raise StoreError(f"{what}: {self.where} sent a different range "
                                 f"({resp.headers.get('Content-Range')!r}, {len(resp.body)} bytes)")
            return resp.body
        if resp.status == 200:  # ranges ignored: slice the whole blob
            return resp.body[offset:offset + length]
        raise self._fail(what, resp)

    def push_blob(self, data: bytes | memoryview, digest: str | None = None) -> str:
        """Upload ``data`` unless the repository has it; returns its digest.

        Monolithic (POST, then one PUT) below ``chunk_threshold`` bytes, else PATCH parts.
        A failed upload is started over (up to ``attempts`` times): uploads are idempotent by
        digest.

        Raises:
            StoreError: when the registry refuses or keeps failing.
        """
        digest = digest or sha256_digest(data)
        with self._uploading_lock:  # one upload per digest at a time: distribution 2.8 can
            lock = self._uploading.setdefault(digest, threading.Lock())  # lose track of a blob
        with lock:  # that two uploads commit at once (MANIFEST_BLOB_UNKNOWN right after)
            try:
                return self._push_blob(data, digest)
            finally:
                with self._uploading_lock:
                    self._uploading.pop(digest, None)

    def _push_blob(self, data: bytes | memoryview, digest: str) -> str:
        if self.blob_size(digest) is not None:
            return digest
        what = f"upload blob {digest[:19]} ({len(data)} bytes)"
        view = memoryview(data)
        err: StoreError | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                self._upload(view, digest, what)
                return digest
            except StoreError as e:
                err = e
                if attempt < self.attempts:
                    time.sleep(self.backoff.delay(attempt))
        assert err is not None
        raise err

    def _upload(self, data: memoryview, digest: str, what: str) -> None:
        resp = self._send("POST", f"{self.base}/blobs/uploads/", what=what)
        if resp.status != 202 or not resp.headers.get("Location"):
            raise self._fail(what, resp)
        location = resp.headers["Location"]
        if len(data) >= self.chunk_threshold:
            step = self.chunk_threshold
            for start in range(0, len(data), step):
                part = data[start:start + step]
                pool, path, same = self._pool_for(location)
                resp = self._send("PATCH", path, {"Content-Type": "application/octet-stream",
                                                  "Content-Range": f"{start}-{start + len(part) - 1}"},
                                  body=part, what=what, pool=pool, auth=same)
                if resp.status != 202 or not resp.headers.get("Location"):
                    raise self._fail(what, resp)
                location = resp.headers["Location"]
            body: memoryview | bytes = b""
        else:
            body = data
        pool, path, same = self._pool_for(location)
        path += ("&" if "?" in path else "?") + urlencode({"digest": digest})
        resp = self._send("PUT", path, {"Content-Type": "application/octet-stream"}, body=body,
                          what=what, pool=pool, auth=same)
        if resp.status not in (201, 204):
            raise self._fail(what, resp)

    def delete_blob(self, digest: str) -> bool:
        """Delete blob ``digest`` from the repository; False when it was not there.

        Raises:
            StoreError: when deletes are disabled (405) or on failure.
        """
        what = f"DELETE blob {digest[:19]}"
        resp = self._send("DELETE", self._blob_path(digest), what=what)
        if resp.status in (200, 202, 204):
            return True
        if resp.status == 404:
            return False
        raise self._fail(what, resp)

    # -- manifests and tags ----------------------------------------------------------------

    def _manifest_path(self, ref: str) -> str:
        if not (TAG_RE.match(ref) or _DIGEST_RE.match(ref)):
            raise ValueError(f"invalid manifest reference {ref!r}")
        return f"{self.base}/manifests/{quote(ref, safe=':')}"

    def get_manifest(self, ref: str, accept: list[str], max_bytes: int = MAX_MANIFEST) -> Manifest | None:
        """Manifest ``ref`` (a tag or ``sha256:`` digest); None when absent. A manifest asked
        for by digest is checked against it.

        Args:
            max_bytes: the longest manifest accepted (a longer answer is refused unread).

        Raises:
            StoreError: on failure, a manifest over ``max_bytes``, or a body that does not
                match the digest asked for.
        """
        what = f"GET manifest {ref[:30]}"
        resp = self._send("GET", self._manifest_path(ref), {"Accept": ", ".join(accept)}, what=what,
                          limit=max_bytes)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._fail(what, resp)
        digest = sha256_digest(resp.body)
        if ref.startswith("sha256:") and digest != ref:
            raise StoreError(f"{what}: {self.where} sent a manifest that does not match its digest")
        media = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        return Manifest(media, resp.body, digest)

    def manifest_digest(self, ref: str, accept: list[str]) -> str | None:
        """The digest of manifest ``ref`` (HEAD), None when absent. A 200 without a
        Docker-Content-Digest (headers cut off on the way) is asked again."""
        what = f"HEAD manifest {ref[:30]}"
        for attempt in range(1, self.attempts + 1):
            resp = self._send("HEAD", self._manifest_path(ref), {"Accept": ", ".join(accept)}, what=what)
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise self._fail(what, resp)
            digest = resp.headers.get("Docker-Content-Digest") or ""
            if _DIGEST_RE.match(digest):
                return digest
            if attempt < self.attempts:
                time.sleep(self.backoff.delay(attempt))
        raise StoreError(f"{what}: {self.where} failed after {self.attempts} attempts (answers without "
                         "Docker-Content-Digest); check that the server is up and reachable")

    def put_manifest(self, ref: str, body: bytes, media_type: str) -> str:
        """Store manifest ``body`` under ``ref`` (a tag, or its own digest); returns its digest.

        Raises:
            StoreError: when the registry refuses it (e.g. a blob it names is missing).
        """
        what = f"PUT manifest {ref[:30]}"
        for attempt in range(1, self.attempts + 1):
            resp = self._send("PUT", self._manifest_path(ref), {"Content-Type": media_type}, body=body,
                              what=what)
            if resp.status in (200, 201):
                return sha256_digest(body)
            # another process committing one of its blobs at this moment can make distribution
            # 2.8 briefly miss it: ask again before giving up
            if resp.status != 400 or b"BLOB_UNKNOWN" not in resp.body or attempt == self.attempts:
                raise self._fail(what, resp)
            time.sleep(self.backoff.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def delete_manifest(self, digest: str) -> bool:
        """Delete manifest ``digest`` (and every tag on it); False when absent.

        Raises:
            StoreError: when deletes are disabled (405) or on failure.
        """
        what = f"DELETE manifest {digest[:19]}"
        resp = self._send("DELETE", self._manifest_path(_check_digest(digest)), what=what)
        if resp.status in (200, 202, 204):
            return True
        if resp.status == 404:
            return False
        raise self._fail(what, resp)

    def tags(self, page: int = 1000) -> list[str]:
        """Every tag of the repository (paginated ``tags/list``); [] for an unknown repository."""
        out: list[str] = []
        last = ""
        while True:
            q = {"n": str(page)} | ({"last": last} if last else {})
            what = "list tags"
            resp = self._send("GET", f"{self.base}/tags/list?{urlencode(q)}", what=what)
            if resp.status == 404:
                return out
            if resp.status != 200:
                raise self._fail(what, resp)
            try:
                got = json.loads(resp.body).get("tags") or []
            except (ValueError, AttributeError, RecursionError):
                raise StoreError(f"{what}: {self.where} sent a malformed tag list") from None
            got = [t for t in got if isinstance(t, str)]
            out.extend(got)
            if len(got) < page or "Link" not in resp.headers or not got:
                return out
            last = got[-1]
