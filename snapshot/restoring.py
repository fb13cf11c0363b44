"""Restoring a CPU snapshot: the image back on this host, what CRIU does not carry put back,
``criu restore`` run (eagerly, or with CRIU's lazy-pages daemon serving pages on first touch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable

import casfs

from . import criu as criumod, lazyrestore, lifecycle, pageserver
from .checkpointing import RESTORE_FLAGS
from .compat import IncompatibleHost
from .criu import CriuError
from .exports import exported, materialize
from .hostkey import restore_problems
from .meta import SnapshotRef, read_meta
from .shm import mapped_anywhere
from .spawning import ready_caller_pid

__all__ = ["RestoredProcess", "restore"]

log = logging.getLogger("snapshot.cpu")

def _stored_name_ok(stored: str) -> bool:
    """A stored copy is a relative path inside the image without ``..`` (checkpointing writes
    ``casfs-extra/<kind>/<hex>``)."""
    parts = stored.split("/")
    return bool(stored) and "\0" not in stored and not stored.startswith("/") \
        and all(p not in ("", ".", "..") for p in parts)


def _host_item(kind: str, item: object) -> tuple[str, str]:
    """(host path, stored name) of a /dev/shm segment or link_remap file the snapshot's
    metadata asks to put back, checked: the metadata comes from the image, and an image must
    not choose where on this host its bytes are written. A segment goes directly under
    /dev/shm; a link_remap file is named ``link_remap.*`` (CRIU's name) at a normalised
    absolute path; the stored copy is a relative path inside the image (no ``..``).

    Raises:
        CriuError: naming the entry that breaks these rules.
    """
    path = item.get("path") if isinstance(item, dict) else None
    stored = item.get("stored") if isinstance(item, dict) else None
    ok = (isinstance(path, str) and isinstance(stored, str) and "\0" not in path
          and os.path.isabs(path) and os.path.normpath(path) == path
          and _stored_name_ok(stored))
    if ok and kind == "shm":
        ok = os.path.dirname(path) == "/dev/shm"
    elif ok:
        ok = os.path.basename(path).startswith("link_remap.")
    if not ok:
        raise CriuError(f"snapshot metadata lists a {kind} file {path!r} (stored as {stored!r}) that "
                        "is not one this casfs puts back: refusing to restore from this image")
    return path, stored



def _zeros(n: int, _cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 - a cache on purpose
    z = _cache.get(n)
    if z is None:
        z = _cache[n] = bytes(n)
    return z


def _copy_sparse(read, size: int, block: int, dest: str, mode: int) -> None:
    """Write ``size`` bytes from ``read(offset, n)`` (called per ``block``) to the new file
    ``dest`` (mode ``mode``), leaving holes where whole blocks are zero (vLLM's /dev/shm rings
    are hundreds of MB, mostly zero). ``dest`` must not exist (a planted name is never written
    through); it is removed again when the copy fails.

    Raises:
        FileExistsError: ``dest`` exists. OSError: a short read or a failed write.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)
        off = 0
        while off < size:
            n = min(block, size - off)
            data = read(off, n)
            if data is None:  # known zero
                off += n
                continue
            if len(data) != n:
                raise OSError(f"short read of a stored file for {dest}")
            if data != _zeros(n):
                os.pwrite(fd, data, off)
            off += n
        os.ftruncate(fd, size)
    except BaseException:
        os.unlink(dest)  # ours: created with O_EXCL above
        raise
    finally:
        os.close(fd)


def _stored_reader(image: casfs.Image | None, imgdir: str | None, rel: str):
    """(read(offset, n), size, block) of a file saved with the snapshot: from the image's
    directory on this host, or (source="store") straight from the store, chunk by chunk, each
    verified; ``read`` returns None for a chunk known to be zero: one seen all-zero once is
    zero wherever its digest recurs (vLLM's 400 MB of /dev/shm rings are thousands of copies
    of one zero chunk)."""
    if imgdir is not None:
        path = os.path.join(imgdir, rel)

        def read_file(off: int, n: int) -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), n, off)
        return read_file, os.path.getsize(path), 1 << 20
    assert image is not None
    entry = image.lookup(rel)
    refs = image.chunk_refs(entry)
    cs = image.file_chunk_size(entry)
    zero: dict[bytes, bool] = {}

    def read_stored(off: int, n: int) -> bytes | None:
        ref = refs[off // cs]
        if zero.get(ref.digest):
            return None
        data = image.read_entry(entry, off, n)
        zero[ref.digest] = len(data) == ref.raw_len and data == _zeros(len(data))
        return data
    return read_stored, image.index.size(entry), cs


def _prepare_host(meta: dict, imgdir: str | None, image: casfs.Image | None = None) -> None:
    """Put back what CRIU does not carry: /dev/shm segments, link_remap files, missing logs.

    The saved copies are read from ``imgdir`` (an export or a mount of the image), or from
    ``image`` in the store when ``imgdir`` is None.

    Raises:
        CriuError: when a file the process had open read-only is missing here, or the metadata
            names a segment or link_remap file outside where those live (``_host_item``).
    """
    for kind in ("shm", "link_remap"):
        for item in meta.get(kind) or []:
            path, stored = _host_item(kind, item)
            if kind == "shm" and os.path.exists(path) and not mapped_anywhere(path):
                with contextlib.suppress(OSError):  # left by an earlier replica: stale contents
                    os.unlink(path)
            if os.path.lexists(path):
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # unique per thread too: concurrent restores may run in one process. O_EXCL and
            # O_NOFOLLOW (in _copy_sparse): /dev/shm is world-writable, a name planted there is
            # never written through
            tmp = f"{path}.casfs-{os.getpid()}-{threading.get_ident()}"
            read, size, block = _stored_reader(image, imgdir, stored)
            _copy_sparse(read, size, block, tmp, item.get("mode", 0o600))  # CRIU checks a link_remap's mode
            try:
                with contextlib.suppress(OSError):
                    os.link(tmp, path)  # never replaces one a concurrent restore put back
            finally:
                os.unlink(tmp)
    missing = []
    for f in meta.get("open_files") or []:
        if os.path.exists(f["path"]):
            continue
        acc = f["flags"] & os.O_ACCMODE
        if acc == os.O_WRONLY and f["flags"] & os.O_APPEND:
            os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
            os.close(os.open(f["path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        else:
            missing.append(f["path"])
    if missing:
        raise CriuError("files the snapshotted process had open are missing on this host: "
                        + ", ".join(missing[:5]) + ": restore where they exist")


class RestoredProcess:
    """A process tree restored by ``restore``.

    A small reaper process stays its parent (so it is reaped and its status known); ``pid`` is the
    restored tree's root (outer PID), ``ready_pid`` the process woken from ``ready()``.
    ``timings`` (seconds): ``open`` (index + metadata + key check), ``fetch`` (images out of
    casfs: the export, the mount, or with ``source="store"`` the metadata images and eager
    pages), ``lazy_start`` (the lazy-pages daemon up; 0 when eager), ``criu`` (restore until
    the tree runs), ``total``; ``cached`` says the export was reused. ``page_server`` (with
    ``source="store"``) serves the lazy pages; ``pages()`` reports what it served.
    """

    def __init__(self, criu_proc: subprocess.Popen, pid: int, ready_pid: int, workdir: str,
                 lazy_proc: subprocess.Popen | None, mountpoint: str | None, image_id: str,
                 timings: dict, page_server: Any = None,
                 after_lazy: list[Callable[[], None]] | None = None) -> None:
        self.criu_proc = criu_proc
        self.pid = pid
        self.ready_pid = ready_pid
        self.workdir = workdir
        self.lazy_proc = lazy_proc
        self.mountpoint = mountpoint
        self.image_id = image_id
        self.timings = timings
        self.page_server = page_server
        self._after_lazy = list(after_lazy or [])
        self._cleanup_lock = threading.Lock()
        self._cleaned = False
        self._releaser: threading.Thread | None = None
        if lazy_proc is not None or mountpoint is not None or page_server is not None:
            self._releaser = threading.Thread(target=self._release_sources, daemon=True,
                                              name=f"snapshot-restore-{pid}")
            self._releaser.start()

    def __repr__(self) -> str:
        return f"<RestoredProcess pid={self.pid} running={self.poll() is None}>"

    def _release_sources(self) -> None:
        """Once the lazy-pages daemon finished: run the after-lazy hooks (the startup profile),
        unmount the image (nothing reads it any more)."""
        if self.lazy_proc is not None:
            self.lazy_proc.wait()
        if self.page_server is not None:
            self.page_server.wait(30)
        for fn in self._after_lazy:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a profile not saved costs only a later prefetch
                log.exception("after the lazy restore of %s", self.image_id[:12])
        if self.mountpoint is not None:
            with contextlib.suppress(casfs.CasfsError, OSError):
                casfs.unmount(self.mountpoint)

    def lazy_done(self, timeout: float | None = None) -> bool:
        """Wait for the lazy-pages daemon to finish serving pages (True at once if eager)."""
        if self.lazy_proc is None:
            return True
        try:
            self.lazy_proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def boot_done(self) -> None:
        """Tell the page server (``source="store"``) that the restored program is up (say, it
        answered its first request): the rest of its memory then streams in at full speed.
        Until then faults come first (``snapshot.pageserver``). A no-op otherwise."""
        if self.page_server is not None:
            self.page_server.boot_done()

    def pages(self) -> dict:
        """What the page server served so far (``source="store"``; {} otherwise): requests,
        faults, pages, seconds busy, the error that ended it if any."""
        return self.page_server.stats() if self.page_server is not None else {}

    def poll(self) -> int | None:
        return self.criu_proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the restored tree to exit; returns its root's exit status (128+N: signal N).

        Raises:
            subprocess.TimeoutExpired: after ``timeout`` seconds.
        """
        rc = self.criu_proc.wait(timeout)
        self.close()
        return rc

    def kill(self, wait: float = 10.0) -> None:
        """Kill the restored tree (SIGKILL to its init) and clean up: ``criu restore`` (and its
        reaper) too when it has not ended ``wait`` seconds later. CRIU 4.2.1 can stay forever
        in its last steps when the tree it restored is killed under it (each full test run
        left three such ``criu restore`` processes behind before this)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.criu_proc.wait(wait)
        except subprocess.TimeoutExpired:
            log.warning("criu restore (pid %d) did not end after its tree was killed: killing it", self.criu_proc.pid)
            for pid in reversed(criumod.process_tree(self.criu_proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.criu_proc.wait(10)
        self.close()

    def close(self) -> None:
        """Remove the restore's work dir (logs) once the tree has exited."""
        with self._cleanup_lock:
            if self._cleaned or self.criu_proc.poll() is None:
                return
            self._cleaned = True
        if self.lazy_proc is not None and self.lazy_proc.poll() is None:
            self.lazy_proc.kill()
            self.lazy_proc.wait()
        if self._releaser is not None:
            self._releaser.join(30)  # the mount under the work dir is gone before it is removed
        shutil.rmtree(self.workdir, ignore_errors=True)


def _open_snapshot(ref: SnapshotRef | str, store: casfs.Store) -> tuple[casfs.Image, dict]:
    name = ref.image_id if isinstance(ref, SnapshotRef) else ref
    image = store.open_image(name)
    return image, read_meta(image)


def _wait_pidfile(proc: subprocess.Popen, path: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n") or text.strip().isdigit():
                return int(text.strip())
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return None


def choose_source(image_id: str, cache_dir: str | None = None, *, uffd: bool) -> str:
    """Where ``restore(..., source="auto")`` reads snapshot image ``image_id``: "export" when
    this host holds a complete export of it (it is still checked before CRIU reads it), else "store" when
    ``uffd`` (the kernel has userfaultfd with non-cooperative events), else "export".

    Why the export first: with the tiny vLLM replica on the 2-core VM an eager restore from an
    export already on the host took 5.8 s to the first token against 9.9-11.4 s for a lazy
    restore from the store with its chunks cached, at load 9-13; 1.15 s against 1.45-1.84 s on a
    quiet VM (docs/benchmarks.md, "serve: replica boot");
    without an export, making one first (15.2 s) loses to the store (5.1-9.4 s).
    """
    if exported(image_id, cache_dir):
        return "export"
    return "store" if uffd else "export"


def restore(ref: SnapshotRef | str, store: casfs.Store, *, lazy: bool | None = None,
            source: str = "export", cache_dir: str | None = None, check: bool = True,
            timeout: float = 300.0, profile: bool = True) -> RestoredProcess:
    """Restore a CPU snapshot (a ``SnapshotRef``, tag or image id) from ``store`` and run it.

    Many restores of one snapshot can run at once (each gets its own PID namespace).

    Args:
        lazy: run the process before its memory arrives (CRIU lazy-pages, userfaultfd).
            Default: True for ``source="store"``, else False.
        source: "auto": "export" when this host already has a complete export of the snapshot
            (``exported``) or ``lazy`` is False, else "store" where the kernel has
            userfaultfd, else "export" (``choose_source``). "store": nothing is unpacked: CRIU's metadata images are written from verified
            reads into the restore's work dir and the memory pages are served from the store
            as the processes touch them (``snapshot.lazyrestore``; lazy only, and ``store``
            must stay open until ``lazy_done()``); "export": the image is exported once per
            host into ``cache_dir`` (default ``snapshot_cache_dir()``) and CRIU reads it there;
            "mount": CRIU reads a casfs FUSE mount of the image (with ``lazy``, pages come from
            the store as they are touched).
        check: refuse a host the snapshot's key does not match.
        profile: (``source="store"``) fetch the pages of the snapshot's startup profile first
            and hand them to CRIU as eager pages, and record one at the first restore (the
            pages its faults touched, in order).

    Raises:
        IncompatibleHost: the key does not match this host (fall back to a cold start).
        CriuError: CRIU failed (the reason from its log, with the fix for known rules).
        CriuUnavailable: no usable CRIU here.
        casfs.ImageNotFound: no such snapshot.
        ValueError: a bad ``source``, ``source="store"`` with ``lazy=False``, or an image that
            is not a snapshot.
    """
    if source not in ("auto", "export", "mount", "store"):
        raise ValueError(f"source must be 'auto', 'store', 'export' or 'mount', not {source!r}")
    if source == "store" and lazy is False:
        raise ValueError("source='store' restores lazily (the pages stay in the store): pass "
                         "lazy=True, or source='export' for an eager restore")
    t0 = time.perf_counter()
    criu = criumod.find_criu()
    image, meta = _open_snapshot(ref, store)
    if source == "auto":  # an eager restore (lazy=False) can only come from the export
        source = choose_source(image.id, cache_dir, uffd=lazy is not False and bool(criu.features.get("uffd-noncoop")))
    if lazy is None:
        lazy = source == "store"
    if lazy and not criu.features.get("uffd-noncoop", False):
        raise CriuError("lazy restore needs userfaultfd with non-cooperative events, which this "
                        "kernel lacks: restore with lazy=False" + (", source='export'" if source == "store" else ""))
    if check:
        key = dict(meta["key"])  # files put back by _prepare_host need not be here yet
        own = {i["path"] for kind in ("shm", "link_remap") for i in meta.get(kind) or []}
        key["files"] = {p: n for p, n in (key.get("files") or {}).items() if p not in own}
        problems = restore_problems(key, criu)
        if problems:
            raise IncompatibleHost(problems)
    t_open = time.perf_counter() - t0
    work = tempfile.mkdtemp(prefix="casfs-restore-")
    staged = None  # a restore from the store stages CRIU's images and eager pages in RAM
    mountpoint = None
    lazy_proc = None
    server = None
    record = False
    after_lazy: list[Callable[[], None]] = []
    victim: dict[str, Any] = {"pid": None, "proc": None}
    cached = False
    try:
        if source == "store":
            hot: dict = {}
            hot_data = None
            if profile:
                record, hot, hot_data = lazyrestore.startup_profile(image)
            staged = tempfile.mkdtemp(prefix="casfs-restore-images-",
                                      dir="/dev/shm" if os.path.isdir("/dev/shm") else work)
            prep = lazyrestore.prepare_images(image, staged, meta, hot, hot_data)
            imgdir = prep.imgdir
            _prepare_host(meta, None, image)
        elif source == "mount":
            if (meta.get("layout") or {}).get("kind") == "windows":
                raise ValueError(f"snapshot {image.name} stores its pages by address window, which "
                                 "CRIU cannot read through a mount: restore with source='store' "
                                 "(lazy) or 'export'")
            mountpoint = os.path.join(work, "images")
            os.mkdir(mountpoint)
            casfs.mount(image, mountpoint)
            imgdir = mountpoint
            _prepare_host(meta, imgdir)
        else:
            imgdir, cached = materialize(image, cache_dir)
            _prepare_host(meta, imgdir)
        t_fetch = time.perf_counter() - t0 - t_open
        flags = list((meta.get("criu") or {}).get("restore_flags") or RESTORE_FLAGS)
        pidfile = os.path.join(work, "pid")
        args = ["restore", "-D", imgdir, "-W", work, "--pidfile", pidfile, *flags]
        t_lazy = time.perf_counter()
        if lazy:
            sock = os.path.join(work, "lazy-pages.socket")
            lazy_args = ["lazy-pages", "-D", imgdir, "-W", work]
            pass_fds: tuple[int, ...] = ()
            if source == "store":
                ours, theirs = pageserver.socket_pair()
                server = pageserver.PageServer(image, prep.processes, ours, recording=profile and record,
                                               on_error=lambda why: _kill_restore(victim, why),
                                               tree_exited=lambda: _tree_exited(victim))
                if profile and record:
                    after_lazy.append(lambda: lazyrestore.save_startup_profile(image, server))
                server.start()
                lazy_args += ["--page-server", "--ps-socket", str(theirs.fileno())]
                pass_fds = (theirs.fileno(),)
            try:
                lazy_proc = criumod.start(criu, lazy_args, log=os.path.join(work, "lazy-pages.log"),
                                          stderr_path=os.path.join(work, "lazy-pages.err"),
                                          pass_fds=pass_fds)
            finally:
                if source == "store":
                    theirs.close()
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if lazy_proc.poll() is not None or time.monotonic() > deadline:
                    raise criumod.failure("criu lazy-pages did not start",
                                          os.path.join(work, "lazy-pages.log"))
                time.sleep(0.0005)
            args.append("--lazy-pages")
        t2 = time.perf_counter()
        t_lazy = t2 - t_lazy
        proc = criumod.start_restore(criu, args, log=os.path.join(work, "restore.log"),
                                     stderr_path=os.path.join(work, "restore.err"))
        victim["proc"] = proc
        pid = _wait_pidfile(proc, pidfile, timeout)
        if pid is None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            why = f"; {server.error}" if server is not None and server.error else ""
            raise criumod.failure(f"criu restore of {image.name} failed (exit {proc.returncode}){why}",
                                  os.path.join(work, "restore.log"),
                                  extra=criumod.read_tail(os.path.join(work, "restore.err")))
        victim["pid"] = pid
        if server is not None and server.error:  # it failed before the pid was known
            _kill_restore(victim, server.error)
            proc.wait()
            raise CriuError(f"restoring {image.name} from the store failed: {server.error}",
                            log=os.path.join(work, "restore.log"))
        t_criu = time.perf_counter() - t2
    except BaseException:
        if lazy_proc is not None and lazy_proc.poll() is None:
            lazy_proc.kill()
            lazy_proc.wait()
        if server is not None:
            server.sock.close()
        if mountpoint is not None:
            with contextlib.suppress(casfs.CasfsError, OSError):
                casfs.unmount(mountpoint)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        # keep the logs of a failed restore for the user (the message names them)
        raise
    ready_pid = ready_caller_pid(pid, meta.get("ready"))
    if meta.get("ready"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(ready_pid, lifecycle.SIG_RESTORED)
    timings = {"open": t_open, "fetch": t_fetch, "lazy_start": t_lazy, "criu": t_criu, "cached": cached,
               "total": time.perf_counter() - t0, "source": source, "lazy": lazy}
    if source == "store":
        timings["eager_pages"] = prep.eager_pages
        timings["lazy_pages"] = prep.lazy_pages
        timings["profile_pages"] = len(hot)
        timings["hot_image"] = hot_data is not None
        timings["hot_pages"] = prep.hot_pages
        shutil.rmtree(staged, ignore_errors=True)  # CRIU has read them (the daemon holds what it opened)
    return RestoredProcess(proc, pid, ready_pid, work, lazy_proc, mountpoint, image.id, timings,
                           page_server=server, after_lazy=after_lazy)


def _tree_exited(victim: dict, wait: float = 2.0) -> bool:
    """Whether the restored tree has exited: ``criu restore`` (its parent, which passes on its
    exit status) has ended, waiting up to ``wait`` seconds for it (the lazy-pages daemon can
    leave just before it does). False while CRIU has not started."""
    proc = victim.get("proc")
    if proc is None:
        return False
    deadline = time.monotonic() + wait
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_restore(victim: dict, why: str) -> None:
    """The page server failed: kill the restored tree (its memory would be wrong otherwise),
    and CRIU with it when the restore has not finished (CRIU waits for a tree killed under it
    forever): every descendant of the reaper, the tree and ``criu restore`` alike."""
    log.error("killing the restored tree: %s", why)
    proc = victim.get("proc")
    pids = criumod.process_tree(proc.pid)[1:] if proc is not None and proc.poll() is None else []
    if victim.get("pid"):
        pids.append(victim["pid"])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
