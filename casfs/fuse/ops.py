"""The read-only FUSE request handlers (pyfuse3 on trio) over one image.

Inodes: entry ``i`` of the index is inode ``i + 1`` (the root, entry 0, is FUSE's ROOT_INODE 1),
except hard links, which the index gives a shared inode number above ``n_entries``; those map
back to the first entry seen with that number (kept in a dict filled as the kernel learns them
through lookup/readdir, so mounting costs nothing per entry). Inode numbers are therefore
stable across mounts of one image.

Reads never block the trio loop on I/O: a chunk already in the store's memory tier (or the
one the open file read last) is answered inline; anything else is fetched on a worker thread
under a ``CapacityLimiter``. A read inside one chunk is answered with a memoryview slice of the
chunk's bytes (no copy). A small read of a chunk not in memory, from a reader not (yet)
sequential, fetches and verifies only the blocks it covers (``TieredStore.read``: a 4 KiB
read of a 4 MiB chunk costs a 64 KiB block, not the chunk). A chunk no tier can deliver becomes EIO for that read and a log line;
the mount keeps serving.

Round trips the kernel can skip are refused with ENOSYS, which makes it stop sending them for
the rest of the mount: FLUSH and FSYNC (nothing to flush on a read-only image; every close()
otherwise waits for a FLUSH), and GETXATTR/LISTXATTR on images without extended attributes (the
kernel asks for security.capability and ACLs on many opens and execs); callers then see
EOPNOTSUPP, as on any filesystem without xattrs.

Caveats: pyfuse3 turns any exception other than ``FUSEError`` into the end of its main loop,
so every handler maps errors explicitly. Attributes and entries are cached by the kernel for
``timeout`` seconds and file pages are kept across opens (``keep_cache``): right for immutable
images, wrong for anything that changes under the mount (nothing does).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as statmod
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import pyfuse3
import trio

from ..errors import CasfsError
from ..profiles import ProfileRecorder
from ..readahead import Readahead
from ..safetensors_header import safetensors_header_size, safetensors_region

if TYPE_CHECKING:
    from ..image import Image
    from ..index import ChunkRef

log = logging.getLogger("casfs.fuse")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT | os.O_APPEND
BLKSIZE = 128 << 10  # st_blksize: the I/O size `cp`/`cat` pick up


def _guard(fn: Callable) -> Callable:
    """Map errors of a metadata handler to FUSE errnos (pyfuse3 must see only FUSEError)."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "CasfsOperations", *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except CasfsError as e:
            log.error("%s failed: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - the mount must keep serving
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    return wrapper


def _erofs(*_: Any) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


class _Handle:
    """State of one open file: its entry, chunk refs seen so far, readahead, and (only when
    the store has no memory tier) the last chunk read, so that the kernel's several requests
    inside one chunk fetch it once."""

    __slots__ = ("entry", "size", "cs", "refs", "ra", "last_j", "last_data", "safetensors")

    def __init__(self, entry: int, size: int, cs: int, ra: Readahead | None, safetensors: bool) -> None:
        self.entry = entry
        self.size = size
        self.cs = cs  # the file's chunk size
        self.refs: dict[int, "ChunkRef"] = {}
        self.ra = ra
        self.last_j = -1
        self.last_data: bytes | None = None
        self.safetensors = safetensors


class CasfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers serving ``image`` read-only.

    Args:
        image: the image to serve (its store supplies the chunks).
        timeout: seconds the kernel may cache entries and attributes.
        fetch_threads: most chunk fetches running on worker threads at once.
        readahead: do user-space sequential readahead and safetensors prefetch.
        max_ahead_bytes: the largest readahead window per open file.
        max_prefetch_bytes: most readahead bytes in flight over all files.
        recorder: when set, first touches of (entry, chunk) are recorded into it.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, image: "Image", *, timeout: float = 86400.0, fetch_threads: int = 32,
                 readahead: bool = True, max_ahead_bytes: int = 64 << 20,
                 max_prefetch_bytes: int = 256 << 20, recorder: ProfileRecorder | None = None) -> None:
        super().__init__()
        self.image = image
        self.index = image.index
        self.chunks = image.store.chunks
        self._has_memory = self.chunks.memory is not None  # else: keep the chunk being streamed
        self._pm = self.index.pack_members
        self._has_xattrs = self.index.has_xattrs
        self.n = self.index.n_entries
        self.timeout = float(timeout)
        self.readahead = readahead
        self.max_ahead_bytes = max_ahead_bytes
        self.max_prefetch_bytes = max_prefetch_bytes
        self.recorder = recorder
        self.limiter = trio.CapacityLimiter(fetch_threads)
        self.nursery: trio.Nursery | None = None  # set by the mount: background tasks
        self._hardlinks: dict[int, int] = {}  # inode -> entry, for inodes > n_entries
        self._hardlinks_complete = False
        self._lookups: dict[int, int] = {}  # inode -> kernel lookup count
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._ra_lock = threading.Lock()
        self._ra_inflight = 0
        self._statfs: pyfuse3.StatvfsData | None = None
        self.foreground_waiting = 0  # reads waiting on a fetch right now
        # seconds spent in handlers (metadata ones, and read without its fetches) and waiting
        # for fetches: with the daemon's CPU per thread, where a start's FUSE time goes
        self.seconds: dict[str, float] = {"read": 0.0, "fetch_wait": 0.0}
        self._waited: dict[Any, float] = {}  # fetch waits of the reads in flight, by trio task
        self.counters = {
            "lookups": 0, "getattrs": 0, "readdirs": 0, "opens": 0, "reads": 0, "read_bytes": 0,
            "inline_hits": 0, "fetches": 0, "eio": 0, "prefetch_chunks": 0, "prefetch_skipped": 0,
            "sequential_reads": 0, "safetensors_hints": 0, "forgets": 0, "block_reads": 0,
            "flushes": 0, "getxattrs": 0, "inline_local": 0,
        }

    # -- inodes -----------------------------------------------------------------------------

    def inode_of(self, i: int, st_ino: int) -> int:
        """The inode number served for entry ``i`` (whose index ``ino`` is ``st_ino``)."""
        if st_ino > self.n:
            self._hardlinks.setdefault(st_ino, i)
            return st_ino
        return i + 1

    def entry_of(self, inode: int) -> int:
        """The entry behind ``inode``. Raises FUSEError(ENOENT) for an unknown inode."""
        if 1 <= inode <= self.n:
            return inode - 1
        i = self._hardlinks.get(inode)
        if i is None and not self._hardlinks_complete:
            # only reachable for an inode the kernel did not learn from us in this process
            ix = self.index
            for k in range(self.n):
                ino = ix.stat(k).ino
                if ino > self.n:
                    self._hardlinks.setdefault(ino, k)
            self._hardlinks_complete = True
            i = self._hardlinks.get(inode)
        if i is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return i

    def _attr(self, i: int) -> pyfuse3.EntryAttributes:
        st = self.index.stat(i)
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.inode_of(i, st.ino)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = st.mode
        a.st_nlink = st.nlink
        a.st_uid = st.uid
        a.st_gid = st.gid
        a.st_rdev = st.rdev
        a.st_size = st.size
        a.st_blksize = BLKSIZE
        a.st_blocks = (st.size + 511) // 512 if statmod.S_ISREG(st.mode) else 0
        a.st_atime_ns = st.mtime_ns
        a.st_mtime_ns = st.mtime_ns
        a.st_ctime_ns = st.mtime_ns
        return a

    def _looked_up(self, inode: int) -> None:
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    @property
    def known_inodes(self) -> int:
        """Inodes the kernel currently holds a reference to (lookup count > 0)."""
        return len(self._lookups)

    # -- metadata ---------------------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.counters["lookups"] += 1
        d = self.entry_of(parent_inode)
        ix = self.index
        if not statmod.S_ISDIR(ix.mode(d)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            i: int | None = d
        elif name == b"..":
            i = ix.parent(d)
        else:
            i = ix.lookup_child(d, name)
        if i is None:
            neg = pyfuse3.EntryAttributes()  # negative entry: the kernel caches the miss
            neg.st_ino = 0
            neg.entry_timeout = self.timeout
            return neg
        a = self._attr(i)
        self._looked_up(a.st_ino)
        return a

    async def forget(self, inode_list: Any) -> None:
        lk = self._lookups
        for inode, n in inode_list:
            self.counters["forgets"] += 1
            left = lk.get(inode, 0) - n
            if left > 0:
                lk[inode] = left
            else:
                lk.pop(inode, None)

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.counters["getattrs"] += 1
        return self._attr(self.entry_of(inode))

    @_guard
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        i = self.entry_of(inode)
        if not statmod.S_ISLNK(self.index.mode(i)):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.index.readlink(i)

    @_guard
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        i = self.entry_of(inode)
        if not statmod.S_ISDIR(self.index.mode(i)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return i  # the entry number is all a directory handle needs

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        self.counters["readdirs"] += 1
        ix = self.index
        kids = ix.children(fh)
        # positions: 0 ".", 1 "..", then the children in name order (next_id = position + 1);
        # the kernel takes no reference on "." and "..", so they are not counted
        for pos, name, i in ((0, b".", fh), (1, b"..", ix.parent(fh))):
            if start_id <= pos and not pyfuse3.readdir_reply(token, name, self._attr(i), pos + 1):
                return
        base = kids.start - 2
        for pos in range(max(start_id, 2), len(kids) + 2):
            i = base + pos
            a = self._attr(i)
            if not pyfuse3.readdir_reply(token, ix.name(i), a, pos + 1):
                break
            self._looked_up(a.st_ino)  # readdirplus: the kernel now holds a reference

    async def releasedir(self, fh: int) -> None:
        pass

    @_guard
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        if self._statfs is None:
            ix = self.index
            total = 0
            for i in range(self.n):
                if statmod.S_ISREG(ix.mode(i)):
                    total += ix.size(i)
            s = pyfuse3.StatvfsData()
            s.f_bsize = BLKSIZE
            s.f_frsize = 4096
            s.f_blocks = -(-total // 4096)
            s.f_bfree = s.f_bavail = 0
            s.f_files = self.n
            s.f_ffree = s.f_favail = 0
            s.f_namemax = 255
            self._statfs = s
        return self._statfs

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        self.counters["getxattrs"] += 1
        if not self._has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking (see the module doc)
        val = self.index.xattrs(self.entry_of(inode)).get(name)
        if val is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return val

    @_guard
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if not self._has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return list(self.index.xattrs(self.entry_of(inode)))

    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        # only called without default_permissions: the image is read-only, all else is allowed
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # -- files ------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        i = self.entry_of(inode)
        ix = self.index
        if not statmod.S_ISREG(ix.mode(i)):
            raise pyfuse3.FUSEError(errno.EISDIR if statmod.S_ISDIR(ix.mode(i)) else errno.EINVAL)
        size = ix.size(i)
        cs = ix.file_chunk_size(i)
        ra = Readahead(cs, size, max_ahead_bytes=self.max_ahead_bytes) if self.readahead else None
        st = self.readahead and size > 8 and ix.name(i).endswith(b".safetensors")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(i, size, cs, ra, st)
        self.counters["opens"] += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def flush(self, fh: int) -> None:
        # nothing to flush on a read-only image: ENOSYS makes the kernel stop sending FLUSH,
        # which every close() of a file otherwise waits for (one round trip per open file)
        self.counters["flushes"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def read(self, fh: int, off: int, size: int) -> Any:
        t0 = time.perf_counter()
        task = trio.lowlevel.current_task()
        try:
            return await self._read(fh, off, size)
        finally:  # this read's own time: without its fetches (other reads run meanwhile)
            self.seconds["read"] += time.perf_counter() - t0 - self._waited.pop(task, 0.0)

    async def _read(self, fh: int, off: int, size: int) -> Any:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        end = min(off + size, h.size)
        if off >= end:
            return b""
        c = self.counters
        c["reads"] += 1
        c["read_bytes"] += end - off
        cs = h.cs
        c0 = off // cs
        c1 = (end - 1) // cs
        if self.recorder is not None and self.recorder.active:
            self.recorder.touch(h.entry, c0, c1)
        try:
            if h.ra is not None:
                ahead = h.ra.on_read(off, end - off)
                if ahead:
                    try:
                        self._prefetch(h, ahead)
                    except Exception as e:  # noqa: BLE001 - readahead is best effort, the read is not
                        log.warning("readahead of %s skipped: %s", self._path(h.entry), e)
            if c0 == c1:
                lo = off - c0 * cs
                piece = await self._small_read(h, c0, lo, end - off)
                if piece is not None:
                    if h.safetensors and off == 0:
                        self._safetensors(h, piece)
                    return piece
                data = await self._chunk(h, c0)
                if h.safetensors and c0 == 0:
                    self._safetensors(h, data)
                return memoryview(data)[lo:lo + (end - off)]  # zero copy
            parts = await self._chunks(h, c0, c1)
            if h.safetensors and c0 == 0:
                self._safetensors(h, parts[0])
            pieces = []
            for k, part in enumerate(parts):
                base = (c0 + k) * cs
                pieces.append(memoryview(part)[max(0, off - base):end - base])
            return b"".join(pieces)
        except pyfuse3.FUSEError:
            raise
        except (CasfsError, OSError) as e:
            c["eio"] += 1
            log.error("read of %s at %d (%d bytes) failed: %s", self._path(h.entry), off, size, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - the mount must keep serving
            c["eio"] += 1
            log.exception("read of %s at %d failed", self._path(h.entry), off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _path(self, entry: int) -> str:
        """The entry's path for a log line (never raises, even on a corrupt index)."""
        try:
            return repr(self.index.path(entry))
        except Exception:  # noqa: BLE001
            return f"<entry {entry}>"

    def _ref(self, h: _Handle, j: int) -> "ChunkRef":
        ref = h.refs.get(j)
        if ref is None:
            ref = h.refs[j] = self.index.file_chunk(h.entry, j)
        return ref

    async def _small_read(self, h: _Handle, j: int, lo: int, n: int) -> bytes | None:
        """A small read of chunk ``j`` that is not in memory, served by fetching and verifying
        only the blocks it covers (``TieredStore.read``); None when the whole chunk should be
        read instead (it is in memory, the read is large, or the reader is sequential: then
        the readahead that fetches whole chunks ahead serves it better)."""
        if h.ra is not None and h.ra.window:
            return None
        if not self._has_memory and h.last_j == j:
            return None
        ref = self._ref(h, j)
        if not self.chunks.wants_blocks(ref, n) or self.chunks.in_memory(ref):
            return None
        self.counters["block_reads"] += 1
        got = self.chunks.peek_range(ref, lo, n)  # its blocks in memory: answer inline
        if got is not None:
            self.counters["inline_hits"] += 1
            return got
        if self.chunks.held_locally(ref, lo, n):  # a local pread + hash: cheaper than a thread
            self.counters["inline_local"] += 1
            return self.chunks.read(ref, lo, n, self._pm)
        return await self._fetch(self.chunks.read, ref, lo, n, self._pm)

    async def _chunk(self, h: _Handle, j: int) -> bytes:
        mem = self._has_memory
        if not mem and h.last_j == j:  # no memory cache: keep the chunk being streamed
            self.counters["inline_hits"] += 1
            return h.last_data  # type: ignore[return-value]
        ref = self._ref(h, j)
        data = self.chunks.peek(ref) if mem else None
        if data is None:
            data = await self._fetch(self.chunks.get, ref, self._pm)
        else:
            self.counters["inline_hits"] += 1
        if not mem:
            h.last_j, h.last_data = j, data
        return data

    async def _chunks(self, h: _Handle, c0: int, c1: int) -> list[bytes]:
        refs = [self._ref(h, j) for j in range(c0, c1 + 1)]
        peek = self.chunks.peek
        out: list[bytes | None] = [peek(r) for r in refs] if self._has_memory else [None] * len(refs)
        missing = [k for k, d in enumerate(out) if d is None]
        if missing:
            got = await self._fetch(self.chunks.get_many, [refs[k] for k in missing], self._pm)
            for k, d in zip(missing, got):
                out[k] = d
        if not self._has_memory:
            h.last_j, h.last_data = c1, out[-1]
        return out  # type: ignore[return-value]

    async def _fetch(self, fn: Callable, *args: Any) -> Any:
        self.counters["fetches"] += 1
        self.foreground_waiting += 1
        t0 = time.perf_counter()
        try:
            # abandon_on_cancel: unmounting must not wait for a fetch stuck on a dead backend
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
        finally:
            self.foreground_waiting -= 1
            dt = time.perf_counter() - t0
            self.seconds["fetch_wait"] += dt
            task = trio.lowlevel.current_task()
            self._waited[task] = self._waited.get(task, 0.0) + dt

    # -- readahead --------------------------------------------------------------------------

    def _prefetch(self, h: _Handle, chunks: range) -> None:
        """Start background fetches of chunks ``chunks`` of ``h`` (bounded bytes in flight)."""
        self.counters["sequential_reads"] += 1
        in_memory = self.chunks.in_memory
        refs = [r for r in (self._ref(h, j) for j in chunks) if not in_memory(r)]
        if not refs:
            return
        nbytes = sum(r.raw_len for r in refs)
        with self._ra_lock:
            if self._ra_inflight and self._ra_inflight + nbytes > self.max_prefetch_bytes:
                self.counters["prefetch_skipped"] += len(refs)
                return
            self._ra_inflight += nbytes
        for r in refs:
            futs = self.chunks.prefetch([r], self._pm)
            if futs:
                self.counters["prefetch_chunks"] += 1
                futs[0].add_done_callback(lambda _f, n=r.raw_len: self._release_prefetch(n))
            else:
                self._release_prefetch(r.raw_len)

    def _release_prefetch(self, n: int) -> None:
        if n:
            with self._ra_lock:
                self._ra_inflight = max(0, self._ra_inflight - n)

    def _safetensors(self, h: _Handle, chunk0: bytes) -> None:
        h.safetensors = False  # once per open file
        if self.nursery is None:
            return
        self.nursery.start_soon(self._safetensors_hint, h, chunk0)

    async def _safetensors_hint(self, h: _Handle, chunk0: bytes) -> None:
        try:
            need = safetensors_header_size(chunk0[:8])
            if need is None or need > h.size:
                return
            head = chunk0 if need <= len(chunk0) else \
                await self._fetch(self.image.read_entry, h.entry, 0, need)
            region = await trio.to_thread.run_sync(safetensors_region, head[:need], h.size,
                                                   limiter=self.limiter)
            if region is None or h.ra is None:
                return
            self.counters["safetensors_hints"] += 1
            ahead = h.ra.hint_region(*region)
            if ahead:
                self._prefetch(h, ahead)
        except Exception as e:  # noqa: BLE001 - a hint is best effort
            log.warning("safetensors prefetch of %s skipped: %s", self._path(h.entry), e)
        finally:
            self._waited.pop(trio.lowlevel.current_task(), None)

    # -- writes: refused --------------------------------------------------------------------

    async def setattr(self, *a: Any) -> Any: _erofs()
    async def mknod(self, *a: Any) -> Any: _erofs()
    async def mkdir(self, *a: Any) -> Any: _erofs()
    async def unlink(self, *a: Any) -> Any: _erofs()
    async def rmdir(self, *a: Any) -> Any: _erofs()
    async def symlink(self, *a: Any) -> Any: _erofs()
    async def rename(self, *a: Any) -> Any: _erofs()
    async def link(self, *a: Any) -> Any: _erofs()
    async def write(self, *a: Any) -> Any: _erofs()
    async def create(self, *a: Any) -> Any: _erofs()
    async def setxattr(self, *a: Any) -> Any: _erofs()
    async def removexattr(self, *a: Any) -> Any: _erofs()

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters of this mount (JSON-ready)."""
        out: dict[str, Any] = dict(self.counters)
        out["open_files"] = len(self._handles)
        out["known_inodes"] = self.known_inodes
        out["prefetch_inflight_bytes"] = self._ra_inflight
        out["foreground_waiting"] = self.foreground_waiting
        out["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return out


__all__ = ["CasfsOperations"]
