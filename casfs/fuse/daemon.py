"""The process that serves a mount: the trio loop, control socket, signals, profiles, startup.

``serve()`` runs a mount in the calling process until it is unmounted. ``start()`` gets a
daemon going for ``casfs.mount``: forked when the caller has no other threads (no second
interpreter start or index load), else re-executed as ``casfs mount ... --foreground
--ready-fd N``. The daemon writes one line to the ready pipe (``ready <pid>`` or
``error <message>``) only after the kernel's FUSE_INIT was answered and the kernel was tuned.

Control socket protocol: one JSON request line (``{"cmd": ...}``), one JSON reply line with
``"ok"``. Commands: ``ping``; ``stats`` (mount counters, tier stats, replay progress, profile
state, kernel tuning); ``profile-stop`` (stop recording, store the profile, reply with its
key). SIGTERM, SIGINT and SIGHUP unmount and exit; so does an outside ``umount``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..lifeline import proc_start
from . import kernel
from .mount import (DEFAULT_MAX_BACKGROUND, DEFAULT_READ_AHEAD_KB, MountError, MountInfo,
                    MountOptions, check_mountpoint, remove_record, runtime_key, write_record)

if TYPE_CHECKING:
    from ..image import Image

log = logging.getLogger("casfs.fuse")


class _Daemon:
    """One mount being served: the pieces ``serve`` wires together on the trio loop."""

    def __init__(self, image: "Image", mountpoint: str, opts: MountOptions) -> None:
        from ..profiles import ProfileRecorder
        from .ops import CasfsOperations

        self.image = image
        self.mountpoint = mountpoint
        self.opts = opts
        key = runtime_key(mountpoint)
        self.info = MountInfo(mountpoint=mountpoint, pid=os.getpid(), image_id=image.id, name=image.name,
                              store_url=image.store.url, socket=key + ".sock",
                              log=opts.log_file or key + ".log", started=time.time(),
                              pid_start=proc_start(os.getpid()))
        self.recorder = ProfileRecorder(image) if opts.record_profile else None
        self.ops = CasfsOperations(image, timeout=opts.timeout, fetch_threads=opts.fetch_threads,
                                   readahead=opts.readahead, recorder=self.recorder)
        self.inited = threading.Event()
        base_init = self.ops.init

        def init_hook() -> None:  # runs while the kernel's FUSE_INIT is being answered
            base_init()
            self.inited.set()

        self.ops.init = init_hook  # type: ignore[method-assign]
        self.replayer: Any = None
        self.profile_saved: dict | None = None
        self._save_lock = threading.Lock()

    # -- profiles ---------------------------------------------------------------------------

    def save_recording(self) -> dict:
        """Stop recording and store the profile (once). Raises MountError when not recording."""
        from ..profiles import save_profile

        with self._save_lock:
            if self.recorder is None:
                raise MountError("this mount is not recording a profile (mount with --record-profile)")
            if self.profile_saved is None:
                prof = self.recorder.stop()
                key = save_profile(self.image.store, prof)
                self.profile_saved = {"key": key, "chunks": len(prof.items)}
                log.info("startup profile saved: %s (%d chunks, %d bytes)", key, len(prof.items), prof.raw_bytes)
            return dict(self.profile_saved)

    def start_replay(self) -> None:
        """Prefetch the image's stored profile in the background (nothing when there is none)."""
        from ..profiles import ProfileReplayer, check_profile, load_profile

        image = self.image
        try:
            prof = load_profile(image.store, image.id)
        except Exception as e:  # noqa: BLE001 - a bad profile only costs its prefetch
            log.warning("startup profile of %s unusable: %s", image.id[:12], e)
            return
        if prof is None:
            return
        refs, seen = [], set()
        for it in check_profile(prof, image):
            if it.ref.digest not in seen:
                seen.add(it.ref.digest)
                refs.append(it.ref)
        store = image.store
        if store.memory is not None and not any(t.writable for t in store.chunks.tiers):
            # nothing below memory keeps what is fetched: fetching past its capacity only evicts
            budget, kept = store.memory.capacity * 3 // 4, []
            for r in refs:
                budget -= r.raw_len
                if budget < 0:
                    break
                kept.append(r)
            refs = kept
        store.chunks.want(refs)  # pack spans then bring the profile's frames, not whole windows
        self.replayer = ProfileReplayer(store, refs, image.index.pack_members,
                                        concurrency=self.opts.replay_concurrency,
                                        foreground_busy=lambda: self.ops.foreground_waiting > 0)
        log.info("replaying startup profile: %d chunks", len(refs))
        self.replayer.start()

    def stats(self) -> dict:
        rec = self.recorder
        return {
            "mount": self.ops.stats(),
            "tiers": [t.as_dict() for t in self.image.store.chunks.stats()],
            "replay": self.replayer.as_dict() if self.replayer else None,
            "profile": {"recording": bool(rec and rec.active), "chunks": len(rec) if rec else 0,
                        "saved": (self.profile_saved or {}).get("key")},
            "kernel": self.info.kernel, "image": self.image.id, "pid": os.getpid(),
        }

    # -- trio tasks -------------------------------------------------------------------------

    async def handle_control(self, stream: Any) -> None:
        import trio

        try:
            buf = b""
            with trio.move_on_after(10):
                while not buf.endswith(b"\n") and len(buf) < 65536:
                    got = await stream.receive_some(65536)
                    if not got:
                        break
                    buf += got
            try:
                cmd = json.loads(buf or b"{}").get("cmd")
                if cmd == "ping":
                    reply: dict = {"ok": True, "pid": os.getpid()}
                elif cmd == "stats":
                    reply = {"ok": True, **self.stats()}
                elif cmd == "profile-stop":
                    reply = {"ok": True, **(await trio.to_thread.run_sync(self.save_recording))}
                else:
                    reply = {"ok": False, "error": f"unknown command {cmd!r} (ping, stats, profile-stop)"}
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the daemon
                reply = {"ok": False, "error": str(e)}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def control_server(self, task_status: Any) -> None:
        import trio

        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            os.unlink(self.info.socket)
        except OSError:
            pass
        await sock.bind(self.info.socket)
        os.chmod(self.info.socket, 0o600)
        sock.listen(16)
        task_status.started()
        await trio.serve_listeners(self.handle_control, [trio.SocketListener(sock)])

    async def watch_signals(self, cancel: Any) -> None:
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %d: unmounting %s", sig, self.mountpoint)
                cancel.cancel()
                return

    async def record_timer(self, seconds: float) -> None:
        import trio

        await trio.sleep(seconds)
        if self.recorder is not None and self.recorder.active:
            try:
                await trio.to_thread.run_sync(self.save_recording)
            except Exception as e:  # noqa: BLE001
                log.error("saving the startup profile failed: %s", e)

    async def main(self, on_ready: Callable[[MountInfo], None] | None) -> None:
        import pyfuse3
        import trio

        opts = self.opts
        max_bg = opts.max_background or DEFAULT_MAX_BACKGROUND
        async with trio.open_nursery() as nursery:
            self.ops.nursery = nursery
            await nursery.start(self.control_server)
            nursery.start_soon(self.watch_signals, nursery.cancel_scope)

            async def fuse_loop() -> None:
                try:
                    await pyfuse3.main(min_tasks=2, max_tasks=max_bg + 64)
                finally:
                    nursery.cancel_scope.cancel()  # unmounted from outside: stop everything

            nursery.start_soon(fuse_loop)
            while not self.inited.is_set():
                await trio.sleep(0.001)
            await trio.sleep(0)  # the INIT reply is written before this task runs again
            self.info.kernel = kernel.tune(self.mountpoint, opts.read_ahead_kb or DEFAULT_READ_AHEAD_KB, max_bg)
            write_record(self.info)
            if opts.replay_profile:
                self.start_replay()
            if self.recorder is not None:
                nursery.start_soon(self.record_timer, float(opts.record_profile))  # type: ignore[arg-type]
            log.info("serving image %s (%s) at %s", self.image.name, self.image.id[:12], self.mountpoint)
            if on_ready:
                on_ready(self.info)

    def shutdown(self) -> None:
        """After the loop: stop replay, save a profile being recorded, unmount, drop the record."""
        import pyfuse3

        if self.replayer is not None:
            self.replayer.stop()
        if self.recorder is not None and self.recorder.active:
            try:
                self.save_recording()
            except Exception as e:  # noqa: BLE001
                log.error("saving the startup profile failed: %s", e)
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:  # noqa: BLE001
            log.error("unmounting %s failed: %s", self.mountpoint, e)
        if kernel.is_mounted(self.mountpoint):
            kernel.detach(self.mountpoint)
        remove_record(self.mountpoint, os.getpid())
        try:  # write the queued ssd-tier fills: the next mount on this host starts warm
            self.image.store.close()
        except Exception as e:  # noqa: BLE001
            log.error("flushing the cache tiers failed: %s", e)


def serve(image: "Image", mountpoint: str, options: MountOptions | None = None, *,
          on_ready: Callable[[MountInfo], None] | None = None,
          on_error: Callable[[str], None] | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it in this process until it is unmounted.

    ``on_ready`` is called (on the event loop) once the mount answers; ``on_error`` with a
    message when mounting fails (the exception is raised too).

    Raises:
        MountError: when the mount point is unusable or FUSE cannot mount.
    """
    opts = options or MountOptions()
    mountpoint = kernel.resolve(mountpoint)
    try:
        try:
            import pyfuse3
            import trio
        except ImportError as e:
            raise MountError(f"casfs mount needs pyfuse3 and trio ({e}): pip install 'casfs[fuse]' "
                             "(pyfuse3 builds against libfuse3-dev)") from None
        if kernel.is_mounted(mountpoint):
            raise MountError(f"{mountpoint}: something is already mounted here (casfs umount {mountpoint})")
        check_mountpoint(mountpoint)
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse is missing: load the fuse module (or pass /dev/fuse into the container)")
    except MountError as e:
        if on_error:
            on_error(str(e))
        raise
    d = _Daemon(image, mountpoint, opts)
    fuse_opts = {"fsname=casfs", "subtype=casfs", "ro", "default_permissions"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    try:
        pyfuse3.init(d.ops, mountpoint, fuse_opts)
    except RuntimeError as e:
        msg = f"{mountpoint}: FUSE mount failed ({e}); is /dev/fuse usable and are you root?"
        if on_error:
            on_error(msg)
        raise MountError(msg) from None
    clean = False
    try:
        trio.run(d.main, on_ready)
        clean = True
    finally:
        d.shutdown()
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


# ---------------------------------------------------------------------------------------------
# starting a daemon for casfs.mount()


def _setup_logging(path: str, verbose: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s casfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.WARNING - 10 * min(max(verbose, 0), 2))


def daemon_body(image: "Image", mountpoint: str, opts: MountOptions, ready_fd: int, log_path: str) -> int:
    """Runs in the daemon process: detach stdio, serve, report readiness or failure on ``ready_fd``."""
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
                os.write(ready_fd, (line.replace("\n", " ") + "\n").encode())
            except OSError:
                pass
            os.close(ready_fd)

    try:
        serve(image, mountpoint, opts, on_ready=lambda info: tell(f"ready {os.getpid()}"),
              on_error=lambda m: tell(f"error {m}"))
        return 0
    except BaseException as e:  # noqa: BLE001 - reported through the pipe and the log
        log.exception("casfs daemon failed")
        tell(f"error {e}")
        return 1


def forkable(image: "Image") -> bool:
    """Forking is safe only while this process has no other threads (the store's pools included)."""
    return threading.active_count() == 1 and not image.store.chunks.threads_started()


def fork(image: "Image", mountpoint: str, opts: MountOptions, r: int, w: int, log_path: str) -> None:
    """Double-fork a daemon (new session, reparented to init) that serves the mount."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return
    code = 1
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        _close_inherited_pipes(keep=w)
        code = daemon_body(image, mountpoint, opts, w, log_path)
    finally:
        logging.shutdown()
        os._exit(code)


def _close_inherited_pipes(keep: int) -> None:
    """Close the caller's pipes and terminals (a daemon holding a pipe open keeps its reader
    from ever seeing EOF). Files and sockets stay: the store may be using them."""
    import stat

    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd <= 2 or fd == keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISFIFO(mode) or os.isatty(fd):
                os.close(fd)
        except OSError:
            continue


_spawned: list[subprocess.Popen] = []  # kept so that Python reaps them


def spawn(image: "Image", mountpoint: str, opts: MountOptions, r: int, w: int, log_path: str) -> None:
    """Start ``casfs mount --foreground --ready-fd`` in a new session (this process has threads),
    with the store's own tiers: its cache dir, its AZ cache servers and its memory size."""
    store = image.store
    argv = [sys.executable, "-m", "casfs.cli.main", "--store", store.url]
    if store.cache_dir:
        argv += ["--cache-dir", store.cache_dir]
    from ..tiers.azcache import AzCacheTier

    azcache = [n.url for t in store.chunks.tiers if isinstance(t, AzCacheTier) for n in t.nodes]
    argv += ["--azcache", ",".join(azcache)]  # (an empty list: none, whatever $CASFS_AZCACHE says)
    argv += ["-" + "v" * opts.verbose] if opts.verbose else []
    argv += ["mount", image.id, mountpoint, "--foreground", "--ready-fd", str(w), "--log-file", log_path,
             "--memory", str(store.memory.capacity if store.memory is not None else 0)]
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
