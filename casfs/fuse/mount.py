"""Mounting an image: the daemon, its readiness handshake, kernel tuning, control socket, umount.

``mount(image, mountpoint)`` returns once the mount answers. By default the filesystem is
served by a daemon process: forked after the index is loaded when the calling process has no
other threads (the CLI: no second index load, no interpreter start), else re-executed as
``casfs mount ... --foreground --ready-fd N``. Either way the daemon signals readiness through
a pipe only after the kernel's FUSE_INIT was answered and the kernel was tuned (tuning before
INIT would be undone by it), and the caller then stats the mount point to see it answer.

Each mount has a record in the runtime directory (``$CASFS_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/casfs``, else ``/run/casfs`` for root, else ``/tmp/casfs-<uid>``), named by a
hash of the mount point: ``<key>.json`` (pid, image, socket, log), ``<key>.sock`` (the control
socket: one JSON request line, one JSON reply line; commands ``ping``, ``stats``,
``profile-stop``) and ``<key>.log`` (the daemon's log). SIGTERM or SIGINT to the daemon
unmounts and exits; so does ``umount``/``fusermount3 -u`` of the mount point.

Kernel tuning (root only; skipped with a log line otherwise): ``read_ahead_kb`` of the mount's
bdi (``/sys/class/bdi/<maj>:<min>/``), and ``max_background`` / ``congestion_threshold`` of its
FUSE connection (``/sys/fs/fuse/connections/<dev>/``; fusectl is mounted there if absent).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import CasfsError

if TYPE_CHECKING:
    from ..image import Image

log = logging.getLogger("casfs.fuse")

# Chosen from benchmarks/bench_readahead.py on this machine class (see that file's notes):
# 1 MiB requests are libfuse 3.14's cap; more readahead only helps with more background requests.
DEFAULT_READ_AHEAD_KB = 1024
DEFAULT_MAX_BACKGROUND = 64
DEFAULT_PROFILE_SECONDS = 30.0
FUSECTL_DIR = "/sys/fs/fuse/connections"


class MountError(CasfsError):
    """A mount could not be started, found, or stopped."""


@dataclass
class MountOptions:
    """How to serve a mount.

    Attributes:
        allow_other: let users other than the mounter see the files (needs root or
            ``user_allow_other`` in /etc/fuse.conf).
        read_ahead_kb: kernel readahead for the mount in KiB (None: the default above).
        max_background: FUSE background requests in flight (None: the default above).
        record_profile: record a startup profile for this many seconds (None: do not).
        replay_profile: prefetch the image's stored startup profile in the background.
        readahead: user-space sequential readahead and safetensors prefetch.
        fetch_threads: chunk fetches running at once for foreground reads.
        replay_concurrency: profile chunks fetched at once while no foreground read waits.
        timeout: seconds the kernel caches entries and attributes.
        log_file: the daemon's log (None: ``<runtime dir>/<key>.log``).
        verbose: 0 warnings, 1 info, 2 debug.
    """

    allow_other: bool = False
    read_ahead_kb: int | None = None
    max_background: int | None = None
    record_profile: float | None = None
    replay_profile: bool = True
    readahead: bool = True
    fetch_threads: int = 32
    replay_concurrency: int = 4
    timeout: float = 86400.0
    log_file: str | None = None
    verbose: int = 1


@dataclass
class MountInfo:
    """A running mount, as recorded in the runtime directory."""

    mountpoint: str
    pid: int
    image_id: str
    name: str
    store_url: str
    socket: str
    log: str
    started: float
    pid_start: str = ""
    kernel: dict = field(default_factory=dict)

    def control(self, cmd: str, timeout: float = 30.0, **kw: Any) -> dict:
        """Send ``cmd`` to the daemon's control socket; returns its JSON reply."""
        return control(self.mountpoint, cmd, timeout=timeout, **kw)


# ---------------------------------------------------------------------------------------------
# runtime records


def runtime_dir() -> str:
    """Where mount records, control sockets and daemon logs live (created 0700)."""
    d = os.environ.get("CASFS_RUNTIME_DIR")
    if not d:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            d = os.path.join(xdg, "casfs")
        elif os.geteuid() == 0:
            d = "/run/casfs"
        else:
            d = f"/tmp/casfs-{os.getuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def resolve(mountpoint: str) -> str:
    """Absolute, symlink-free path of ``mountpoint`` without touching the mount point itself.

    Only its parent is resolved: stat'ing a mount point blocks while its daemon does not
    answer, and would deadlock the daemon itself.
    """
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    if not name:
        return path
    return os.path.join(os.path.realpath(parent), name)


def _key(mountpoint: str) -> str:
    return hashlib.sha256(resolve(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _record_path(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), _key(mountpoint) + ".json")


def _proc_start(pid: int) -> str:
    """Start time of ``pid`` (field 22 of /proc/pid/stat): tells a reused pid from ours."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    rest = data.rpartition(b")")[2].split()
    return rest[19].decode() if len(rest) > 19 else ""


def _alive(pid: int, start: str = "") -> bool:
    """True while ``pid`` runs (a zombie counts as gone), and is the process started at ``start``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    rest = data.rpartition(b")")[2].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return False
    return not start or (len(rest) > 19 and rest[19].decode() == start)


def read_record(mountpoint: str) -> MountInfo | None:
    """The record of the casfs mount at ``mountpoint``, or None."""
    try:
        with open(_record_path(mountpoint)) as f:
            data = json.load(f)
        return MountInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_record(info: MountInfo) -> None:
    path = _record_path(info.mountpoint)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(info), f)
    os.rename(tmp, path)


def _remove_record(mountpoint: str, pid: int) -> None:
    rec = read_record(mountpoint)
    if rec is not None and rec.pid != pid:
        return  # a newer mount owns it
    key = os.path.join(runtime_dir(), _key(mountpoint))
    for suffix in (".json", ".sock"):
        try:
            os.unlink(key + suffix)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# /proc/self/mountinfo and kernel tuning


def _unescape(field_: str) -> str:
    return field_.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape") \
        if "\\" in field_ else field_


def find_mount(mountpoint: str) -> tuple[int, int, str] | None:
    """(major, minor, fstype) of the topmost mount at ``mountpoint``, or None."""
    target = resolve(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 10 or _unescape(parts[4]) != target:
                    continue
                sep = parts.index("-", 6)
                maj, _, mn = parts[2].partition(":")
                found = (int(maj), int(mn), parts[sep + 1])
    except OSError:
        return None
    return found


def is_mounted(mountpoint: str) -> bool:
    """True when a FUSE casfs mount sits at ``mountpoint``."""
    m = find_mount(mountpoint)
    return m is not None and m[2].startswith("fuse")


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def ensure_fusectl() -> bool:
    """Mount fusectl at /sys/fs/fuse/connections when it is not mounted (root). True if usable."""
    m = find_mount(FUSECTL_DIR)
    if m is not None and m[2] == "fusectl":
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL_DIR):
        return False
    if _libc().mount(b"fusectl", FUSECTL_DIR.encode(), b"fusectl", 0, None) != 0:
        e = __import__("ctypes").get_errno()
        if e != errno.EBUSY:
            log.warning("cannot mount fusectl at %s: %s", FUSECTL_DIR, os.strerror(e))
            return False
    return True


def _write_sys(path: str, value: int) -> str | None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"


def tune_kernel(mountpoint: str, read_ahead_kb: int, max_background: int) -> dict:
    """Set the kernel's readahead and FUSE background limits for the mount at ``mountpoint``.

    Must run after the kernel's FUSE_INIT was answered (INIT resets readahead). Failures are
    logged and reported in the result, never raised: a mount works untuned, only slower.
    """
    out: dict[str, Any] = {"errors": []}
    m = find_mount(mountpoint)
    if m is None:
        out["errors"].append(f"{mountpoint} is not in /proc/self/mountinfo")
        return out
    maj, mn, _ = m
    out["device"] = f"{maj}:{mn}"
    bdi = f"/sys/class/bdi/{maj}:{mn}/read_ahead_kb"
    err = _write_sys(bdi, read_ahead_kb)
    if err:
        out["errors"].append(err)
    else:
        out["read_ahead_kb"] = read_ahead_kb
    if ensure_fusectl():
        conn = os.path.join(FUSECTL_DIR, str((maj << 20) | mn))
        congestion = max(1, max_background * 3 // 4)
        # raise max_background first: congestion_threshold may not exceed it
        for name, value in (("max_background", max_background), ("congestion_threshold", congestion)):
            err = _write_sys(os.path.join(conn, name), value)
            if err:
                out["errors"].append(err)
            else:
                out[name] = value
    else:
        out["errors"].append("fusectl is not available (not root?)")
    for e in out["errors"]:
        log.warning("kernel tuning: %s", e)
    return out


# ---------------------------------------------------------------------------------------------
# control socket (client side)


def control(mountpoint: str, cmd: str, timeout: float = 30.0, **kw: Any) -> dict:
    """Send one command to the daemon serving ``mountpoint``; returns its JSON reply.

    Raises:
        MountError: when no daemon serves it or it does not answer.
    """
    import socket

    rec = read_record(mountpoint)
    if rec is None:
        raise MountError(f"{mountpoint}: no casfs mount recorded here (see `casfs mount`)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(rec.socket)
        s.sendall(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            got = s.recv(65536)
            if not got:
                break
            buf += got
    except OSError as e:
        raise MountError(f"{mountpoint}: the casfs daemon (pid {rec.pid}) does not answer: "
                         f"{e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise MountError(f"{mountpoint}: bad reply from the casfs daemon: {buf[:200]!r}") from None
    if not reply.get("ok"):
        raise MountError(f"{mountpoint}: {reply.get('error', 'command failed')}")
    return reply


# ---------------------------------------------------------------------------------------------
# serving (the daemon's side)


def _setup_logging(path: str, verbose: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s casfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.WARNING - 10 * min(max(verbose, 0), 2))


def serve(image: "Image", mountpoint: str, options: MountOptions | None = None, *,
          on_ready: Callable[[MountInfo], None] | None = None,
          on_error: Callable[[str], None] | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it in this process until unmounted.

    Returns after the filesystem was unmounted (``umount``, SIGTERM or SIGINT). ``on_ready``
    is called (on the event loop) once the mount answers; ``on_error`` with a message when
    mounting fails (the exception is raised too).

    Raises:
        MountError: when the mount point is unusable or FUSE cannot mount.
    """
    import pyfuse3
    import trio

    from ..prefetch import ProfileRecorder
    from .ops import CasfsOperations

    opts = options or MountOptions()
    mountpoint = resolve(mountpoint)
    try:
        if is_mounted(mountpoint):
            raise MountError(f"{mountpoint}: something is already mounted here (casfs umount {mountpoint})")
        if not os.path.isdir(mountpoint):
            raise MountError(f"{mountpoint}: mount point is not a directory")
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse is missing: load the fuse module or run with --device /dev/fuse")
    except MountError as e:
        if on_error:
            on_error(str(e))
        raise
    key = os.path.join(runtime_dir(), _key(mountpoint))
    info = MountInfo(mountpoint=mountpoint, pid=os.getpid(), image_id=image.id, name=image.name,
                     store_url=image.store.url, socket=key + ".sock", log=opts.log_file or key + ".log",
                     started=time.time(), pid_start=_proc_start(os.getpid()))
    recorder = ProfileRecorder(image) if opts.record_profile else None
    ops = CasfsOperations(image, timeout=opts.timeout, fetch_threads=opts.fetch_threads,
                          readahead=opts.readahead, recorder=recorder)
    fuse_opts = {"fsname=casfs", f"subtype=casfs", "ro", "default_permissions"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    inited = threading.Event()
    base_init = ops.init

    def init_hook() -> None:
        base_init()
        inited.set()

    ops.init = init_hook  # type: ignore[method-assign]
    try:
        pyfuse3.init(ops, mountpoint, fuse_opts)
    except RuntimeError as e:
        msg = f"{mountpoint}: FUSE mount failed ({e}); is /dev/fuse usable and are you root?"
        if on_error:
            on_error(msg)
        raise MountError(msg) from None
    state: dict[str, Any] = {"replayer": None, "profile_key": None}
    save_lock = threading.Lock()

    def save_recording() -> dict:
        from ..prefetch import save_profile

        with save_lock:
            if recorder is None:
                raise MountError("this mount is not recording a profile (mount with --record-profile)")
            if state["profile_key"] is not None:
                return {"key": state["profile_key"], "chunks": state["profile_chunks"]}
            prof = recorder.stop()
            k = save_profile(image.store, prof)
            state["profile_key"], state["profile_chunks"] = k, len(prof.items)
            log.info("startup profile saved: %s (%d chunks, %d bytes)", k, len(prof.items), prof.raw_bytes)
            return {"key": k, "chunks": len(prof.items)}

    def stats() -> dict:
        rep = state["replayer"]
        return {
            "mount": ops.stats(), "tiers": [t.as_dict() for t in image.store.chunks.stats()],
            "replay": rep.as_dict() if rep else None,
            "profile": {"recording": bool(recorder and recorder.active),
                        "chunks": len(recorder) if recorder else 0, "saved": state["profile_key"]},
            "kernel": info.kernel, "image": image.id, "pid": os.getpid(),
        }

    async def handle_control(stream: Any) -> None:
        try:
            buf = b""
            with trio.move_on_after(10):
                while not buf.endswith(b"\n") and len(buf) < 65536:
                    got = await stream.receive_some(65536)
                    if not got:
                        break
                    buf += got
            try:
                req = json.loads(buf or b"{}")
                cmd = req.get("cmd")
                if cmd == "ping":
                    reply: dict = {"ok": True, "pid": os.getpid()}
                elif cmd == "stats":
                    reply = {"ok": True, **stats()}
                elif cmd == "profile-stop":
                    reply = {"ok": True, **(await trio.to_thread.run_sync(save_recording))}
                else:
                    reply = {"ok": False, "error": f"unknown command {cmd!r} (ping, stats, profile-stop)"}
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the daemon
                reply = {"ok": False, "error": str(e)}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def control_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            os.unlink(info.socket)
        except OSError:
            pass
        await sock.bind(info.socket)
        os.chmod(info.socket, 0o600)
        sock.listen(16)
        task_status.started()
        await trio.serve_listeners(handle_control, [trio.SocketListener(sock)])

    async def watch_signals(cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %d: unmounting %s", sig, mountpoint)
                cancel.cancel()
                return

    async def record_timer(seconds: float) -> None:
        await trio.sleep(seconds)
        if recorder is not None and recorder.active:
            try:
                await trio.to_thread.run_sync(save_recording)
            except Exception as e:  # noqa: BLE001
                log.error("saving the startup profile failed: %s", e)

    def start_replay() -> None:
        from ..prefetch import ProfileReplayer, check_profile, load_profile

        try:
            prof = load_profile(image.store, image.id)
        except Exception as e:  # noqa: BLE001 - no profile is not an error
            log.warning("startup profile of %s unusable: %s", image.id[:12], e)
            return
        if prof is None:
            return
        items = check_profile(prof, image)
        refs = []
        seen = set()
        for it in items:
            if it.ref.digest not in seen:
                seen.add(it.ref.digest)
                refs.append(it.ref)
        store = image.store
        if store.memory is not None and not any(t.writable and not t.decoded for t in store.chunks.tiers):
            # nothing below memory keeps what we fetch: fetching past its capacity evicts
            budget, kept = store.memory.capacity * 3 // 4, []
            for r in refs:
                budget -= r.raw_len
                if budget < 0:
                    break
                kept.append(r)
            refs = kept
        rep = ProfileReplayer(store, refs, image.index.pack_members, concurrency=opts.replay_concurrency,
                              foreground_busy=lambda: ops.foreground_waiting > 0)
        state["replayer"] = rep
        log.info("replaying startup profile: %d chunks", len(refs))
        rep.start()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            await nursery.start(control_server)
            nursery.start_soon(watch_signals, nursery.cancel_scope)

            async def fuse_loop() -> None:
                try:
                    await pyfuse3.main(min_tasks=2, max_tasks=(opts.max_background or DEFAULT_MAX_BACKGROUND) + 64)
                finally:
                    nursery.cancel_scope.cancel()  # unmounted from outside: stop everything

            nursery.start_soon(fuse_loop)
            while not inited.is_set():
                await trio.sleep(0.001)
            await trio.sleep(0)
            info.kernel = tune_kernel(mountpoint, opts.read_ahead_kb or DEFAULT_READ_AHEAD_KB,
                                      opts.max_background or DEFAULT_MAX_BACKGROUND)
            _write_record(info)
            if opts.replay_profile:
                start_replay()
            if recorder is not None:
                nursery.start_soon(record_timer, float(opts.record_profile))  # type: ignore[arg-type]
            log.info("serving image %s (%s) at %s", image.name, image.id[:12], mountpoint)
            if on_ready:
                on_ready(info)

    clean = False
    try:
        trio.run(main)
        clean = True
    finally:
        rep = state["replayer"]
        if rep is not None:
            rep.stop()
        if recorder is not None and recorder.active:
            try:
                save_recording()
            except Exception as e:  # noqa: BLE001
                log.error("saving the startup profile failed: %s", e)
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:  # noqa: BLE001
            log.error("unmounting %s failed: %s", mountpoint, e)
        if is_mounted(mountpoint):
            _detach(mountpoint)
        _remove_record(mountpoint, os.getpid())
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


# ---------------------------------------------------------------------------------------------
# starting a daemon (the caller's side)


def _forkable(image: "Image") -> bool:
    """Forking is safe only while this process has no other threads (and the store's pools none)."""
    if threading.active_count() > 1:
        return False
    chunks = image.store.chunks
    for pool in (getattr(chunks, "_io", None), getattr(chunks, "_wb", None)):
        if pool is not None and getattr(pool, "_threads", None):
            return False
    return True


def _read_ready(fd: int, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return "error the casfs daemon did not become ready in time"
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            got = os.read(fd, 4096)
            if not got:
                break
            buf += got
    finally:
        os.close(fd)
    return buf.decode("utf-8", "replace").strip()


def mount(image: "Image", mountpoint: str, options: MountOptions | None = None, *,
          foreground: bool = False, ready_timeout: float = 60.0, **kw: Any) -> MountInfo:
    """Mount ``image`` read-only at ``mountpoint``; returns once the mount answers.

    Options come as a ``MountOptions`` or as its fields by keyword
    (``casfs.mount(image, "/mnt/x", read_ahead_kb=4096, record_profile=30)``).

    With ``foreground=True`` this process serves the mount and the call returns only after
    it was unmounted. Otherwise a daemon serves it (see the module docstring); stop it with
    ``unmount(mountpoint)``.

    Raises:
        MountError: when the daemon fails to mount (its message says why; its log has more).
    """
    if options is not None and kw:
        raise TypeError("pass options either as a MountOptions or as keywords, not both")
    opts = options or MountOptions(**kw)
    mountpoint = resolve(mountpoint)
    if foreground:
        got: list[MountInfo] = []
        serve(image, mountpoint, opts, on_ready=got.append)
        if not got:
            raise MountError(f"{mountpoint}: the mount ended before it was ready")
        return got[0]
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint}: something is already mounted here (casfs umount {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: mount point is not a directory")
    key = os.path.join(runtime_dir(), _key(mountpoint))
    log_path = opts.log_file or key + ".log"
    r, w = os.pipe()
    if _forkable(image):
        _fork_daemon(image, mountpoint, opts, r, w, log_path)
    else:
        _spawn_daemon(image, mountpoint, opts, r, w, log_path)
    msg = _read_ready(r, ready_timeout)
    if not msg.startswith("ready"):
        detail = msg.partition(" ")[2] if msg.startswith("error") else \
            f"the casfs daemon exited before mounting (see {log_path})"
        raise MountError(detail)
    os.stat(mountpoint)  # returns once the mount answers
    rec = read_record(mountpoint)
    if rec is None:
        raise MountError(f"{mountpoint}: the daemon reported ready but left no record in {runtime_dir()}")
    return rec


def _daemon_body(image: "Image", mountpoint: str, opts: MountOptions, w: int, log_path: str) -> int:
    """Runs in the daemon: detach stdio, serve, report readiness or failure on ``w``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(logfd, 2)
    os.close(devnull)
    os.close(logfd)
    _setup_logging(log_path, opts.verbose)
    told = [False]

    def tell(line: str) -> None:
        if not told[0]:
            told[0] = True
            try:
                os.write(w, (line.replace("\n", " ") + "\n").encode())
            except OSError:
                pass
            os.close(w)

    try:
        serve(image, mountpoint, opts, on_ready=lambda info: tell(f"ready {os.getpid()}"),
              on_error=lambda m: tell(f"error {m}"))
        return 0
    except BaseException as e:  # noqa: BLE001 - reported through the pipe and the log
        log.exception("casfs daemon failed")
        tell(f"error {e}")
        return 1


def _fork_daemon(image: "Image", mountpoint: str, opts: MountOptions, r: int, w: int, log_path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once; the daemon is reparented
        return
    code = 1
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        code = _daemon_body(image, mountpoint, opts, w, log_path)
    finally:
        logging.shutdown()
        os._exit(code)


_spawned: list[subprocess.Popen] = []


def _spawn_daemon(image: "Image", mountpoint: str, opts: MountOptions, r: int, w: int, log_path: str) -> None:
    store = image.store
    argv = [sys.executable, "-m", "casfs.cli.main", "--store", store.url]
    if store.cache_dir:
        argv += ["--cache-dir", store.cache_dir]
    argv += ["-" + "v" * opts.verbose] if opts.verbose else []
    argv += ["mount", image.id, mountpoint, "--foreground", "--ready-fd", str(w), "--log-file", log_path]
    if opts.allow_other:
        argv.append("--allow-other")
    if opts.read_ahead_kb:
        argv += ["--read-ahead-kb", str(opts.read_ahead_kb)]
    if opts.max_background:
        argv += ["--max-background", str(opts.max_background)]
    if opts.record_profile:
        argv += ["--record-profile", str(opts.record_profile)]
    if not opts.replay_profile:
        argv.append("--no-profile")
    if not opts.readahead:
        argv.append("--no-readahead")
    with open(log_path, "ab") as logf:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                             pass_fds=(w,), start_new_session=True, cwd="/")
    os.close(w)
    _spawned.append(p)


# ---------------------------------------------------------------------------------------------
# unmounting


def _detach(mountpoint: str) -> None:
    """Lazily detach a mount (root: umount2 MNT_DETACH; else fusermount3 -u -z)."""
    if os.geteuid() == 0:
        if _libc().umount2(mountpoint.encode("utf-8", "surrogateescape"), 2) == 0:
            return
        e = __import__("ctypes").get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        log.warning("umount2(%s) failed: %s", mountpoint, os.strerror(e))
    for tool in ("fusermount3", "fusermount"):
        try:
            subprocess.run([tool, "-u", "-z", mountpoint], check=False, capture_output=True, timeout=30)
            return
        except FileNotFoundError:
            continue


def unmount(mountpoint: str, timeout: float = 20.0) -> None:
    """Unmount the casfs mount at ``mountpoint`` and wait for its daemon to exit.

    The daemon is asked with SIGTERM (it unmounts and saves a profile being recorded); a
    daemon that is gone or stuck is replaced by a lazy detach (SIGKILL after ``timeout``).

    Raises:
        MountError: when nothing casfs is mounted (or recorded) at ``mountpoint``.
    """
    mountpoint = resolve(mountpoint)
    rec = read_record(mountpoint)
    mounted = is_mounted(mountpoint)
    if rec is None and not mounted:
        raise MountError(f"{mountpoint}: no casfs mount here")
    if rec is not None and _alive(rec.pid, rec.pid_start):
        os.kill(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(rec.pid, rec.pid_start) and time.monotonic() < deadline:
            _reap(rec.pid)
            time.sleep(0.01)
        if _alive(rec.pid, rec.pid_start):
            log.warning("casfs daemon %d did not exit in %.0f s: killing it", rec.pid, timeout)
            os.kill(rec.pid, signal.SIGKILL)
        _reap(rec.pid)
    if is_mounted(mountpoint):
        _detach(mountpoint)
    if rec is not None:
        _remove_record(mountpoint, rec.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
