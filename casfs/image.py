"""Image: an opened image index plus the store its chunks come from; stat/list/read by path."""

from __future__ import annotations

import stat as statmod
from typing import TYPE_CHECKING, Iterator

from .errors import CorruptIndex, NotAFile
from .index import ChunkRef, Index, Stat

if TYPE_CHECKING:
    from .store import Store


class Image:
    """A read-only view of one image. Cheap to create; thread-safe for reads."""

    def __init__(self, store: "Store", image_id: str, index: Index, name: str | None = None) -> None:
        self.store = store
        self.id = image_id
        self.index = index
        self.name = name or image_id[:12]

    def __repr__(self) -> str:
        return f"<casfs.Image {self.name} {self.id[:12]} entries={self.index.n_entries}>"

    @property
    def chunk_size(self) -> int:
        """The largest chunk size of any file in the image (bytes); a file's own is
        ``file_chunk_size``."""
        return self.index.chunk_size

    def file_chunk_size(self, entry: int) -> int:
        """Bytes per chunk of regular file ``entry`` (chunk ``j`` starts at ``j * size``).

        Raises:
            NotAFile, CorruptIndex.
        """
        return self.index.file_chunk_size(entry)

    def lookup(self, path: str) -> int:
        """Entry number of ``path`` (raises PathNotFound)."""
        return self.index.lookup(path)

    def stat(self, path: str) -> Stat:
        """Metadata of ``path`` (symlinks not followed). Raises PathNotFound."""
        return self.index.stat(self.index.lookup(path))

    def exists(self, path: str) -> bool:
        try:
            self.index.lookup(path)
            return True
        except Exception:  # noqa: BLE001
            return False

    def listdir(self, path: str = "") -> list[str]:
        """Names in directory ``path``, sorted. Raises PathNotFound / NotADirectoryError."""
        ix = self.index
        return [ix.name(c).decode("utf-8", "surrogateescape") for c in ix.children(ix.lookup(path))]

    def readlink(self, path: str) -> str:
        return self.index.readlink(self.index.lookup(path)).decode("utf-8", "surrogateescape")

    def walk(self, path: str = "") -> Iterator[tuple[str, Stat]]:
        """(path, Stat) of every entry under ``path``, parents first."""
        ix = self.index
        for i in ix.walk(ix.lookup(path)):
            yield ix.path(i), ix.stat(i)

    def chunk_refs(self, entry: int, offset: int = 0, size: int | None = None) -> list[ChunkRef]:
        """Chunks of regular file ``entry`` that cover [offset, offset+size)."""
        ix = self.index
        fsize = ix.size(entry)
        if size is None:
            size = fsize - offset
        end = min(fsize, offset + size)
        if offset >= end:
            return []
        cs = ix.file_chunk_size(entry)
        return [ix.file_chunk(entry, j) for j in range(offset // cs, (end - 1) // cs + 1)]

    def read_entry(self, entry: int, offset: int = 0, size: int = -1) -> bytes:
        """Read ``size`` bytes (all when -1) at ``offset`` of regular file ``entry``.

        Short reads happen only at end of file. Raises ChunkUnavailable, NotAFile.
        """
        ix = self.index
        if not statmod.S_ISREG(ix.mode(entry)):
            raise NotAFile(f"{ix.path(entry)!r} is not a regular file")
        if offset < 0:
            raise ValueError("offset must be >= 0")
        fsize = ix.size(entry)
        if size < 0:
            size = fsize
        end = min(fsize, offset + size)
        if offset >= end:
            return b""
        cs = ix.file_chunk_size(entry)
        refs = self.chunk_refs(entry, offset, end - offset)
        if len(refs) == 1:  # inside one chunk: a small read fetches only the blocks it covers
            lo = offset - (offset // cs) * cs
            return self.store.chunks.read(refs[0], lo, end - offset, ix.pack_members)
        parts = self.store.chunks.get_many(refs, ix.pack_members)
        first = offset // cs
        for k, part in enumerate(parts):
            want = min(cs, fsize - (first + k) * cs)
            if len(part) != want:
                raise CorruptIndex(f"{ix.path(entry)!r}: chunk {first + k} is {len(part)} bytes, "
                                   f"the file needs {want}")
        lo = offset - first * cs
        if len(parts) == 1:
            return parts[0][lo:lo + (end - offset)]
        # one copy: join views of just the needed slices (not the whole chunks, then a slice)
        views = [memoryview(p) for p in parts]
        views[0] = views[0][lo:]
        views[-1] = views[-1][:end - (first + len(parts) - 1) * cs]
        return b"".join(views)

    def read_into(self, entry: int, offset: int, buf: object, *, fill_memory: bool = False,
                  hash_threads: int = 0) -> int:
        """Read regular file ``entry`` from ``offset`` into the writable buffer ``buf``.

        The zero-copy read (``TieredStore.get_into``): every whole chunk the range covers is
        read from the store straight into ``buf`` and verified there, so ``buf`` may be pinned
        host memory or a tensor's storage. Chunks are read one after another: callers that
        want throughput split a file over threads (e.g. one chunk-aligned range each).

        Args:
            buf: writable, contiguous; fills ``min(len(buf), size - offset)`` bytes.
            fill_memory: also keep the chunks in the store's memory tier (off: a one-pass
                stream should not evict what other readers use).
            hash_threads: blake3 threads per chunk check (1 when many threads read at once).

        Returns the bytes read (short only at end of file). On an error ``buf`` holds
        unspecified bytes.

        Raises:
            ChunkUnavailable, NotAFile, CorruptIndex (a chunk's length disagrees with the
            file's), ValueError (negative offset, read-only buffer).
        """
        from . import chunk as chunkmod

        ix = self.index
        if not statmod.S_ISREG(ix.mode(entry)):
            raise NotAFile(f"{ix.path(entry)!r} is not a regular file")
        if offset < 0:
            raise ValueError("offset must be >= 0")
        out = chunkmod.writable_view(buf)
        fsize = ix.size(entry)
        n = max(0, min(len(out), fsize - offset))
        cs = ix.file_chunk_size(entry)
        chunks = self.store.chunks
        done = 0
        while done < n:
            pos = offset + done
            j = pos // cs
            ref = ix.file_chunk(entry, j)
            want = min(cs, fsize - j * cs)
            if ref.raw_len != want:
                raise CorruptIndex(f"{ix.path(entry)!r}: chunk {j} is {ref.raw_len} bytes, the file needs {want}")
            lo = pos - j * cs
            take = min(want - lo, n - done)
            if lo == 0 and take == want:
                got = chunks.get_into(ref, out[done:done + take], ix.pack_members,
                                      fill_memory=fill_memory, hash_threads=hash_threads)
            else:  # a partial chunk: whole into scratch, then the slice
                scratch = bytearray(want)
                got = chunks.get_into(ref, scratch, ix.pack_members, fill_memory=fill_memory,
                                      hash_threads=hash_threads)
                out[done:done + take] = memoryview(scratch)[lo:lo + take]
            if got != want:
                raise CorruptIndex(f"{ix.path(entry)!r}: chunk {j} holds {got} bytes, the file needs {want}")
            done += take
        return n

    def check_file(self, path: str, local: str) -> str | None:
        """Compare the local file ``local`` with the image's regular file ``path``, byte for
        byte through the chunk digests (blake3 of every chunk read from ``local``; nothing is
        fetched from the store). Returns None when they are equal, else why not (one line).
        ``local`` is opened without following a symlink. Cost: reading and hashing the file
        (blake3 on two threads, 2-2.8 GiB/s here on large chunks).

        Raises:
            PathNotFound: no ``path`` in the image; NotAFile: it is not a regular file.
        """
        import os

        from .digest import digest_bytes

        ix = self.index
        i = ix.lookup(path)
        if not statmod.S_ISREG(ix.mode(i)):
            raise NotAFile(f"{path!r} is not a regular file in image {self.name}")
        size = ix.size(i)
        try:
            fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            return f"{local}: {e.strerror}"
        try:
            st = os.fstat(fd)
            if not statmod.S_ISREG(st.st_mode):
                return f"{local}: not a regular file"
            if st.st_size != size:
                return f"{local}: {st.st_size} bytes, the image's {path} has {size}"
            cs = ix.file_chunk_size(i)
            buf = bytearray(min(cs, size) or 1)
            for j, ref in enumerate(self.chunk_refs(i)):
                want = min(cs, size - j * cs)
                view = memoryview(buf)[:want]
                got = os.preadv(fd, [view], j * cs)
                if got != want or digest_bytes(view) != ref.digest:
                    return f"{local}: bytes {j * cs}-{j * cs + want - 1} differ from the image's {path}"
        finally:
            os.close(fd)
        return None

    def logical_bytes(self) -> int:
        """Bytes of file contents the image holds, each hard-linked file once (what a build
        read, what ``casfs images`` and the progress bars show)."""
        ix = self.index
        seen: set[int] = set()
        total = 0
        for i in range(ix.n_entries):
            if statmod.S_ISREG(ix.mode(i)):
                st = ix.stat(i)
                if st.nlink > 1:
                    if st.ino in seen:
                        continue
                    seen.add(st.ino)
                total += st.size
        return total

    def resolve(self, path: str, *, follow_last: bool = True, max_links: int = 40) -> int:
        """Entry number of ``path``, following symlinks inside the image as the kernel would
        with the image as root: an absolute target starts again at the image's root, ``..``
        at the root stays there, and nothing outside the image is ever looked at.

        Args:
            follow_last: also follow a symlink in the last component (``cat``), or not
                (``stat``/``readlink``).
            max_links: symlinks followed before giving up (Linux's limit is 40).

        Raises:
            PathNotFound: a component is missing, a non-directory is traversed, or more than
                ``max_links`` symlinks were followed (a loop).
        """
        from collections import deque

        from .errors import PathNotFound

        ix = self.index
        parts = deque(path.split("/"))
        cur = 0
        links = 0
        while parts:
            part = parts.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                cur = ix.parent(cur)
                continue
            if not statmod.S_ISDIR(ix.mode(cur)):
                raise PathNotFound(f"{path!r}: /{ix.path(cur)} is not a directory")
            j = ix.lookup_child(cur, part.encode("utf-8", "surrogateescape"))
            if j is None:
                raise PathNotFound(f"{path!r} does not exist in the image (/{ix.path(cur)} has no {part!r})")
            if statmod.S_ISLNK(ix.mode(j)) and (parts or follow_last):
                links += 1
                if links > max_links:
                    raise PathNotFound(f"{path!r}: too many levels of symbolic links (a loop at /{ix.path(j)}?)")
                target = ix.readlink(j).decode("utf-8", "surrogateescape")
                if target.startswith("/"):
                    cur = 0
                parts.extendleft(reversed(target.split("/")))
                continue
            cur = j
        return cur

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        """Read bytes of the regular file at ``path`` (follows no symlinks)."""
        return self.read_entry(self.index.lookup(path), offset, size)

    def prefetch_entry(self, entry: int, offset: int = 0, size: int | None = None) -> None:
        """Start fetching the chunks of a file range in the background."""
        self.store.chunks.prefetch(self.chunk_refs(entry, offset, size), self.index.pack_members)

    def file_chunks(self) -> Iterator[ChunkRef]:
        """Every chunk this image references (duplicates included)."""
        ix = self.index
        for i in range(ix.n_entries):
            if statmod.S_ISREG(ix.mode(i)):
                yield from ix.file_chunks(i)
