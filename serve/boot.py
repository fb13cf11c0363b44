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

This module holds the pipeline itself; its parts live beside it: ``report`` (the boot report
and phase timer), ``modeldir`` (mount or export of the model image), ``client`` (HTTP to the
replica: /health, the first-token probe), ``process`` (starting and stopping the worker),
``errors`` (BootError).
"""

from __future__ import annotations

import http.client
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import casfs

from .client import CONTROL_HEADER, first_token, http_json, wait_ready
from .health import HealthReport, check_gpus, require_healthy
from .modeldir import materialize
from .preflight import check_model, preflight
from .process import exit_reason, pid_alive, spawn_worker, terminate
from .report import PHASE_ORDER, BootReport, PhaseTimer, write_report

__all__ = ["BootConfig", "Replica", "boot_replica", "worker_argv", "worker_env"]

log = logging.getLogger("serve.boot")


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
        return pid_alive(self.pid)

    def wait(self) -> int:
        """Block until the worker exits; returns its exit status (-1 if not our child)."""
        if self.proc is not None:
            return self.proc.wait()
        while pid_alive(self.pid):
            time.sleep(0.2)
        return -1

    def stop(self, timeout: float = 30.0, *, unmount: bool = True) -> None:
        """SIGTERM the worker's process group (SIGKILL after ``timeout``), then unmount the model
        if this replica mounted it."""
        terminate(self.pid, self.proc, timeout)
        if self.proc is not None and not isinstance(self.proc, subprocess.Popen):
            self.proc.kill()  # snapshot.cpu's handles: reap the launcher/criu, remove work dirs
        if self.restored is not None:
            self.restored.cleanup()
        if unmount and self.mounted:
            try:
                casfs.unmount(self.mounted)
            except casfs.CasfsError as e:
                log.warning("unmounting %s: %s", self.mounted, e)
            self.mounted = None


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
    return os.path.abspath(cfg.workdir or os.path.join(casfs.home_dir(), "serve"))


def worker_argv(cfg: BootConfig, model_dir: str, name: str, log_path: str) -> list[str]:
    argv = [cfg.python, "-m", "serve.worker", "--model-dir", model_dir, "--name", name,
            "--listen", cfg.listen, "--engine", cfg.engine, "--log", log_path]
    if cfg.eager:
        argv.append("--eager")
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    return argv


def boot_replica(cfg: BootConfig, *, health_check: Callable[[], HealthReport] = check_gpus) -> Replica:
    """Run the boot pipeline (see the module docstring) and return the serving replica.

    Raises:
        PreflightError: the engine is not installed for ``cfg.python``, the listen port is
            taken, or the image holds no model (``serve.preflight``; nothing was started).
        GpuUnhealthy: the GPU health phase failed (nothing else was started).
        BootError: any later phase failed (what was started is stopped again).
        ImageNotFound: the model image is not in the store.
    """
    t_start = time.monotonic()
    preflight(cfg)  # engine installed, port free: one-line errors before any slow work
    workdir = _workdir(cfg)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    mode = "restore" if cfg.snapshot and not cfg.create_snapshot else "cold"
    report = BootReport(mode=mode, image=cfg.image, listen=cfg.listen, engine=cfg.engine, eager=cfg.eager,
                        snapshot=cfg.snapshot, started_at=time.time())
    report.host = {"hostname": os.uname().nodename, "kernel": os.uname().release, "cpus": os.cpu_count()}
    timer = PhaseTimer(report)
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
        check_model(image, cfg.engine)
        model_dir, how, detail = materialize(image, cfg.materialize, workdir)
    report.image_id, report.model_dir, report.materialize = image.id, model_dir, how
    report.details["mount"] = detail
    mounted = model_dir if how == "mount" and not detail.get("reused") else None
    name = cfg.name or cfg.image
    log_path = os.path.join(workdir, "logs", f"replica-{casfs.parse_listen(cfg.listen)[1]}-{int(time.time() * 1000)}.log")
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
            wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(proc, log_path))
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
                    wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(proc, log_path))
                report.details["restore"] = restored.detail
            else:
                proc = spawn_worker(argv, env, log_path)
                pid = proc.pid
                wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(proc, log_path))
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
            terminate(pid, proc, 10)
            if proc is not None and not isinstance(proc, subprocess.Popen):
                proc.kill()
        if restored is not None:
            restored.cleanup()
        if mounted:
            try:
                casfs.unmount(mounted)
            except casfs.CasfsError:
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
