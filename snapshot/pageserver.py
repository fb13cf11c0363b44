"""A CRIU page server fed from the casfs store: lazy pages of a stored snapshot, on demand.

CRIU's lazy-pages daemon (``criu lazy-pages --page-server --ps-socket FD``) catches the
restored processes' page faults through userfaultfd and asks a page server for the missing
pages; once the tree runs it asks for the rest in the background, in address order. This
module is that page server, speaking CRIU's protocol over a socket pair (no port), answering
from the snapshot image's ``pages-N.img`` files in the casfs store:

* a request is ``PS_IOV_GET(nr_pages, vaddr, pid)``; the answer ``PS_IOV_ADD_F(PE_PRESENT)``
  with the same fields, then the pages' bytes. Requests are answered in order (the daemon
  matches answers to requests by order);
* every byte comes from a verified read (``casfs.Image.read_entry``: each chunk is checked
  against its digest in the store, or was checked when it entered the memory tier);
* a request that cannot be answered (a chunk unavailable or corrupt, an address no pagemap
  covers) is fatal to the restore: ``on_error`` runs first (the caller kills the restored
  tree), then the socket closes. Closing alone would not do: a uffd whose daemon is gone
  turns later faults into zero-filled pages, silently wrong memory;
* the first touch of each chunk by a fault (a one-page request) is recorded in order, for the
  snapshot's startup profile (``snapshot.lazyrestore`` stores and replays it);
* a request for chunk k of a pages file starts fetching chunks k+1..k+``readahead`` in the
  background: the background transfer walks addresses upward.

Measured (2-core VM, docs/benchmarks.md): see ``snapshot.lazyrestore``.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import casfs

from .criuimg import PAGE_SIZE, PE_PRESENT, Pagemap

__all__ = ["PageServer", "ProcessPages"]

log = logging.getLogger("snapshot.pageserver")

PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_MASK = 0xFFFF
_IOV = struct.Struct("<I4xQQQ")  # struct page_server_iov: u32 cmd; u64 nr_pages, vaddr, dst_id


@dataclass
class ProcessPages:
    """Where one process's lazy pages are: the casfs entry of its pages file and, per present
    pagemap entry, its address range and offset in that file (sorted by address)."""

    entry: int
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    @classmethod
    def from_pagemap(cls, entry: int, pm: Pagemap) -> "ProcessPages":
        out = cls(entry)
        for e, off in zip(pm.entries, pm.file_offsets()):
            if e.flags & PE_PRESENT:
                out.starts.append(e.vaddr)
                out.ends.append(e.end)
                out.offsets.append(off)
        return out

    def locate(self, vaddr: int, nbytes: int) -> int | None:
        """Offset in the pages file of [vaddr, vaddr+nbytes), or None if no one entry holds it."""
        k = bisect.bisect_right(self.starts, vaddr) - 1
        if k < 0 or vaddr + nbytes > self.ends[k]:
            return None
        return self.offsets[k] + (vaddr - self.starts[k])


class PageServer:
    """Answers one lazy-pages daemon on ``sock`` (see the module docstring).

    Args:
        image: the snapshot image (its store does the verified reads).
        processes: pid (as in the image names) -> where its pages are.
        sock: our end of the socket pair; the daemon holds the other.
        on_error: called once with the reason before the socket closes on a failure.
        readahead: chunks fetched ahead of a request, in the background.
    """

    def __init__(self, image: casfs.Image, processes: dict[int, ProcessPages], sock: socket.socket, *,
                 on_error: Callable[[str], None] | None = None, readahead: int = 2) -> None:
        self.image = image
        self.processes = processes
        self.sock = sock
        self.on_error = on_error
        self.readahead = readahead
        self.chunk_size = image.chunk_size
        self.error: str | None = None
        self.requests = 0
        self.faults = 0
        self.pages = 0
        self.busy_s = 0.0
        self.first_request_at: float | None = None
        self.done = threading.Event()
        self._touched: set[tuple[int, int]] = set()
        self.touched: list[tuple[int, int]] = []  # (casfs entry, chunk number), first fault touch order
        self._fetched: set[tuple[int, int]] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> "PageServer":
        self._thread = threading.Thread(target=self._run, name="casfs-page-server", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the daemon said goodbye (all pages sent) or the connection ended."""
        return self.done.wait(timeout)

    def stats(self) -> dict:
        return {"requests": self.requests, "faults": self.faults, "pages": self.pages,
                "busy_s": round(self.busy_s, 4), "error": self.error, "done": self.done.is_set()}

    # -- serving ------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                return None
            buf += got
        return bytes(buf)

    def _fail(self, reason: str) -> None:
        self.error = reason
        log.error("page server: %s", reason)
        if self.on_error is not None:
            try:
                self.on_error(reason)
            except Exception:  # noqa: BLE001 - the socket still closes below
                log.exception("page server: on_error failed")

    def _run(self) -> None:
        try:
            while True:
                head = self._recv_exact(_IOV.size)
                if head is None:
                    break  # the daemon closed without a goodbye (it died, or was killed)
                cmd, nr, vaddr, pid = _IOV.unpack(head)
                cmd &= PS_CMD_MASK
                if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    self.sock.sendall(struct.pack("<i", 0))
                    break
                if cmd != PS_IOV_GET:
                    self._fail(f"unexpected page server command {cmd:#x} from criu lazy-pages")
                    break
                if not self._answer(nr, vaddr, pid):
                    break
        except OSError as e:
            if self.error is None and not self.done.is_set():
                self._fail(f"page server connection failed: {e}")
        finally:
            self.done.set()
            try:
                self.sock.close()
            except OSError:
                pass

    def _answer(self, nr: int, vaddr: int, pid: int) -> bool:
        t0 = time.perf_counter()
        if self.first_request_at is None:
            self.first_request_at = time.monotonic()
        proc = self.processes.get(pid)
        nbytes = nr * PAGE_SIZE
        off = proc.locate(vaddr, nbytes) if proc is not None and 0 < nr <= (1 << 20) else None
        if off is None:
            self._fail(f"criu lazy-pages asked for {nr} pages at {vaddr:#x} of process {pid}, "
                       "which the snapshot does not hold")
            return False
        cs = self.chunk_size
        first, last = off // cs, (off + nbytes - 1) // cs
        if nr == 1:
            self.faults += 1
            key = (proc.entry, first)
            if key not in self._touched:
                self._touched.add(key)
                self.touched.append(key)
        try:
            data = self.image.read_entry(proc.entry, off, nbytes)
        except (casfs.CasfsError, OSError) as e:
            self._fail(f"pages of process {pid} at {vaddr:#x} could not be read from the store: {e}")
            return False
        if len(data) != nbytes:
            self._fail(f"the snapshot's pages file of process {pid} is short at {vaddr:#x}")
            return False
        self._read_ahead(proc.entry, last)
        self.sock.sendall(_IOV.pack(PS_IOV_ADD_F | (PE_PRESENT << 16), nr, vaddr, pid))
        self.sock.sendall(data)
        self.requests += 1
        self.pages += nr
        self.busy_s += time.perf_counter() - t0
        return True

    def _read_ahead(self, entry: int, last: int) -> None:
        if self.readahead <= 0:
            return
        size = self.image.index.size(entry)
        for j in range(last + 1, last + 1 + self.readahead):
            if j * self.chunk_size >= size:
                break
            if (entry, j) in self._fetched:
                continue
            self._fetched.add((entry, j))
            try:
                self.image.prefetch_entry(entry, j * self.chunk_size, self.chunk_size)
            except (casfs.CasfsError, RuntimeError):
                return


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a connected stream socket pair; ``theirs`` is inheritable, for CRIU."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(theirs.fileno(), True)
    return ours, theirs
