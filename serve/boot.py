"""A replica's boot: a timed pipeline from "process started" to "first token", with a report.

Phases, in order (each timed in seconds, exported in /metrics as
``casfs_serve_boot_phase_seconds{phase=...}`` and written to the JSON boot report):

    gpu_health   NVML + active check (serve.health); an unhealthy GPU refuses the boot.
                 On a CPU host it reports "no_gpu" and the boot goes on.
    mount        the model image (a casfs image of a Hugging Face model directory) made
                 readable: a lazy FUSE mount (chunks fetched on first read) or, where FUSE is
                 unusable, a full export. Shared: a replica reuses a mount already there.
    restore      (snapshot boots) the replica process tree restored from a CPU snapshot, until
                 it answers /health; its post-restore work (reseed, listen) included. A
                 snapshot that is missing or does not fit this host (CPU flags, libraries,
                 files) is refused before anything starts, and the replica boots cold instead
                 (the reason is in the report's ``details.snapshot_refused``).
    init         (cold boots) worker process start, imports, engine construction (KV cache,
                 torch.compile unless eager), excluding the weights load below.
    weights      (cold boots) loading the checkpoint into the model, as vLLM times it.
    warmup       (cold boots) one short generation inside the worker.
    first_token  a streamed completion request over HTTP until its first token arrives.

    snapshot     (``create_snapshot`` boots, after warmup) the warm worker, not yet
                 listening, dumped with CRIU (which ends it) and stored as a casfs image,
                 then restored at once (``restore``) to serve: every snapshot is proven
                 restorable when it is made. Details in the report's ``snapshot_create``.

``total`` is the wall time from the start of the pipeline to the first token.

The replica itself runs in a child process (serve.worker) started in its own session with
stdio redirected to an append-only log: the shape CRIU needs to dump and restore it. Snapshots
come from a :class:`SnapshotBackend` (serve.snapshots); the cold path needs none.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from casfs.errors import CasfsError

from .health import HealthReport, check_gpus, require_healthy

log = logging.getLogger("serve.boot")

PROBE_PROMPT = "The quick brown fox"
CONTROL_HEADER = "X-Casfs-Control"
PHASE_ORDER = ("gpu_health", "mount", "init", "weights", "warmup", "snapshot", "restore", "first_token")


class BootError(CasfsError):
    """The replica could not boot; the message says which phase failed and why."""


@dataclass
class BootConfig:
    """What to boot and how.

    Attributes:
        image: tag or id of the model image in the store.
        listen: HOST:PORT the replica serves on.
        store, cache_dir: the casfs store URL and ssd cache (defaults as for the CLI).
        name: model name served in /v1/models (default: ``image``).
        engine: "vllm" (the real one) or "echo" (serve.echo's stand-in; no model work).
        eager: vLLM --enforce-eager (no torch.compile).
        fast_boot: vLLM's in-process model runner and unpinned OpenMP threads
            (VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_OMP_THREADS_BIND=nobind).
        max_model_len: context length (default: the model's).
        materialize: "auto" (mount if FUSE works here, else export), "mount" or "export".
        workdir: mount points, exports and logs (default ``$CASFS_HOME/serve``).
        python: interpreter for the worker (default: this one).
        snapshot: snapshot tag to restore from (or to create with ``create_snapshot``).
        create_snapshot: cold boot, then snapshot the ready replica under ``snapshot``.
        gpu_check: run the GPU health phase.
        boot_timeout: seconds to wait for the replica to answer /health.
        report_path: also write the JSON boot report here.
        env: extra environment for the worker.
    """

    image: str
    listen: str = "127.0.0.1:8000"
    store: str | None = None
    cache_dir: str | None = None
    name: str | None = None
    engine: str = "vllm"
    eager: bool = False
    fast_boot: bool = False
    max_model_len: int | None = None
    materialize: str = "auto"
    workdir: str | None = None
    python: str = sys.executable
    snapshot: str | None = None
    create_snapshot: bool = False
    gpu_check: bool = True
    boot_timeout: float = 900.0
    report_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class BootReport:
    """The JSON boot report (``to_dict``). ``phases`` maps phase -> seconds, in boot order."""

    mode: str  # "cold" | "restore"
    image: str
    image_id: str = ""
    model_dir: str = ""
    materialize: str = ""
    listen: str = ""
    engine: str = ""
    eager: bool = False
    snapshot: str | None = None
    started_at: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    total: float | None = None
    first_token_text: str = ""
    snapshot_create: dict[str, Any] | None = None
    gpu: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Timer:
    def __init__(self, report: BootReport) -> None:
        self.report = report

    def phase(self, name: str) -> "_PhaseCtx":
        return _PhaseCtx(self.report, name)


class _PhaseCtx:
    def __init__(self, report: BootReport, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> "_PhaseCtx":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.report.phases[self.name] = time.monotonic() - self.t0


# -- materializing the model image -------------------------------------------------------------


def _fuse_usable() -> str | None:
    """None if a FUSE mount can be made here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed in this environment (pip install 'casfs[fuse]')"
    return None


def materialize(image: Any, how: str, workdir: str) -> tuple[str, str, dict]:
    """Make ``image`` readable as a directory; returns (path, "mount"|"export", detail).

    The path depends only on the image id, so a snapshot taken on one boot finds the model
    files at the same path on the next.

    Raises:
        BootError: when ``how`` is "mount" and FUSE is unusable, or mounting/exporting fails.
    """
    import casfs

    if how not in ("auto", "mount", "export"):
        raise BootError(f"materialize must be auto, mount or export, not {how!r}")
    why_not = _fuse_usable()
    if how == "mount" and why_not:
        raise BootError(f"cannot mount the model image: {why_not}")
    if how == "mount" or (how == "auto" and why_not is None):
        from casfs.fuse.mount import is_mounted

        mp = os.path.join(workdir, "models", image.id[:24])
        if is_mounted(mp):
            return mp, "mount", {"reused": True}
        os.makedirs(mp, exist_ok=True)
        try:
            info = casfs.mount(image, mp)
        except CasfsError as e:
            raise BootError(f"mount phase: {e}") from None
        return mp, "mount", {"reused": False, "daemon_pid": info.pid, "log": info.log}
    from casfs import export as export_image

    dest = os.path.join(workdir, "exports", image.id)
    if os.path.isdir(dest):
        return dest, "export", {"reused": True, "fuse_unusable": why_not}
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        res = export_image(image, dest, progress=False)
    except FileExistsError:  # another replica exported it meanwhile
        return dest, "export", {"reused": True, "fuse_unusable": why_not}
    except CasfsError as e:
        raise BootError(f"export phase: {e}") from None
    return dest, "export", {"reused": False, "bytes": res.bytes, "files": res.files, "fuse_unusable": why_not}


# -- talking to the replica over HTTP ------------------------------------------------------------


def _split(listen: str) -> tuple[str, int]:
    from .worker import parse_listen

    return parse_listen(listen)


def http_json(listen: str, method: str, path: str, body: dict | None = None, *, timeout: float = 10.0,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP request to the replica; returns (status, parsed JSON or text). Raises OSError."""
    host, port = _split(listen)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def _gone(proc: Any, log_path: str) -> str | None:
    """None while ``proc`` (Popen, or snapshot.cpu's process handles) runs, else why it is gone."""
    rc = proc.poll()
    if rc is None:
        return None
    return f"the replica exited with status {rc} while booting; last lines of {log_path}:\n{_log_tail(log_path)}"


def wait_ready(listen: str, timeout: float, alive: Callable[[], str | None]) -> None:
    """Poll GET /health until 200. ``alive()`` returns None while the replica runs, else why it
    is gone. Raises BootError on death or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        why = alive()
        if why:
            raise BootError(why)
        try:
            status, _ = http_json(listen, "GET", "/health", timeout=5.0)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise BootError(f"the replica did not answer /health with 200 within {timeout:.0f} s")
        time.sleep(0.05)


def first_token(listen: str, model: str, prompt: str = PROBE_PROMPT, timeout: float = 120.0) -> tuple[float, str]:
    """Stream a greedy completion; returns (seconds until the first token's event, its text)."""
    host, port = _split(listen)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                           "stream": True}).encode()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BootError(f"first-token probe: HTTP {resp.status}: {resp.read()[:300]!r}")
        while True:
            line = resp.readline()
            if not line:
                raise BootError("first-token probe: the stream ended without a token")
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise BootError(f"first-token probe: {event['error'].get('message')}")
                text = event["choices"][0].get("text", "")
                if text or event["choices"][0].get("finish_reason"):
                    return time.monotonic() - t0, text
    finally:
        conn.close()


# -- the replica ----------------------------------------------------------------------------------


class Replica:
    """A booted replica: its worker process, address, boot report; ``stop()`` ends it."""

    def __init__(self, cfg: BootConfig, report: BootReport, pid: int, proc: Any,
                 log_path: str, mounted: str | None, token: str) -> None:
        self.cfg = cfg
        self.report = report
        self.pid = pid
        self.proc = proc
        self.log_path = log_path
        self.mounted = mounted
        self.control_token = token
        self.restored: Any = None  # serve.snapshots.Restored, for restored replicas

    @property
    def listen(self) -> str:
        return self.cfg.listen

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.pid)

    def wait(self) -> int:
        """Block until the worker exits; returns its exit status (-1 if not our child)."""
        if self.proc is not None:
            return self.proc.wait()
        while _pid_alive(self.pid):
            time.sleep(0.2)
        return -1

    def stop(self, timeout: float = 30.0, *, unmount: bool = True) -> None:
        """SIGTERM the worker's process group (SIGKILL after ``timeout``), then unmount the model
        if this replica mounted it."""
        _terminate(self.pid, self.proc, timeout)
        if self.proc is not None and not isinstance(self.proc, subprocess.Popen):
            self.proc.kill()  # snapshot.cpu's handles: reap the launcher/criu, remove work dirs
        if self.restored is not None:
            self.restored.cleanup()
        if unmount and self.mounted:
            from casfs.fuse.mount import unmount as do_unmount

            try:
                do_unmount(self.mounted)
            except CasfsError as e:
                log.warning("unmounting %s: %s", self.mounted, e)
            self.mounted = None


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _pid_alive(pid):
                return
            time.sleep(0.05)


def _log_tail(path: str, n: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def worker_env(cfg: BootConfig, token: str) -> dict[str, str]:
    """The worker's environment: vLLM's offline CPU settings, a private cache, the control token."""
    from .engine import VLLM_CPU_ENV, VLLM_FAST_BOOT_ENV

    env = dict(os.environ)
    for k, v in VLLM_CPU_ENV.items():
        env.setdefault(k, v)
    if cfg.fast_boot:
        env.update(VLLM_FAST_BOOT_ENV)
    env.setdefault("VLLM_CACHE_ROOT", os.path.join(_workdir(cfg), "vllm-cache"))
    env.pop("CASFS_SNAPSHOT_READY", None)  # only snapshot.cpu.spawn may ask for snapshot.ready()
    env["CASFS_SERVE_CONTROL_TOKEN"] = token
    env["CASFS_SERVE_SPAWNED_AT"] = repr(time.time())
    env.update(cfg.env)
    return env


def _workdir(cfg: BootConfig) -> str:
    from casfs import home_dir

    return os.path.abspath(cfg.workdir or os.path.join(home_dir(), "serve"))


def worker_argv(cfg: BootConfig, model_dir: str, name: str, log_path: str) -> list[str]:
    argv = [cfg.python, "-m", "serve.worker", "--model-dir", model_dir, "--name", name,
            "--listen", cfg.listen, "--engine", cfg.engine, "--log", log_path]
    if cfg.eager:
        argv.append("--eager")
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    return argv


def spawn_worker(argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    """Start the worker in its own session, stdin/stdout on /dev/null, stderr appending to
    ``log_path`` (O_APPEND: CRIU restores files opened for append without size checks)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                start_new_session=True, cwd="/", close_fds=True)
    finally:
        os.close(fd)


def boot_replica(cfg: BootConfig, *, health_check: Callable[[], HealthReport] = check_gpus) -> Replica:
    """Run the boot pipeline (see the module docstring) and return the serving replica.

    Raises:
        GpuUnhealthy: the GPU health phase failed (nothing else was started).
        BootError: any later phase failed (what was started is stopped again).
        ImageNotFound: the model image is not in the store.
    """
    import casfs

    t_start = time.monotonic()
    workdir = _workdir(cfg)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    mode = "restore" if cfg.snapshot and not cfg.create_snapshot else "cold"
    report = BootReport(mode=mode, image=cfg.image, listen=cfg.listen, engine=cfg.engine, eager=cfg.eager,
                        snapshot=cfg.snapshot, started_at=time.time())
    report.host = {"hostname": os.uname().nodename, "kernel": os.uname().release, "cpus": os.cpu_count()}
    timer = _Timer(report)
    backend = None
    if cfg.snapshot:  # fail before any work when snapshots cannot run here
        from .snapshots import open_backend

        backend = open_backend()

    if cfg.gpu_check:
        with timer.phase("gpu_health"):
            gpu = health_check()
        report.gpu = gpu.to_dict()
        require_healthy(gpu)

    with timer.phase("mount"):
        store = casfs.open_store(cfg.store, cache_dir=cfg.cache_dir)
        image = store.open_image(cfg.image)
        model_dir, how, detail = materialize(image, cfg.materialize, workdir)
    report.image_id, report.model_dir, report.materialize = image.id, model_dir, how
    report.details["mount"] = detail
    mounted = model_dir if how == "mount" and not detail.get("reused") else None
    name = cfg.name or cfg.image
    log_path = os.path.join(workdir, "logs", f"replica-{_split(cfg.listen)[1]}-{int(time.time() * 1000)}.log")
    token = secrets.token_hex(16)
    proc: Any = None
    restored: Any = None
    pid = 0
    try:
        if mode == "restore":
            assert backend is not None and cfg.snapshot
            from .snapshots import SnapshotUnavailable

            t = time.monotonic()
            try:
                restored = backend.restore(store, cfg.snapshot, listen=cfg.listen, seed=secrets.randbits(63),
                                           token=token)
            except SnapshotUnavailable as e:  # missing or incompatible: nothing was started
                log.warning("%s; booting cold instead", e)
                report.details["snapshot_refused"] = str(e)
                mode = report.mode = "cold"
        if mode == "restore":
            proc, pid = restored.process, restored.pid
            wait_ready(cfg.listen, cfg.boot_timeout, lambda: _gone(proc, log_path))
            report.phases["restore"] = time.monotonic() - t
            report.details["restore"] = restored.detail
            _, boot = http_json(cfg.listen, "GET", "/boot")
            w = boot.get("worker", {}) if isinstance(boot, dict) else {}
            report.details["worker"] = w
            log_path = w.get("log") or log_path
            _, models = http_json(cfg.listen, "GET", "/v1/models")
            try:  # the name the snapshot serves (chosen when it was created)
                name = models["data"][0]["id"]
            except (TypeError, KeyError, IndexError):
                pass
        else:
            t_spawn = time.monotonic()
            env = worker_env(cfg, token)
            argv = worker_argv(cfg, model_dir, name, log_path)
            if cfg.create_snapshot:
                assert backend is not None and cfg.snapshot
                proc = backend.spawn(argv, env, log_path)
                pid = proc.pid
                backend.wait_ready(proc, cfg.boot_timeout)  # engine loaded and warm, not listening yet
                ready = time.monotonic() - t_spawn
                with timer.phase("snapshot"):  # the dump ends the worker ...
                    report.snapshot_create = backend.create(proc, store, cfg.snapshot)
                with timer.phase("restore"):  # ... which goes on serving from its snapshot
                    restored = backend.restore(store, cfg.snapshot, listen=cfg.listen,
                                               seed=secrets.randbits(63), token=token)
                    proc, pid = restored.process, restored.pid
                    wait_ready(cfg.listen, cfg.boot_timeout, lambda: _gone(proc, log_path))
                report.details["restore"] = restored.detail
            else:
                proc = spawn_worker(argv, env, log_path)
                pid = proc.pid
                wait_ready(cfg.listen, cfg.boot_timeout, lambda: _gone(proc, log_path))
                ready = time.monotonic() - t_spawn
            _, boot = http_json(cfg.listen, "GET", "/boot")
            w = boot.get("worker", {}) if isinstance(boot, dict) else {}
            wp, vllm = w.get("phases", {}), w.get("vllm", {})
            weights = float(vllm.get("weights", 0.0))
            warmup = float(wp.get("warmup", 0.0))
            report.phases["init"] = max(0.0, ready - weights - warmup)
            if "weights" in vllm:
                report.phases["weights"] = weights
            report.phases["warmup"] = warmup
            report.details["worker"] = w
        with timer.phase("first_token"):
            _, text = first_token(cfg.listen, name)
        report.first_token_text = text
        report.total = time.monotonic() - t_start
        report.phases = {k: report.phases[k] for k in PHASE_ORDER if k in report.phases}
    except BaseException:
        if pid:
            _terminate(pid, proc, 10)
            if proc is not None and not isinstance(proc, subprocess.Popen):
                proc.kill()
        if restored is not None:
            restored.cleanup()
        if mounted:
            from casfs.fuse.mount import unmount

            try:
                unmount(mounted)
            except CasfsError:
                pass
        raise
    replica = Replica(cfg, report, pid, proc, log_path, mounted, token)
    replica.restored = restored
    try:  # the replica's /metrics and /boot then carry the whole pipeline's timings
        http_json(cfg.listen, "POST", "/_casfs/report", report.to_dict(), headers={CONTROL_HEADER: token})
    except (OSError, http.client.HTTPException) as e:
        log.warning("could not hand the boot report to the replica: %s", e)
    if cfg.report_path:
        write_report(report, cfg.report_path)
    return replica


def write_report(report: BootReport, path: str) -> None:
    """Write the report as JSON, atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
