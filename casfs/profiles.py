"""Startup profiles: the chunks an image's first boot touched, replayed as a prefetch list later.

``ProfileRecorder`` notes the first touch of every (entry, chunk) during a boot;
``encode_profile``/``decode_profile`` give it a compact, validated binary form stored as the
object ``profiles/<image id>`` (``casfs.layout.profile_key``); ``ProfileReplayer`` fetches the
chunks of a profile in order on a few background threads, backing off while foreground reads
wait on the store. Best effort: a prefetch that fails is logged by the store, never raised.
Nothing here knows about FUSE: the mount drives these classes with plain entry/chunk numbers.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from . import chunk as chunkmod
from .digest import DIGEST_SIZE
from .errors import CasfsError, CorruptChunk
from .index import ChunkRef
from .layout import profile_key

if TYPE_CHECKING:
    from .image import Image
    from .store import Store

__all__ = ["MAX_PROFILE_ITEMS", "PROFILE_MAGIC", "PROFILE_VERSION", "Profile", "ProfileItem",
           "ProfileRecorder", "ProfileReplayer", "check_profile", "decode_profile", "encode_profile",
           "load_profile", "profile_key", "save_profile"]

PROFILE_MAGIC = b"CASFSPR1"
PROFILE_VERSION = 1
MAX_PROFILE_ITEMS = 4_000_000
_PROFILE_HEADER = struct.Struct("<8sIII32s")  # magic, version, chunk_size, count, image digest
_PROFILE_ITEM = struct.Struct("<II32sIIB32sQ")  # entry, chunk, digest, raw, stored, packed, pack, off


@dataclass(frozen=True, slots=True)
class ProfileItem:
    """One chunk of a startup profile: file entry number, chunk number within it, location."""

    entry: int
    chunk: int
    ref: ChunkRef


@dataclass
class Profile:
    """A startup profile: the chunks an image's first boot touched, in first-touch order.

    ``chunk_size`` is the unit the items' ``chunk`` numbers count: the image's chunk size for
    a mount's profile; a finer unit where a recorder knows more (snapshot restores record
    pages: ``chunk`` is then a page number and ``ref`` the chunk holding that page)."""

    image_id: str
    chunk_size: int
    items: list[ProfileItem]

    @property
    def raw_bytes(self) -> int:
        return sum(it.ref.raw_len for it in self.items)

    @property
    def stored_bytes(self) -> int:
        return sum(it.ref.stored_len for it in self.items)

    def refs(self) -> list[ChunkRef]:
        """Distinct chunk refs in profile order."""
        seen: set[bytes] = set()
        out = []
        for it in self.items:
            if it.ref.digest not in seen:
                seen.add(it.ref.digest)
                out.append(it.ref)
        return out


def encode_profile(profile: Profile) -> bytes:
    """Serialize a profile (uncompressed bytes; ``save_profile`` stores them as a chunk frame)."""
    if len(profile.items) > MAX_PROFILE_ITEMS:
        raise ValueError(f"a profile holds at most {MAX_PROFILE_ITEMS} chunks")
    out = bytearray(_PROFILE_HEADER.pack(PROFILE_MAGIC, PROFILE_VERSION, profile.chunk_size,
                                         len(profile.items), bytes.fromhex(profile.image_id)))
    for it in profile.items:
        r = it.ref
        out += _PROFILE_ITEM.pack(it.entry, it.chunk, r.digest, r.raw_len, r.stored_len,
                                  1 if r.pack is not None else 0, r.pack or bytes(DIGEST_SIZE),
                                  r.pack_off)
    return bytes(out)


def decode_profile(data: bytes | memoryview) -> Profile:
    """Parse profile bytes (untrusted).

    Raises:
        CorruptChunk: for a malformed, truncated or out-of-limit profile.
    """
    if len(data) < _PROFILE_HEADER.size:
        raise CorruptChunk(f"profile truncated: {len(data)} bytes")
    magic, version, chunk_size, count, image = _PROFILE_HEADER.unpack_from(data, 0)
    if magic != PROFILE_MAGIC:
        raise CorruptChunk("not a casfs startup profile (bad magic)")
    if version != PROFILE_VERSION:
        raise CorruptChunk(f"profile format version {version} is not supported")
    if count > MAX_PROFILE_ITEMS or len(data) != _PROFILE_HEADER.size + count * _PROFILE_ITEM.size:
        raise CorruptChunk(f"profile claims {count} chunks but has {len(data)} bytes")
    items = []
    for k in range(count):
        e, j, dg, raw, stored, packed, pack, off = _PROFILE_ITEM.unpack_from(
            data, _PROFILE_HEADER.size + k * _PROFILE_ITEM.size)
        # a ref may be longer than chunk_size: a profile may count finer units than chunks
        # (snapshot restores keep theirs by page, each item naming the chunk holding the page)
        if raw > max(chunk_size, chunkmod.MAX_RAW_LEN) or packed > 1 or stored > chunkmod.MAX_RAW_LEN + (1 << 20):
            raise CorruptChunk(f"profile item {k} is out of range")
        items.append(ProfileItem(e, j, ChunkRef(dg, raw, stored, pack if packed else None, off)))
    return Profile(image.hex(), chunk_size, items)


def save_profile(store: "Store", profile: Profile) -> str:
    """Store ``profile`` as ``profiles/<image id>`` (a verified chunk frame). Returns the key.

    Raises:
        StoreError: when the store cannot be written.
    """
    _, frame = chunkmod.encode(encode_profile(profile))
    key = profile_key(profile.image_id)
    store.objects.put(key, frame)
    return key


def load_profile(store: "Store", image_id: str) -> Profile | None:
    """The stored profile of ``image_id``, or None when there is none.

    Raises:
        CorruptChunk: when a stored profile fails verification or parsing.
    """
    try:
        frame = store.objects.get(profile_key(image_id))
    except KeyError:
        return None
    prof = decode_profile(chunkmod.decode(frame, expect=chunkmod.frame_digest(frame)))
    if prof.image_id != image_id:
        raise CorruptChunk(f"profile stored for image {image_id[:12]} names image {prof.image_id[:12]}")
    return prof


def check_profile(profile: Profile, image: "Image") -> list[ProfileItem]:
    """Items of ``profile`` that still match ``image``'s index (others are dropped, not fatal)."""
    ix = image.index
    good = []
    for it in profile.items:
        try:
            if ix.file_chunk(it.entry, it.chunk) == it.ref:
                good.append(it)
        except CasfsError:
            continue
        except (NotADirectoryError, OSError):
            continue
    return good


class ProfileRecorder:
    """Notes the first touch of each (entry, chunk number), in order, until stopped.

    ``touch`` is called on the read path: a set lookup, no locking (callers are one thread, or
    tolerate a duplicate on a race).
    """

    def __init__(self, image: "Image", *, max_items: int = MAX_PROFILE_ITEMS) -> None:
        self.image = image
        self.max_items = max_items
        self.started = time.monotonic()
        self.active = True
        self._seen: set[tuple[int, int]] = set()
        self._order: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, entry: int, first_chunk: int, last_chunk: int) -> None:
        if not self.active:
            return
        for j in range(first_chunk, last_chunk + 1):
            key = (entry, j)
            if key not in self._seen and len(self._order) < self.max_items:
                self._seen.add(key)
                self._order.append(key)

    def stop(self) -> Profile:
        """Stop recording; the profile of what was touched (chunks already seen are kept once)."""
        self.active = False
        ix = self.image.index
        items = []
        for e, j in self._order:
            try:
                items.append(ProfileItem(e, j, ix.file_chunk(e, j)))
            except CasfsError:
                continue
        return Profile(self.image.id, ix.chunk_size, items)


class ProfileReplayer:
    """Fetches a profile's chunks in order on background threads, into the store's tiers.

    Args:
        store: the store whose tiers are warmed (the memory tier above all).
        refs: chunks in the order to fetch them.
        pack_members: ``Index.pack_members`` of the image (a packed chunk brings its pack).
        concurrency: fetches in flight while foreground reads are idle.
        foreground_busy: returns True while foreground reads wait on the store; replay then
            keeps only one fetch in flight.

    ``start()`` returns at once; ``wait(timeout)`` joins; ``stop()`` abandons the rest.
    """

    def __init__(self, store: "Store", refs: Sequence[ChunkRef],
                 pack_members: Callable[[bytes], list[ChunkRef]] | None = None, *,
                 concurrency: int = 4, foreground_busy: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.refs = list(refs)
        self.pack_members = pack_members
        self.concurrency = max(1, concurrency)
        self.foreground_busy = foreground_busy or (lambda: False)
        self.total = len(self.refs)
        self.fetched = 0
        self.cached = 0
        self.failed = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._inflight = 0
        self._thread: threading.Thread | None = None

    def start(self) -> "ProfileReplayer":
        self._thread = threading.Thread(target=self._run, name="casfs-profile-replay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def as_dict(self) -> dict:
        return {"total": self.total, "fetched": self.fetched, "already_cached": self.cached,
                "failed": self.failed, "done": self.done.is_set()}

    def _run(self) -> None:
        chunks = self.store.chunks
        try:
            for ref in self.refs:
                if self._stop.is_set():
                    break
                if chunks.in_memory(ref):
                    self.cached += 1
                    continue
                with self._cond:
                    while not self._stop.is_set():
                        limit = 1 if self.foreground_busy() else self.concurrency
                        if self._inflight < limit:
                            break
                        self._cond.wait(0.05)
                    if self._stop.is_set():
                        break
                    self._inflight += 1
                try:
                    futs = chunks.prefetch([ref], self.pack_members)
                except RuntimeError:  # the store was closed
                    with self._cond:
                        self._inflight -= 1
                    break
                if not futs:  # it reached the memory tier meanwhile
                    self.cached += 1
                    with self._cond:
                        self._inflight -= 1
                    continue
                futs[0].add_done_callback(lambda f, ref=ref: self._finished(f, ref))
            with self._cond:
                while self._inflight and not self._stop.is_set():
                    self._cond.wait(0.05)
        finally:
            self.done.set()

    def _finished(self, fut, ref: ChunkRef) -> None:
        # the store's prefetch logs and swallows errors: a chunk that did not reach the
        # memory tier (when there is one) counts as failed
        chunks = self.store.chunks
        ok = not fut.cancelled() and fut.exception() is None and (chunks.memory is None or chunks.in_memory(ref))
        with self._cond:
            if ok:
                self.fetched += 1
            else:
                self.failed += 1
            self._inflight -= 1
            self._cond.notify_all()
