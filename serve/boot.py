"""A replica's boot: a timed pipeline from "process started" to "first token", with a report.

Phases, in order (each timed in seconds, exported in /metrics as
``casfs_serve_boot_phase_seconds{phase=...}`` and written to the JSON boot report):

    gpu_health   NVML + active check (serve.health); an unhealthy GPU refuses the boot.
                 On a CPU host it reports "no_gpu" and the boot goes on.
    mount        the model image (a casfs image of a Hugging Face model directory) made
                 readable: a lazy FUSE mount (chunks fetched on first read) or, where FUSE is
                 unusable, a full export. Shared: a replica reuses a mount already there.
    restore      (snapshot boots) the replica process tree restored from a snapshot, until
                 it answers /health; its post-restore work (reseed, listen; for GPU snapshots
                 the driver resume and the weights streamed back, broken down in
                 ``details.restore``) included. A snapshot that is missing or does not fit this
                 host (CPU flags, libraries, files, GPU model, driver) is refused before
                 anything starts (``details.snapshot_refused``); a restore that fails on the
                 way (CRIU, the GPU resume, the worker) is killed (``details.snapshot_failed``).
                 Either way the replica then boots cold, in the same call.
    init         (cold boots) worker process start, imports, engine construction (KV cache,
                 torch.compile unless eager), excluding the weights load below.
    weights      (cold boots) loading the checkpoint into the model, as the engine times it.
    compile      (cold boots, transformers engine) torch.compile of the decode step and its
                 CUDA graph capture, as the engine times it.
    warmup       (cold boots) one short generation inside the worker.
    first_token  a streamed completion request over HTTP until its first token arrives.

    snapshot     (``create_snapshot`` boots, after warmup) the warm worker, not yet
                 listening, dumped with CRIU (which ends it) and stored as a casfs image,
                 then restored at once (``restore``) to serve: every snapshot is proven
                 restorable when it is made. Details in the report's ``snapshot_create``.
                 A transformers replica on a GPU makes a GPU snapshot (serve.gpu_snapshots):
                 weights and KV cache released first, GPU state suspended by the driver.
                 If making it fails, the replica boots cold without one.

Engines: ``vllm`` (by default its weights are streamed from casfs through vLLM's ``casfs``
load format, serve.vllm_loader, and only the config and tokenizer are written to disk:
``materialize`` is "metadata"; ``--materialize mount|export`` gives vLLM's own loader a
mounted or exported model directory instead), ``transformers`` (serve.hf_engine; weights
streamed from casfs, "metadata" too), ``echo``; ``auto`` picks vllm where the worker's Python
can import it, else transformers.

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

import dataclasses
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
from .errors import BootError
from .health import HealthReport, check_gpus, require_healthy
from .modeldir import materialize, materialize_metadata
from .preflight import check_model, preflight
from .process import exit_reason, pid_alive, spawn_worker, terminate
from .report import PHASE_ORDER, BootReport, PhaseTimer, write_report

__all__ = ["BootConfig", "Replica", "boot_replica", "memory_in_use", "resolve_engine", "weights_source",
           "worker_argv", "worker_env"]

log = logging.getLogger("serve.boot")


@dataclass
class BootConfig:
    """What to boot and how.

    Attributes:
        image: tag or id of the model image in the store.
        listen: HOST:PORT the replica serves on.
        store, cache_dir: the casfs store URL and ssd cache (defaults as for the CLI).
        name: model name served in /v1/models (default: ``image``).
        engine: "vllm", "transformers", "echo" (serve.echo's stand-in; no model work) or "auto"
            (vllm where ``python`` can import it, else transformers).
        eager: no torch.compile (vLLM --enforce-eager; the transformers engine still records
            CUDA graphs on a GPU, of the eager step).
        device: the transformers engine's device ("auto": the GPU when there is one).
        fast_boot: vLLM's in-process model runner and unpinned OpenMP threads
            (VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_OMP_THREADS_BIND=nobind).
        max_model_len: context length (default: the model's).
        materialize: "auto" (default: the config and tokenizer written to disk and the weights
            streamed from casfs by the engine, vLLM through its ``casfs`` load format),
            "mount" (a lazy FUSE mount of the whole image, vLLM's own loader), or "export".
        workdir: mount points, exports and logs (default ``$CASFS_HOME/serve``).
        python: interpreter for the worker (default: this one).
        snapshot: snapshot tag to restore from (or to create with ``create_snapshot``).
        snapshot_source: where a restore reads the snapshot: "auto" (default: the host's
            export of it when there is one, else "store" where the kernel has userfaultfd,
            else "export"; GPU snapshots: "export"), "store" (lazily from the casfs store,
            nothing unpacked), "export" (exported once per host, restored eagerly).
        create_snapshot: cold boot, then snapshot the ready replica under ``snapshot``.
        gpu_snapshot: snapshots hold GPU state (None: when the engine is transformers and the
            health check found a GPU).
        restore_gpu: where a GPU snapshot resumes (serve.gpu_placement): None (the GPU it was
            made on), "auto", "cuda:N" / "N" (NVML index) or a GPU UUID.
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
    engine: str = "auto"
    eager: bool = False
    device: str = "auto"
    fast_boot: bool = False
    max_model_len: int | None = None
    materialize: str = "auto"
    workdir: str | None = None
    python: str = sys.executable
    snapshot: str | None = None
    snapshot_source: str = "auto"
    create_snapshot: bool = False
    gpu_snapshot: bool | None = None
    restore_gpu: str | None = None
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
        self.lifeline: Any = None  # casfs.Lifeline: undoes the replica if its supervisor dies

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
        if this replica mounted it, and close the replica's lifeline."""
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
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None


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


def worker_argv(cfg: BootConfig, model_dir: str, name: str, log_path: str, *, engine: str | None = None,
                weights: dict | None = None, gpu_snapshot: bool = False) -> list[str]:
    """The worker's command line (``weights``: where the engine streams the weights from)."""
    engine = engine or cfg.engine
    argv = [cfg.python, "-m", "serve.worker", "--model-dir", model_dir, "--name", name,
            "--listen", cfg.listen, "--engine", engine, "--log", log_path]
    if cfg.eager:
        argv.append("--eager")
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if engine == "transformers":
        argv += ["--device", cfg.device]
    if weights and engine in ("transformers", "vllm"):
        argv += ["--weights-store", weights["store"], "--weights-image", weights["image"],
                 "--weights-path", weights["path"]]
        if weights.get("cache_dir"):
            argv += ["--weights-cache-dir", weights["cache_dir"]]
    if gpu_snapshot:
        argv.append("--gpu-snapshot")
    return argv


def resolve_engine(engine: str, python: str) -> str:
    """``engine``, with "auto" resolved for the worker's ``python``: vllm where it is installed,
    else transformers (with torch).

    Raises:
        PreflightError: "auto" and neither engine is installed for ``python``.
    """
    if engine != "auto":
        return engine
    from .preflight import ENGINE_CHECKS, PreflightError, _missing_modules

    missing = set(_missing_modules(python, ("vllm", "transformers", "torch")))
    if "vllm" not in missing:
        return "vllm"
    if not missing & {"transformers", "torch"}:
        return "transformers"
    env = os.path.dirname(os.path.dirname(python))
    raise PreflightError(f"the vllm engine is not installed in {env}, and neither is the transformers engine "
                         f"(--engine auto picks one): {ENGINE_CHECKS['vllm'].install}")


def has_safetensors(image: Any) -> bool:
    """Whether the image's top level holds ``model.safetensors`` or its shard index (what the
    casfs load format streams; other weight formats go to vLLM's own loader on a mount)."""
    names = set(image.listdir(""))
    return bool({"model.safetensors", "model.safetensors.index.json"} & names)


def weights_source(store: Any, image: Any) -> dict:
    """Where a worker streams the weights from: the store URL, its ssd tier, the image id and
    the safetensors file (the shard index when there is one)."""
    try:
        image.stat("model.safetensors.index.json")
        path = "model.safetensors.index.json"
    except casfs.CasfsError:
        path = "model.safetensors"
    return {"store": store.url, "cache_dir": store.cache_dir or "", "image": image.id, "path": path}


def memory_in_use(pid: int, gpu: Any = None) -> dict:
    """The worker's resident host memory and (with a GPU layer) the GPUs' used memory, in bytes."""
    out: dict[str, Any] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[f"worker_{k.lower()}_bytes"] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    if gpu is not None:
        try:
            out["gpu_used_bytes"] = gpu.memory()["used"]
        except Exception:  # noqa: BLE001 - a report field
            pass
    return out


def boot_replica(cfg: BootConfig, *, health_check: Callable[[], HealthReport] = check_gpus,
                 gpu: Any = None) -> Replica:
    """Run the boot pipeline (see the module docstring) and return the serving replica.

    ``gpu``: the GPU layer GPU snapshots use (serve.gpu_snapshots.GpuLayer; default the
    driver's). Tests on hosts without a GPU pass a fake one, named as such.

    Raises:
        PreflightError: the engine is not installed for ``cfg.python``, the listen port is
            taken, or the image holds no model (``serve.preflight``; nothing was started).
        GpuUnhealthy: the GPU health phase failed (nothing else was started).
        ValueError: ``cfg.restore_gpu`` names no GPU of this host (nothing was started).
        BootError: any later phase failed (what was started is stopped again).
        ImageNotFound: the model image is not in the store.
    """
    t_start = time.monotonic()
    engine = resolve_engine(cfg.engine, cfg.python)
    preflight(dataclasses.replace(cfg, engine=engine))  # engine installed, port free: before slow work
    for left in casfs.sweep_leftovers():
        log.warning("cleaned up after a killed supervisor: %s", left)
    workdir = _workdir(cfg)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    mode = "restore" if cfg.snapshot and not cfg.create_snapshot else "cold"
    report = BootReport(mode=mode, image=cfg.image, listen=cfg.listen, engine=engine, eager=cfg.eager,
                        snapshot=cfg.snapshot, started_at=time.time())
    report.host = {"hostname": os.uname().nodename, "kernel": os.uname().release, "cpus": os.cpu_count()}
    timer = PhaseTimer(report)
    backend = None
    if cfg.snapshot:  # fail before any work when snapshots cannot run here
        from .snapshots import open_backend

        backend = open_backend(source=cfg.snapshot_source)

    has_gpu = False
    if cfg.gpu_check:
        with timer.phase("gpu_health"):
            health = health_check()
        report.gpu = health.to_dict()
        require_healthy(health)
        has_gpu = health.status == "healthy"
    gpu_snapshot = bool(cfg.gpu_snapshot) if cfg.gpu_snapshot is not None else (
        engine == "transformers" and has_gpu)
    if backend is not None and gpu_snapshot:
        from .gpu_snapshots import GpuCriuBackend

        # GPU snapshots restore eagerly from the host's export unless --snapshot-source store
        # asks otherwise. Measured on the H200 (docs/benchmarks.md, 2026-12-04): from the store
        # CRIU itself takes 0.2 s instead of 1.5 s, but the driver's resume then reads ~1.06 GB
        # of checkpointed device state that is still lazy, one 4 KiB fault at a time through
        # the page server (~390,000 faults): 23-28 s instead of 0.45 s, so a restore took
        # 26.8 s (host cache) / 33.2 s (blob) against 2.4 s / 6.4-7.1 s through the export.
        # GpuCriuBackend retries a failed store restore from the export.
        explicit = cfg.snapshot_source != "auto"
        if cfg.restore_gpu:  # issue 16: resume on another GPU; a target that is not here fails now
            from .gpu_placement import PlacedGpu
            from .gpu_snapshots import DriverGpu

            gpu = PlacedGpu(gpu if gpu is not None else DriverGpu(), cfg.restore_gpu)
            gpu.check()
        backend = GpuCriuBackend(lazy=backend.lazy if explicit else False,
                                 source=backend.source if explicit else "export", gpu=gpu)
        gpu = backend.gpu
    report.details["gpu_snapshot"] = gpu_snapshot

    with timer.phase("mount"):
        store = casfs.open_store(cfg.store, cache_dir=cfg.cache_dir)
        image = store.open_image(cfg.image)
        check_model(image, engine)
        streamed = engine == "transformers" or (engine == "vllm" and cfg.materialize == "auto"
                                                and has_safetensors(image))
        if streamed:
            model_dir, how, detail = materialize_metadata(image, workdir)
        else:
            model_dir, how, detail = materialize(image, cfg.materialize, workdir)
    report.image_id, report.model_dir, report.materialize = image.id, model_dir, how
    report.details["mount"] = detail
    weights = weights_source(store, image) if streamed else None
    mounted = model_dir if how == "mount" and not detail.get("reused") else None
    # from here on, whatever kills this process, its guard stops the worker and unmounts
    life = casfs.Lifeline(f"casfs serve {cfg.image} on {cfg.listen}")
    if mounted:
        life.add("mount", path=mounted, pid=detail.get("daemon_pid", 0), start=detail.get("daemon_start", ""))
    name = cfg.name or cfg.image
    log_path = os.path.join(workdir, "logs", f"replica-{casfs.parse_listen(cfg.listen)[1]}-{int(time.time() * 1000)}.log")
    token = secrets.token_hex(16)
    proc: Any = None
    restored: Any = None
    pid = 0

    def kill_started() -> None:
        nonlocal proc, restored, pid
        if pid:
            terminate(pid, proc, 10)
            if proc is not None and not isinstance(proc, subprocess.Popen):
                proc.kill()
        if restored is not None:
            restored.cleanup()
        proc, restored, pid = None, None, 0

    try:
        if mode == "restore":
            assert backend is not None and cfg.snapshot
            from .snapshots import SnapshotUnavailable

            t = time.monotonic()
            try:
                restored = backend.restore(store, cfg.snapshot, listen=cfg.listen, seed=secrets.randbits(63),
                                           token=token, weights=weights)
                proc, pid = restored.process, restored.pid
                life.add("process", pid=pid)
                wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(proc, log_path))
                report.phases["restore"] = time.monotonic() - t
                report.details["restore"] = restored.detail
                if getattr(gpu, "last", None):  # serve.gpu_placement's choice (issue 16)
                    report.details["gpu_placement"] = gpu.last
                _, boot = http_json(cfg.listen, "GET", "/boot")
                w = boot.get("worker", {}) if isinstance(boot, dict) else {}
                report.details["worker"] = w
                log_path = w.get("log") or log_path
                _, models = http_json(cfg.listen, "GET", "/v1/models")
                try:  # the name the snapshot serves (chosen when it was created)
                    name = models["data"][0]["id"]
                except (TypeError, KeyError, IndexError):
                    pass
            except SnapshotUnavailable as e:  # missing or incompatible: nothing was started
                log.warning("%s; booting cold instead", e)
                report.details["snapshot_refused"] = str(e)
                mode = report.mode = "cold"
            except (BootError, OSError, http.client.HTTPException) as e:  # started, then failed
                log.warning("restoring snapshot %s failed (%s); booting cold instead", cfg.snapshot, e)
                kill_started()
                report.details["snapshot_failed"] = f"{type(e).__name__}: {e}"
                report.details["failed_restore_s"] = time.monotonic() - t
                report.phases.pop("restore", None)
                mode = report.mode = "cold"
        if mode != "restore":
            create = bool(cfg.create_snapshot and backend is not None and cfg.snapshot)
            if create:
                try:
                    proc, pid, restored, ready = _create_and_restore(
                        cfg, backend, store, timer, report, engine, model_dir, name, log_path, token, weights,
                        gpu_snapshot, life)
                except BootError as e:
                    log.warning("making snapshot %s failed (%s); booting cold without one", cfg.snapshot, e)
                    kill_started()
                    report.details["snapshot_failed"] = str(e)
                    report.phases.pop("snapshot", None)
                    report.phases.pop("restore", None)
                    create = False
            if not create:
                t_spawn = time.monotonic()
                env = worker_env(cfg, token)
                argv = worker_argv(cfg, model_dir, name, log_path, engine=engine, weights=weights)
                proc = spawn_worker(argv, env, log_path)
                pid = proc.pid
                life.add("group", pid=pid)
                wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(proc, log_path))
                ready = time.monotonic() - t_spawn
            _, boot = http_json(cfg.listen, "GET", "/boot")
            w = boot.get("worker", {}) if isinstance(boot, dict) else {}
            wp, vllm, et = w.get("phases", {}), w.get("vllm", {}), w.get("engine_timings", {})
            weights_s = float(vllm.get("weights", et.get("weights", 0.0)))
            compile_s = float(et.get("compile", 0.0)) + float(et.get("capture", 0.0))
            warmup = float(wp.get("warmup", 0.0))
            report.phases["init"] = max(0.0, ready - weights_s - compile_s - warmup)
            if "weights" in vllm or "weights" in et:
                report.phases["weights"] = weights_s
            if compile_s:
                report.phases["compile"] = compile_s
            report.phases["warmup"] = warmup
            report.details["worker"] = w
        with timer.phase("first_token"):
            _, text = first_token(cfg.listen, name)
        if restored is not None and backend is not None:
            backend.booted(restored)
        report.first_token_text = text
        report.total = time.monotonic() - t_start
        report.phases = {k: report.phases[k] for k in PHASE_ORDER if k in report.phases}
        report.details["memory"] = memory_in_use(pid, gpu)
    except BaseException:
        kill_started()
        if mounted:
            try:
                casfs.unmount(mounted)
            except casfs.CasfsError:
                pass
        life.close()
        raise
    replica = Replica(cfg, report, pid, proc, log_path, mounted, token)
    replica.restored = restored
    replica.lifeline = life
    try:  # the replica's /metrics and /boot then carry the whole pipeline's timings
        http_json(cfg.listen, "POST", "/_casfs/report", report.to_dict(), headers={CONTROL_HEADER: token})
    except (OSError, http.client.HTTPException) as e:
        log.warning("could not hand the boot report to the replica: %s", e)
    if cfg.report_path:
        write_report(report, cfg.report_path)
    return replica


def _create_and_restore(cfg: BootConfig, backend: Any, store: Any, timer: PhaseTimer, report: BootReport,
                        engine: str, model_dir: str, name: str, log_path: str, token: str,
                        weights: dict | None, gpu_snapshot: bool, life: Any) -> tuple[Any, int, Any, float]:
    """Cold boot under the snapshot supervisor, snapshot the ready worker, restore it to serve.
    Returns (process handle, pid, restored, seconds until ready). Raises BootError (the worker
    and any restore are stopped by then or by the caller)."""
    t_spawn = time.monotonic()
    env = worker_env(cfg, token)
    argv = worker_argv(cfg, model_dir, name, log_path, engine=engine, weights=weights,
                       gpu_snapshot=gpu_snapshot)
    proc = backend.spawn(argv, env, log_path)
    life.add("process", pid=proc.pid)
    try:
        backend.wait_ready(proc, cfg.boot_timeout)  # engine loaded and warm, not listening yet
    except BootError:
        proc.kill()
        raise
    ready = time.monotonic() - t_spawn
    with timer.phase("snapshot"):  # the dump ends the worker ...
        try:
            report.snapshot_create = backend.create(proc, store, cfg.snapshot)
        except BootError:
            proc.kill()  # a dump that failed leaves the worker running (CRIU resumes it)
            raise
    restored = None
    with timer.phase("restore"):  # ... which goes on serving from its snapshot
        restored = backend.restore(store, cfg.snapshot, listen=cfg.listen, seed=secrets.randbits(63),
                                   token=token, weights=weights)
        life.add("process", pid=restored.pid)
        try:
            wait_ready(cfg.listen, cfg.boot_timeout, lambda: exit_reason(restored.process, log_path))
        except BootError:
            terminate(restored.pid, None, 10)
            restored.process.kill()
            restored.cleanup()
            raise
    report.details["restore"] = restored.detail
    return restored.process, restored.pid, restored, ready
