"""azcache tier: chunk reads from the cache servers of the zone (or any HTTP cache).

Placed between the ssd tier and the blob tier (``open_store(azcache=...)`` or
``$CASFS_AZCACHE``, a comma-separated URL list). It speaks plain HTTP GET with ``Range`` to
the path layout of a store directory (``casfs.objects.http``)::

    <base>/chunks/<hex[:2]>/<hex>   a loose chunk frame
    <base>/packs/<hex[:2]>/<hex>    a pack; a packed chunk or a pack span is a byte range of it

(add ``?layout=flat`` to a URL for ``<base>/<kind>/<hex>``, the layout of S3 keys). So a
``casfs cache-server``, an nginx ``proxy_cache`` in front of an HTTP store or in front of an
S3 bucket, or any CDN with that layout, are all valid AZ caches.

Behaviour:

- **Rendezvous hashing**: each object key ranks the nodes by a hash of (node, key); the top
  available node is asked first, so every node caches a disjoint share and adding or removing
  a node moves only that node's share. All chunks of one pack go to one node.
- **Pooled keep-alive connections** per node; a reused connection the server had closed is
  retried once at once (``casfs.httpclient``). No other retries: a failing node is skipped and
  the next one (or the blob tier) asked.
- **Timeouts**: ``connect_timeout`` to connect, ``timeout`` for a whole request (socket reads
  and, with more than one node, the caller's wait).
- **Hedging**, in two stages so that a slow *fill* is not mistaken for a slow *node*: when a
  request has not answered after the recent p95 latency of cache hits of its size class, the
  next node in rank is asked with ``Cache-Control: only-if-cached`` (a casfs server answers
  504 rather than fetch from the blob store); if that node does not hold it and the first
  still has not answered after the p95 latency of fills (answers marked ``X-Casfs-Source:
  blob`` or ``X-Cache-Status: MISS``), the next node is asked to fill it too. The first good
  answer wins. So a cold start does not fetch each object from the blob store twice, and a
  hung node still costs about one fill time. Hedges are rationed (a token bucket: at most
  ~``hedge_ratio`` of requests). An error or a connection failure moves on at once.
- **Health**: a node that fails to connect, times out or breaks a transfer is skipped for a
  backoff (1 s doubling to 30 s), then tried again; one that loses ``slow_strikes`` hedges in a
  row is skipped as slow; one that returns wrong bytes (caught here by length and frame-header
  checks, or by the store's digest check through ``rejected``) is skipped for ``bad_seconds``;
  so is one that sends or declares a longer body than asked (a loose frame's stored length, a
  range's length: ``casfs.httpclient`` refuses it before buffering it).
  When no node is available ``get`` returns None and the store reads the blob tier.
- Read-only for the store (``writable = False``): servers fill themselves from the blob store
  (one fetch per object per zone, single flight on the server); a host pushing what it read
  would only add unverified uploads and double its egress.
- Auth: ``Authorization: Bearer`` from ``token`` or ``$CASFS_AZCACHE_TOKEN``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from .. import chunk as chunkmod
from ..errors import CorruptChunk, StoreError
from ..httpclient import NET_ERRORS, ConnectionPool, TooLarge, exchange, parse_content_range
from ..index import ChunkRef
from ..layout import FANOUT, FLAT, object_key, pack_key, relpath
from ..objects.base import max_object_len
from .base import Tier, WorkerPool

log = logging.getLogger("casfs.azcache")

ENV = "CASFS_AZCACHE"
TOKEN_ENV = "CASFS_AZCACHE_TOKEN"
_SIZE_CLASSES = (64 << 10, 1 << 20)  # latency classes of hits: <= 64 KiB, <= 1 MiB, larger
_FILL = len(_SIZE_CLASSES) + 1  # the latency class of answers the node had to fill first
_SAMPLES = 512
_MIN_SAMPLES = 20


@dataclass
class NodeStats:
    """Counters of one node, as seen by this client."""

    requests: int = 0
    ok: int = 0
    misses: int = 0
    errors: int = 0
    timeouts: int = 0
    corrupt: int = 0
    hedges_won: int = 0
    hedges_lost: int = 0
    bytes: int = 0
    last_error: str = ""


@dataclass(eq=False)  # compared and hashed by identity
class _Node:
    url: str
    host: str
    port: int
    base: str
    flat: bool
    salt: bytes
    pool: ConnectionPool
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: int = 0
    down_until: float = 0.0
    down_reason: str = ""
    slow_strikes: int = 0
    stats: NodeStats = field(default_factory=NodeStats)

    def path(self, key: str) -> str:
        return self.base + relpath(key, FLAT if self.flat else FANOUT)

    def available(self, now: float) -> bool:
        return now >= self.down_until


class _Outcome:
    """What one request to one node gave: ``kind`` is ok, miss, error, timeout or corrupt."""

    __slots__ = ("node", "kind", "data", "detail", "seconds", "filled")

    def __init__(self, node: _Node, kind: str, data: bytes | None = None, detail: str = "",
                 seconds: float = 0.0, filled: bool = False) -> None:
        self.node = node
        self.kind = kind  # ok, miss, uncached (an only-if-cached hedge), error, timeout, corrupt
        self.data = data
        self.detail = detail
        self.seconds = seconds
        self.filled = filled  # the node fetched it from the blob store for this answer


def parse_node_url(url: str) -> tuple[str, int, str, bool]:
    """``http://host:port/base/[?layout=flat]`` -> (host, port, base path, flat).

    Raises:
        StoreError: for a URL that is not plain http with a host, or an unknown layout.
    """
    u = urlsplit(url.strip())
    if u.scheme != "http" or not u.hostname:
        raise StoreError(f"azcache URL {url!r}: use http://host:port/[path/] (https is not supported "
                         "inside a zone; put a TLS proxy in front if needed)")
    layout = (parse_qs(u.query).get("layout") or ["store"])[0]
    if layout not in ("store", "flat"):
        raise StoreError(f"azcache URL {url!r}: layout must be 'store' (kind/hh/hex) or 'flat' (kind/hex)")
    try:
        port = u.port or 80
    except ValueError:
        raise StoreError(f"azcache URL {url!r}: invalid port") from None
    return u.hostname, port, u.path.rstrip("/") + "/", layout == "flat"


class AzCacheTier(Tier):
    """The ``azcache`` tier: reads frames from N HTTP cache nodes. Thread-safe.

    Args:
        urls: node base URLs (``http://host:port/``; see the module doc for ``?layout=flat``).
        token: bearer token (default ``$CASFS_AZCACHE_TOKEN``).
        timeout: seconds for one request to one node.
        connect_timeout: seconds to open a connection.
        hedge: send hedged requests (needs two or more nodes).
        hedge_min, hedge_default: lower bound of the hedge delay, and the delay used before
            enough latency samples of hits exist (seconds).
        fill_hedge_default: the second-stage delay before enough samples of fills exist.
        hedge_ratio: long-run most hedges per request.
        slow_strikes: hedges lost in a row after which a node is skipped as slow.
        down_base, down_max: backoff (seconds) for a failing node: doubles per failure.
        bad_seconds: how long a node that served wrong bytes is skipped.
        pool_size: idle keep-alive connections kept per node.
        workers: threads that carry requests when more than one node can answer.

    Raises:
        StoreError: for no URLs or a malformed URL.
    """

    supports_spans = True
    supports_ranges = True

    def __init__(self, urls: list[str], *, token: str | None = None, timeout: float = 2.0,
                 connect_timeout: float = 0.5, hedge: bool = True, hedge_min: float = 0.002,
                 hedge_default: float = 0.05, fill_hedge_default: float = 0.5,
                 hedge_ratio: float = 0.1, slow_strikes: int = 3,
                 down_base: float = 1.0, down_max: float = 30.0, bad_seconds: float = 60.0,
                 pool_size: int = 32, workers: int = 64, name: str = "azcache") -> None:
        urls = [u for u in (u.strip() for u in urls) if u]
        if not urls:
            raise StoreError("the azcache tier needs at least one cache server URL")
        super().__init__(name)
        self.nodes: list[_Node] = []
        for u in dict.fromkeys(urls):
            host, port, base, flat = parse_node_url(u)
            pool = ConnectionPool("http", host, port, maxsize=pool_size, timeout=timeout,
                                  connect_timeout=min(connect_timeout, timeout))
            self.nodes.append(_Node(u, host, port, base, flat, u.encode() + b"\0", pool))
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {"User-Agent": "casfs-azcache"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.hedge = hedge and len(self.nodes) > 1
        self.hedge_min = hedge_min
        self.hedge_default = hedge_default
        self.fill_hedge_default = fill_hedge_default
        self.hedge_ratio = hedge_ratio
        self.slow_strikes = slow_strikes
        self.down_base = down_base
        self.down_max = down_max
        self.bad_seconds = bad_seconds
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._samples = [deque(maxlen=_SAMPLES) for _ in range(_FILL + 1)]
        self._p95: list[float | None] = [None] * (_FILL + 1)
        self._since_p95 = [0] * (_FILL + 1)
        self._hedge_tokens = 2.0
        self._served: OrderedDict[str, _Node] = OrderedDict()
        self._pool = WorkerPool(max_workers=workers, thread_name_prefix="casfs-azcache") \
            if len(self.nodes) > 1 else None

    def __repr__(self) -> str:
        return f"<AzCacheTier {', '.join(n.url for n in self.nodes)}>"

    # -- the Tier interface -------------------------------------------------------------------

    def get(self, ref: ChunkRef) -> bytes | None:
        """The frame of ``ref`` from the best available node; None when it is missing or no
        node is available. Raises StoreError when every node tried failed."""
        key = object_key(ref)
        rng = (ref.pack_off, ref.stored_len) if ref.pack is not None else None

        def check(data: bytes) -> str:
            if ref.stored_len and len(data) != ref.stored_len:
                return f"{len(data)} bytes, expected {ref.stored_len}"
            try:
                if chunkmod.frame_digest(data) != ref.digest:
                    return "the frame holds another chunk"
            except CorruptChunk as e:
                return str(e)
            return ""

        return self._read(key, rng, ref.stored_len, check)

    def get_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of ``ref``'s frame (its block table or blocks),
        checked for length here and verified by the store."""
        if ref.stored_len:
            length = max(0, min(length, ref.stored_len - offset))
        if length <= 0:
            return b""
        key = object_key(ref)
        start = offset + (ref.pack_off if ref.pack is not None else 0)
        return self._read(key, (start, length), length,
                          lambda d: "" if len(d) == length else f"{len(d)} bytes, expected {length}")

    def get_span(self, pack: bytes, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of pack ``pack`` (many frames in one request)."""
        return self._read(pack_key(pack), (offset, length), length,
                          lambda d: "" if len(d) == length else f"{len(d)} bytes, expected {length}")

    def put(self, ref: ChunkRef, data: bytes) -> None:
        raise PermissionError("the azcache tier is filled by its servers, never by the store")

    def contains(self, ref: ChunkRef) -> bool:
        """Whether the first available node can serve ``ref`` (HEAD; False on any failure)."""
        key = object_key(ref)
        for node in self._ranked(key)[:1]:
            try:
                return exchange(node.pool, "HEAD", node.path(key), self._headers).status == 200
            except NET_ERRORS:
                pass
        return False

    def rejected(self, ref: ChunkRef) -> None:
        """The store found a frame from this tier corrupt: skip the node that served it."""
        with self._lock:
            node = self._served.get(object_key(ref))
        if node is not None:
            self._mark_bad(node, f"served chunk {ref.digest.hex()[:16]} that failed digest verification")

    # -- status ------------------------------------------------------------------------------

    def node_status(self) -> list[dict]:
        """Per node: url, up, why it is skipped, and its counters."""
        now = time.monotonic()
        return [{"url": n.url, "up": n.available(now), "down_reason": "" if n.available(now) else n.down_reason,
                 "down_for_s": max(0.0, n.down_until - now), **vars(n.stats)} for n in self.nodes]

    def hedge_delay(self, nbytes: int) -> float:
        """Seconds before a cached-only hedge of a request for ``nbytes`` (recent p95 of hits
        of its size class)."""
        c = self._class(nbytes)
        with self._lock:
            p95 = self._p95[c]
        d = self.hedge_default if p95 is None else p95
        return min(max(d, self.hedge_min), self.timeout / 2)

    def fill_hedge_delay(self) -> float:
        """Seconds before the second, filling hedge (1.5 x the recent p95 of fills)."""
        with self._lock:
            p95 = self._p95[_FILL]
        d = self.fill_hedge_default if p95 is None else 1.5 * p95
        return min(max(d, self.hedge_min), self.timeout / 2)

    def threads_started(self) -> bool:
        """Whether hedged requests have started this tier's request threads."""
        return self._pool is not None and self._pool.used

    def close(self) -> None:
        """Close idle connections and stop the request threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for n in self.nodes:
            n.pool.close()

    # -- reading -----------------------------------------------------------------------------

    def _read(self, key: str, rng: tuple[int, int] | None, nbytes: int, check) -> bytes | None:
        t0 = time.perf_counter()
        ranked = self._ranked(key)
        if not ranked:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None  # every node is down: the store goes to the blob tier
        headers = dict(self._headers)
        if rng is not None:
            headers["Range"] = f"bytes={rng[0]}-{rng[0] + rng[1] - 1}"
        if self._pool is None or len(ranked) == 1:  # one node: no hedge, socket timeouts bound it
            outcome = self._sequential(ranked, key, headers, rng, nbytes, check)
        else:
            outcome = self._hedged(ranked, key, headers, rng, nbytes, check)
        seconds = time.perf_counter() - t0
        if outcome is not None and outcome.kind == "ok":
            with self._lock:
                self._served[key] = outcome.node
                if len(self._served) > 65536:
                    self._served.popitem(last=False)
            self._stats.record_get(True, len(outcome.data), seconds)  # type: ignore[arg-type]
            return outcome.data
        if outcome is not None and outcome.kind == "miss":
            self._stats.record_get(False, 0, seconds)
            return None
        detail = outcome.detail if outcome is not None else "no answer"
        raise StoreError(f"azcache: {key} failed on every node tried ({detail})")

    def _sequential(self, ranked: list[_Node], key: str, headers: dict, rng, nbytes: int,
                    check) -> _Outcome | None:
        last = None
        for node in ranked[:3]:
            last = self._request(node, key, headers, rng, check, nbytes)
            if last.kind == "ok":
                self._sample(nbytes, last)
            if last.kind in ("ok", "miss"):
                return last
        return last

    def _hedged(self, ranked: list[_Node], key: str, headers: dict, rng, nbytes: int, check) -> _Outcome | None:
        """The primary first. After the hit-p95 delay, a cached-only hedge to the next node;
        if that node lacks it, a filling hedge to it after the fill-p95 delay. On an error or a
        request past its own ``timeout``, the next node at once. Up to three nodes."""
        queue = list(ranked[:3])
        t0 = time.monotonic()
        stage1_at = t0 + self.hedge_delay(nbytes) if self.hedge else float("inf")
        stage2_at = t0 + self.fill_hedge_delay() if self.hedge else float("inf")
        stage = 0
        with self._lock:
            self._hedge_tokens = min(10.0, self._hedge_tokens + self.hedge_ratio)
        pending: dict[Future, tuple[_Node, float, bool]] = {}  # node, due, cached-only
        cached_only = {**headers, "Cache-Control": "only-if-cached"}

        def launch(node: _Node, only_cached: bool = False) -> None:
            hdrs = cached_only if only_cached else headers
            fut = self._pool.submit(self._request, node, key, hdrs, rng, check, nbytes)  # type: ignore[union-attr]
            pending[fut] = (node, time.monotonic() + self.timeout, only_cached)

        def failover() -> None:
            busy = {n for n, _, c in pending.values() if not c}
            while queue:
                node = queue.pop(0)
                if node not in busy:
                    launch(node)
                    return

        primary = queue.pop(0)
        launch(primary)
        last: _Outcome | None = None
        while pending:
            now = time.monotonic()
            for fut, (node, due, _) in list(pending.items()):
                if now >= due:  # abandoned: its thread ends at the socket timeout
                    del pending[fut]
                    last = self._fail(node, "timeout", f"no answer within {self.timeout:.2f} s")
                    failover()
            if not pending:
                break
            wake = min(due for _, due, _ in pending.values())
            if queue and stage < 2:
                wake = min(wake, stage1_at if stage == 0 else stage2_at)
            done, _ = wait(list(pending), timeout=max(0.0, wake - now), return_when=FIRST_COMPLETED)
            for fut in done:
                node, _, _ = pending.pop(fut)
                out = fut.result()
                if out.kind in ("ok", "miss"):
                    if out.kind == "ok":
                        self._note_win(node, primary, [n for n, _, _ in pending.values()], out, nbytes)
                    return out
                if out.kind == "uncached":  # the hedge node lacks it
                    if not any(not c for _, _, c in pending.values()):  # and nobody else is filling
                        if node in queue:
                            queue.remove(node)
                        launch(node)
                    continue
                last = out
                failover()  # at once, not waiting for a hedge delay
            now = time.monotonic()
            if stage == 0 and queue and now >= stage1_at:
                stage = 1
                with self._lock:
                    allowed = self._hedge_tokens >= 1.0
                    if allowed:
                        self._hedge_tokens -= 1.0
                if allowed:
                    launch(queue[0], only_cached=True)
                else:
                    stage = 2  # no budget: no hedging for this request
            elif stage == 1 and queue and now >= stage2_at:
                stage = 2
                if queue[0] not in {n for n, _, _ in pending.values()}:
                    launch(queue.pop(0))
        return last

    def _note_win(self, winner: _Node, primary: _Node, losers: list[_Node], out: _Outcome, nbytes: int) -> None:
        if winner is primary:
            with primary.lock:
                primary.slow_strikes = 0
            self._sample(nbytes, out)
            return
        with winner.lock:
            winner.stats.hedges_won += 1
        for node in losers:
            if node is not primary:
                continue
            with node.lock:
                node.stats.hedges_lost += 1
                node.slow_strikes += 1
                strikes = node.slow_strikes
            if strikes >= self.slow_strikes:
                self._fail(node, "slow", f"lost {strikes} hedged requests in a row")

    def _request(self, node: _Node, key: str, headers: dict, rng, check, nbytes: int = 0) -> _Outcome:
        """One GET to one node (runs on a worker thread or the caller's). A whole object may
        be ``nbytes`` long (its frame's stored length; 0: unknown, the longest its kind can be);
        a range bounds itself."""
        with node.lock:
            node.stats.requests += 1
        path = node.path(key)
        t0 = time.perf_counter()
        try:  # resends once on a stale connection
            resp = exchange(node.pool, "GET", path, headers, limit=nbytes or max_object_len(key))
        except TooLarge as e:
            return self._mark_bad(node, str(e))
        except TimeoutError as e:
            return self._fail(node, "timeout", f"timed out ({e or 'socket timeout'})")
        except NET_ERRORS as e:
            return self._fail(node, "error", f"{type(e).__name__}: {e}")
        body = resp.body
        seconds = time.perf_counter() - t0
        status = resp.status
        if status == 404:
            with node.lock:
                node.stats.misses += 1
                node.failures = 0
            return _Outcome(node, "miss", seconds=seconds)
        if status == 504 and "Cache-Control" in headers:
            return _Outcome(node, "uncached", seconds=seconds)  # only-if-cached: not held there
        if status == 200 and rng is not None:
            body = body[rng[0]:rng[0] + rng[1]]  # the node ignored Range and sent everything
        elif status == 206 and rng is not None:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr.first != rng[0]:
                return self._mark_bad(node, f"answered another range ({resp.headers.get('Content-Range')!r})")
        elif status != 200:
            return self._fail(node, "error", f"HTTP {status} {resp.reason}", http_status=status)
        problem = check(body)
        if problem:
            return self._mark_bad(node, f"sent wrong bytes for {key}: {problem}")
        with node.lock:
            node.stats.ok += 1
            node.stats.bytes += len(body)
            node.failures = 0
        filled = resp.headers.get("X-Casfs-Source") == "blob" or resp.headers.get("X-Cache-Status") == "MISS"
        return _Outcome(node, "ok", body, seconds=seconds, filled=filled)

    # -- node health -------------------------------------------------------------------------

    def _ranked(self, key: str) -> list[_Node]:
        """Available nodes in rendezvous order for ``key`` (highest weight first)."""
        now = time.monotonic()
        kb = key.encode()
        scored = []
        for n in self.nodes:
            if n.available(now):
                h = hashlib.blake2b(n.salt + kb, digest_size=8).digest()
                scored.append((h, n))
        scored.sort(key=lambda t: t[0], reverse=True)
        return [n for _, n in scored]

    def _fail(self, node: _Node, kind: str, detail: str, http_status: int = 0) -> _Outcome:
        """Count a failure and skip the node for a backoff: at once for network failures,
        timeouts, slowness and 401/403 (a wrong token stays wrong); after 3 in a row for other
        HTTP errors (a 502 usually means the blob store behind the node is failing)."""
        now = time.monotonic()
        with node.lock:
            node.stats.last_error = detail
            if kind == "timeout":
                node.stats.timeouts += 1
            else:
                node.stats.errors += 1
            if now < node.down_until:
                return _Outcome(node, kind, detail=f"{node.url}: {detail}")  # already skipped
            node.failures += 1
            if not http_status or http_status in (401, 403) or node.failures >= 3:
                backoff = min(self.down_max, self.down_base * 2 ** min(node.failures - 1, 16))
                node.down_until = now + backoff
                node.down_reason = f"{kind}: {detail}"
                node.slow_strikes = 0
                log.warning("azcache node %s skipped for %.0f s: %s", node.url, backoff, detail)
        return _Outcome(node, kind, detail=f"{node.url}: {detail}")

    def _mark_bad(self, node: _Node, detail: str) -> _Outcome:
        with node.lock:
            node.stats.corrupt += 1
            node.stats.last_error = detail
            node.down_until = time.monotonic() + self.bad_seconds
            node.down_reason = f"bad bytes: {detail}"
        log.error("azcache node %s skipped for %.0f s: %s", node.url, self.bad_seconds, detail)
        return _Outcome(node, "corrupt", detail=f"{node.url}: {detail}")

    # -- latency samples ---------------------------------------------------------------------

    @staticmethod
    def _class(nbytes: int) -> int:
        for i, limit in enumerate(_SIZE_CLASSES):
            if nbytes <= limit:
                return i
        return len(_SIZE_CLASSES)

    def _sample(self, nbytes: int, out: _Outcome) -> None:
        c = _FILL if out.filled else self._class(nbytes)
        seconds = out.seconds
        with self._lock:
            s = self._samples[c]
            s.append(seconds)
            self._since_p95[c] += 1
            if len(s) >= _MIN_SAMPLES and (self._p95[c] is None or self._since_p95[c] >= 32):
                ordered = sorted(s)
                self._p95[c] = ordered[int(0.95 * (len(ordered) - 1))]
                self._since_p95[c] = 0
