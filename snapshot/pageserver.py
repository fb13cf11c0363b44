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
* the first touch of each page by a fault (a one-page request) is recorded in order, for the
  snapshot's startup profile (``snapshot.lazyrestore`` stores and replays it);
* a request for chunk k of a pages file starts fetching chunks k+1..k+``readahead`` in the
  background: the background transfer walks addresses upward;
* faults come first while the program boots (until ``boot_done()``): the daemon asks for the
  rest of memory as soon as the tree runs, and since answers go out in order, a fault queued
  behind a 4 MiB background answer waits for all of it. So a background request is answered
  with a single page when a fault is already queued behind it, and otherwise, after waiting
  briefly for one to show up, with at most ``boot_xfer`` bytes (the daemon asks again for the
  rest). After ``boot_done()`` background requests get all they ask for. A restore that
  records the startup profile holds the background transfer back further (one page per
  request, ``record_wait`` apart) until then, so every page the program touches is a fault.

Measured (2-core VM, docs/benchmarks.md): see ``snapshot.lazyrestore``.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
import select
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
        idle_wait, boot_xfer: until ``boot_done()``, a background request is answered with one
            page when a fault is queued behind it, else after waiting ``idle_wait`` seconds
            for one, with at most ``boot_xfer`` bytes (see the module docstring).
        recording: the restore records the startup profile: until ``boot_done()`` background
            requests get one page each, at most every ``record_wait`` seconds, so that what
            the program touches arrives by fault and is recorded (the whole working set, not
            just what the background transfer had not yet brought).
        boot_window, quiet_s: the boot ends by itself ``boot_window`` seconds after the first
            request, or once no fault came for ``quiet_s`` seconds.
        tree_exited: whether the restored tree has exited (may wait briefly for it): a daemon
            that hangs up without a goodbye is a failure unless it has (see ``_hung_up``).
            None: every such hang-up is a failure.
    """

    def __init__(self, image: casfs.Image, processes: dict[int, ProcessPages], sock: socket.socket, *,
                 on_error: Callable[[str], None] | None = None, readahead: int = 2,
                 idle_wait: float = 0.002, boot_xfer: int = 256 << 10, boot_window: float = 30.0,
                 recording: bool = False, record_wait: float = 0.05, quiet_s: float = 1.0,
                 tree_exited: Callable[[], bool] | None = None) -> None:
        self.image = image
        self.tree_exited = tree_exited
        self.processes = processes
        self.sock = sock
        self.on_error = on_error
        self.readahead = readahead
        self.chunk_size = image.chunk_size  # the largest; a file's own: image.file_chunk_size
        self.error: str | None = None
        self.requests = 0
        self.faults = 0
        self.pages = 0
        self.busy_s = 0.0
        self.first_request_at: float | None = None
        self.done = threading.Event()
        self._touched: set[tuple[int, int]] = set()
        self.touched: list[tuple[int, int]] = []  # (casfs entry, page number in it), first fault order
        self._fetched: set[tuple[int, int]] = set()
        self._thread: threading.Thread | None = None
        self._buf = bytearray()
        self._queue: collections.deque = collections.deque()
        self._booting = True
        self.idle_wait = idle_wait
        self.boot_xfer = boot_xfer
        self.boot_window = boot_window
        self.idle_s = 0.0
        self.recording = recording
        self.record_wait = record_wait
        self.quiet_s = quiet_s
        self.last_fault_at: float | None = None

    def start(self) -> "PageServer":
        self._thread = threading.Thread(target=self._run, name="casfs-page-server", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the daemon said goodbye (all pages sent) or the connection ended."""
        return self.done.wait(timeout)

    def stats(self) -> dict:
        return {"requests": self.requests, "faults": self.faults, "pages": self.pages,
                "busy_s": round(self.busy_s, 4), "idle_wait_s": round(self.idle_s, 4),
                "error": self.error, "done": self.done.is_set()}

    # -- serving ------------------------------------------------------------------------------

    def boot_done(self) -> None:
        """The restored program is up (e.g. answered its first request): from now on the
        background transfer runs at full speed. (Also called ``boot_window`` seconds after the
        first request, for callers that never say.)"""
        self._booting = False

    def _fill(self, wait: float | None) -> bool:
        """Move the requests the daemon sent into the queue. ``wait`` None: block until at
        least one is queued; a number: drain what is there, and if nothing new came, wait up
        to that many seconds for more. Returns False when the daemon hung up."""
        deadline = None if wait is None else time.monotonic() + wait
        before = len(self._queue)
        while True:
            try:
                got = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                got = None
            if got == b"":
                return False
            if got:
                self._buf += got
                while len(self._buf) >= _IOV.size:
                    self._queue.append(_IOV.unpack_from(self._buf, 0))
                    del self._buf[:_IOV.size]
                continue
            if wait is None:
                if self._queue:
                    return True
                timeout = None
            else:
                timeout = deadline - time.monotonic()
                if len(self._queue) > before or timeout <= 0:
                    return True
            select.select([self.sock], [], [], timeout)

    def _fail(self, reason: str) -> None:
        self.error = reason
        log.error("page server: %s", reason)
        if self.on_error is not None:
            try:
                self.on_error(reason)
            except Exception:  # noqa: BLE001 - the socket still closes below
                log.exception("page server: on_error failed")

    def _run(self) -> None:
        hung_up = False
        try:
            while True:
                if not self._queue:
                    if hung_up or not self._fill(None):
                        self._hung_up("between requests")
                        break
                    continue
                cmd, nr, vaddr, pid = self._queue.popleft()
                cmd &= PS_CMD_MASK
                if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    self.sock.sendall(struct.pack("<i", 0))
                    break
                if cmd != PS_IOV_GET:
                    self._fail(f"unexpected page server command {cmd:#x} from criu lazy-pages")
                    break
                if nr > 1 and self._booting:
                    now = time.monotonic()
                    if (self.first_request_at is not None and now - self.first_request_at > self.boot_window) \
                            or (self.last_fault_at is not None and now - self.last_fault_at > self.quiet_s):
                        self._booting = False  # nobody said boot_done(), but the faults stopped
                    else:
                        nr = self._background_share(nr)
                if not self._answer(nr, vaddr, pid):
                    break
                if not hung_up:
                    hung_up = not self._fill(0)
        except (BrokenPipeError, ConnectionResetError) as e:
            self._hung_up(f"while pages were being sent ({e.strerror})")
        except OSError as e:
            if self.error is None and not self.done.is_set():
                self._fail(f"page server connection failed: {e}")
        finally:
            self.done.set()
            try:
                self.sock.close()
            except OSError:
                pass

    def _hung_up(self, when: str) -> None:
        """The daemon closed the connection without the goodbye (PS_IOV_CLOSE / FORCE_CLOSE)
        this loop answers. That is the end of the restore when the restored tree has exited:
        criu lazy-pages 4.2.1 can even die of its own ``BUG_ON(list_empty(&async_reads))``
        (criu/page-xfer.c) when an answer arrives after the exit of the process that asked
        for it. Under a running tree it is a failure: the daemon is gone, and the kernel would
        serve the tree's later faults as zero-filled pages."""
        if self.error is not None:
            return
        try:  # what the daemon sent before it left: a goodbye behind the answer it did not read
            self._fill(0)
        except OSError:
            pass
        if any(q[0] & PS_CMD_MASK in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE) for q in self._queue):
            log.info("page server: criu lazy-pages said goodbye and hung up %s", when)
            return
        if self.tree_exited is not None and self.tree_exited():
            log.info("page server: criu lazy-pages hung up %s, after the restored tree exited", when)
            return
        self._fail(f"criu lazy-pages hung up {when} without a goodbye")

    def _background_share(self, nr: int) -> int:
        """How many pages of a background request to send while the program boots: one when a
        fault waits behind it (answers go out in order, so the fault waits for this one); else,
        after waiting ``idle_wait`` seconds for a fault to show up, up to ``boot_xfer`` bytes."""
        if not any(q[1] == 1 for q in self._queue):
            t = time.monotonic()
            self._fill(self.record_wait if self.recording else self.idle_wait)
            self.idle_s += time.monotonic() - t
        if self.recording or any(q[1] == 1 for q in self._queue):
            return 1
        return max(1, min(nr, self.boot_xfer // PAGE_SIZE))

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
        cs = self.image.file_chunk_size(proc.entry)  # each pages file has its own chunk size
        first, last = off // cs, (off + nbytes - 1) // cs
        if nr == 1:
            self.faults += 1
            self.last_fault_at = time.monotonic()
            key = (proc.entry, off // PAGE_SIZE)
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
        cs = self.image.file_chunk_size(entry)
        for j in range(last + 1, last + 1 + self.readahead):
            if j * cs >= size:
                break
            if (entry, j) in self._fetched:
                continue
            self._fetched.add((entry, j))
            try:
                self.image.prefetch_entry(entry, j * cs, cs)
            except (casfs.CasfsError, RuntimeError):
                return


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a connected stream socket pair; ``theirs`` is inheritable, for CRIU."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(theirs.fileno(), True)
    return ours, theirs
