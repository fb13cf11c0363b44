"""Sequential readahead: which chunks of an open file to fetch before they are read.

``Readahead`` is one per open file. It detects sequential reads and answers which chunk numbers
to fetch ahead; its window doubles with every sequential read, from one chunk up to
``max_ahead_bytes`` (default 64 MiB, at most ``max_chunks`` chunks), and collapses on a random
jump. ``hint_region`` switches it to *stream mode* for a byte range known to be read in order
(the data region of a safetensors file, ``casfs.safetensors_header.safetensors_region``): the
window stays at its maximum and jumps inside the region do not reset it.

Best effort, like every prefetch (a prefetch that fails is logged by the store, never raised).
Nothing here knows about FUSE: the mount and any other reader drive it with plain offsets.
"""

from __future__ import annotations

__all__ = ["Readahead"]


class Readahead:
    """Sequential-read detection for one open file.

    Args:
        chunk_size: the image's chunk size in bytes.
        file_size: the file's size in bytes.
        max_ahead_bytes: the largest window, in bytes past the end of the latest read.
        max_chunks: the largest window in chunks (bounds the work for tiny chunk sizes).

    ``on_read(offset, size)`` returns the chunk numbers to start fetching now; each chunk is
    returned at most once while the reader keeps moving forward (after a random jump, chunks
    may be returned again: the store skips those already in memory).
    """

    __slots__ = ("chunk_size", "n_chunks", "max_window", "window", "next_off", "issued_to",
                 "region", "furthest", "sequential_reads", "resets")

    def __init__(self, chunk_size: int, file_size: int, *, max_ahead_bytes: int = 64 << 20,
                 max_chunks: int = 64) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        self.chunk_size = chunk_size
        self.n_chunks = -(-file_size // chunk_size)
        self.max_window = max(1, min(max_chunks, max_ahead_bytes // chunk_size))
        self.window = 0  # chunks ahead of the latest read; 0 = not sequential (yet)
        self.next_off = -1  # where a sequential reader reads next
        self.issued_to = -1  # highest chunk number handed out
        self.region: tuple[int, int] | None = None  # stream mode: [first chunk, last chunk]
        self.furthest = -1  # highest chunk read so far
        self.sequential_reads = 0
        self.resets = 0

    def hint_region(self, start: int, end: int) -> range:
        """Declare bytes [start, end) as read in order; returns the chunks to fetch now."""
        if end <= start or self.n_chunks == 0:
            return range(0)
        cs = self.chunk_size
        first = start // cs
        last = min(self.n_chunks - 1, (end - 1) // cs)
        self.region = (first, last)
        self.window = self.max_window
        base = max(self.furthest, first - 1)
        return self._issue(base, limit=last)

    def on_read(self, offset: int, size: int) -> range:
        """Record a read of ``size`` bytes at ``offset``; returns chunk numbers to fetch now."""
        if size <= 0 or self.n_chunks == 0:
            return range(0)
        cs = self.chunk_size
        end = offset + size
        last = min(self.n_chunks - 1, (end - 1) // cs)
        if last > self.furthest:
            self.furthest = last
        region = self.region
        if region is not None and region[0] <= offset // cs <= region[1] + 1:
            self.next_off = max(self.next_off, end)
            return self._issue(max(self.furthest, region[0] - 1), limit=region[1])
        tol = max(4 * size, 1 << 20)
        if self.next_off >= 0 and self.next_off - tol <= offset <= self.next_off + tol:
            self.sequential_reads += 1
            if offset >= self.next_off - size:  # moving forward: grow the window
                self.window = min(self.max_window, max(1, self.window * 2))
            self.next_off = max(self.next_off, end)
        else:
            if self.window:
                self.resets += 1
            self.window = 0
            self.next_off = end
            self.issued_to = last
            return range(0)
        return self._issue(last)

    def _issue(self, base: int, limit: int | None = None) -> range:
        top = base + self.window
        top = min(top, self.n_chunks - 1 if limit is None else limit)
        lo = max(self.issued_to + 1, base + 1)
        if top < lo:
            return range(0)
        self.issued_to = top
        return range(lo, top + 1)
