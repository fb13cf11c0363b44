"""The replica process: loads the engine, warms it up, serves the API. This is what a CPU
snapshot captures.

Run by serve.boot (never by hand, though it works)::

    python -m serve.worker --model-dir DIR --name NAME --listen HOST:PORT
        [--engine vllm|transformers|echo] [--eager] [--max-model-len N] [--control-token T]
        [--log FILE] [--weights-store URL --weights-image ID --weights-path FILE
        [--weights-cache-dir DIR]] [--device auto|cpu|cuda] [--gpu-snapshot]

Steps, each timed (seconds, reported at GET /boot under ``worker``): ``start`` (interpreter
start and serve's imports, measured from $CASFS_SERVE_SPAWNED_AT, a wall-clock time the
parent sets), ``import`` (importing vLLM), ``engine`` (engine start, the import included: weights, KV
cache, compile),
``warmup`` (one short generation, so the first real request does not pay one-off costs),
``release`` (under a snapshot supervisor: the KV cache's pages and freed heap handed back
before a CPU snapshot's dump, ``release_for_snapshot`` of engines that have it), ``snapshot_wait``
(blocked while a snapshot is taken), ``listen``. vLLM's own timings (weights, compile) are parsed from the log (vLLM logs them from
its EngineCore process); the transformers engine reports its own (``engine_timings``: import,
build, weights, compile, capture). /health answers 200 once all of it is done.

GPU snapshots (``--gpu-snapshot``, transformers engine on a GPU, serve.gpu_snapshots): before
``snapshot.ready()`` the engine frees its weights and KV cache, keeping their addresses, and
torch's compile workers are stopped (CRIU dumps the whole process tree); after a restore, once
the supervisor resumed the GPU state, the instructions say where to stream the weights from and
the engine puts them back at the same addresses (``after_restore``: ``kv_cache``, ``weights``).

Snapshot-friendliness (CRIU dumps this process tree): stdio is /dev/null and the log file is
opened O_APPEND by the parent; the event loop is asyncio's own (epoll, no io_uring); no pipes or
sockets to the parent stay open; when a snapshot supervisor started it (snapshot.cpu.spawn),
it calls ``snapshot.ready()`` after the warmup and *before* listening, so the snapshot carries
no listening socket. After a restore it takes the supervisor's instructions (serve.instructions:
listen address, random seed, control token), reseeds and listens. ``POST /_casfs/report``
(with the control token) hands over the supervisor's boot report, which /boot and /metrics
then show.

Exit: SIGTERM or SIGINT closes the server and the engine and exits 0 at once (no interpreter
teardown); an engine that fails to start exits 3 with the reason in the log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
import time

WORKER_T0 = time.time()

from casfs import parse_listen  # noqa: E402

from .app import ServeApp, error_response  # noqa: E402
from .engine import Engine, EngineError, SamplingSettings, parse_vllm_timings  # noqa: E402
from .http import HttpServer, Request, Response  # noqa: E402
from .instructions import outer_pid, wait_instructions  # noqa: E402

if os.environ.get("CASFS_VLLM_LOAD_FORMAT") == "1" and __name__ != "__main__":
    # vLLM's EngineCore is a spawned child, which re-imports this (its parent's main) module as
    # __mp_main__ before it builds the model: register the casfs load format there too (the
    # worker sets the variable in VllmEngine.start; the vllm.general_plugins entry point does
    # the same where the package's metadata is installed)
    from serve.vllm_loader import register as _register_casfs_load_format  # noqa: E402

    _register_casfs_load_format()

log = logging.getLogger("serve.worker")

CONTROL_PREFIX = "/_casfs/"
WARMUP_PROMPT = "Hello, my name is"


def start_engine(args: argparse.Namespace, timings: dict[str, float]) -> Engine:
    """The engine named by --engine, started on --model-dir; ``timings["import"]`` gets the
    seconds spent importing the engine's package."""
    if args.engine == "echo":
        from .echo import EchoEngine

        return EchoEngine(args.name, max_model_len=args.max_model_len or 256)
    if args.engine == "transformers":
        from .hf_engine import TransformersEngine, TransformersOptions
        from .hf_model import WeightsSource

        t = time.monotonic()
        import transformers  # noqa: F401

        timings["import"] = time.monotonic() - t
        src = None
        if args.weights_store and args.weights_image:
            src = WeightsSource(args.weights_store, args.weights_image, args.weights_path or "model.safetensors",
                                args.weights_cache_dir or None)
        opts = TransformersOptions(device=args.device, compile=False if args.eager else None,
                                   max_model_len=args.max_model_len)
        return TransformersEngine.start(args.model_dir, args.name, opts, src)
    from .engine import VllmEngine, VllmOptions

    t = time.monotonic()
    VllmEngine.preload()
    timings["import"] = time.monotonic() - t
    weights = None
    if args.weights_store and args.weights_image:
        weights = {"store": args.weights_store, "image": args.weights_image,
                   "path": args.weights_path or "", "cache_dir": args.weights_cache_dir or ""}
    return VllmEngine.start(args.model_dir, args.name,
                            VllmOptions(enforce_eager=args.eager, max_model_len=args.max_model_len), weights=weights)


async def warm_up(engine: Engine) -> int:
    """One short greedy generation; returns the number of tokens generated."""
    ids = await asyncio.to_thread(engine.encode, WARMUP_PROMPT, add_special_tokens=True)
    n = 0
    async for d in engine.generate("warmup", ids, SamplingSettings(max_tokens=2, temperature=0.0)):
        n += len(d.token_ids)
    return n


class Worker:
    """The serving state of this process: app, HTTP server, boot timings, restore hooks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.app = ServeApp(boot_report=self.report)
        self.server = HttpServer(self._handle, on_error=lambda s, m: error_response(s, m))
        self.phases: dict[str, float] = {}
        self.vllm: dict[str, float] = {}
        self.restores = 0
        self.restored_phases: dict[str, float] = {}
        self.restore_seed: int | None = None
        self.boot: dict | None = None
        self.engine_timings: dict[str, float] = {}
        self.engine_config: dict = {}
        self.device_release: dict = {}
        self.engine: Engine | None = None
        self.released: dict[str, int] = {}
        self.spawned_at = float(os.environ.get("CASFS_SERVE_SPAWNED_AT", WORKER_T0))

    def _own_report(self) -> dict:
        return {"worker": {"pid": outer_pid(), "log": self.args.log, "phases": self.phases, "vllm": self.vllm,
                           "engine": self.args.engine, "eager": self.args.eager,
                           "engine_timings": self.engine_timings, "engine_config": self.engine_config,
                           "device_release": self.device_release,
                           "engine_stats": self.engine.stats() if hasattr(self.engine, "stats") else {},
                           "restores": self.restores, "after_restore": self.restored_phases,
                           "released_for_snapshot": self.released}}

    def report(self) -> dict:
        """/boot: the supervisor's whole-pipeline report once handed over, plus this process's view."""
        return {**(self.boot or {}), **self._own_report()}

    async def _handle(self, req: Request):
        if req.path.startswith(CONTROL_PREFIX):
            return await self._control(req)
        return await self.app.handle(req)

    async def _control(self, req: Request) -> Response:
        """The supervisor's channel (POST with the control token; anyone else gets a 404)."""
        token = self.args.control_token
        if req.method != "POST" or not token or \
                not hmac.compare_digest(req.headers.get("x-casfs-control", ""), token):
            return error_response(404, f"no route {req.method} {req.path}", code="not_found")
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return error_response(400, "body must be JSON")
        if not isinstance(body, dict):
            return error_response(400, "body must be a JSON object")
        if req.path == CONTROL_PREFIX + "report":
            self.boot = body
            phases = body.get("phases") or {}
            self.app.metrics.record_boot({k: float(v) for k, v in phases.items()}, body.get("total"),
                                         str(body.get("mode", "")), str(body.get("snapshot") or ""))
            return Response(200, b'{"ok":true}')
        if req.path in (CONTROL_PREFIX + "park", CONTROL_PREFIX + "unpark"):
            return await self._park(req.path == CONTROL_PREFIX + "park", body)
        return error_response(404, f"no route {req.method} {req.path}", code="not_found")

    async def release_for_snapshot(self, engine: Engine) -> None:
        """Just before a snapshot (only under a snapshot supervisor): drop what a restore
        would rather recreate than restore (``Engine.release_for_snapshot``: cached prefixes,
        the KV cache's pages, freed heap). Failing to release is logged, not fatal: the
        snapshot is only bigger."""
        try:
            import snapshot
        except ImportError:
            return
        release = getattr(engine, "release_for_snapshot", None)
        if not snapshot.supervised() or release is None or self.args.gpu_snapshot:
            return  # GPU snapshots release device memory in snapshot_point
        t = time.monotonic()
        try:
            self.released = await release()
        except EngineError as e:
            log.warning("%s: the snapshot keeps that memory", e)
        self.phases["release"] = time.monotonic() - t

    async def _park(self, park: bool, body: dict) -> Response:
        """(serve.pool) park: finish the running batch, hold new ones, free the weights and KV
        cache keeping their addresses; the supervisor then suspends the GPU state. unpark (after
        the supervisor resumed it): memory back at the same addresses, weights streamed in from
        ``body["weights"]``, batches go on. Answers the engine's report as JSON."""
        engine = self.engine
        if engine is None or not hasattr(engine, "release_device"):
            return error_response(409, f"the {self.args.engine} engine cannot be parked", code="not_parkable")
        try:
            if park:
                out = await asyncio.to_thread(engine.release_device)
            else:
                from .hf_model import WeightsSource

                w = body.get("weights") or {}
                src = (WeightsSource(w["store"], w["image"], w.get("path") or "model.safetensors",
                                     w.get("cache_dir") or None) if w.get("store") and w.get("image") else None)
                shared = body.get("shared") if isinstance(body.get("shared"), dict) else None
                out = await asyncio.to_thread(engine.restore_device, src, shared)
        except EngineError as e:
            return error_response(500, str(e), code="engine_error")
        return Response(200, json.dumps(out, default=str).encode())

    def snapshot_point(self, engine: Engine) -> None:
        """Where a snapshot is taken (when a snapshot supervisor started this process).

        Blocks in ``snapshot.ready()`` while the supervisor dumps this process. After a restore
        it takes the supervisor's instructions: the listen address, a fresh random seed (applied
        by ``run`` through ``Engine.reseed``), the control token, and for GPU snapshots where
        the weights come from. Without a supervisor it returns at once.
        """
        try:
            import snapshot

            supervised, ready = snapshot.supervised, snapshot.ready
        except ImportError:
            return
        if not supervised():
            return
        gpu = self.args.gpu_snapshot and hasattr(engine, "release_device")
        if gpu:
            t = time.monotonic()
            self.device_release = engine.release_device()  # type: ignore[attr-defined]
            _stop_compile_workers()
            self.phases["release_device"] = time.monotonic() - t
        t = time.monotonic()
        restored = ready()
        self.phases["snapshot_wait"] = time.monotonic() - t
        if not restored:
            if gpu:
                engine.restore_device()  # type: ignore[attr-defined]
            return
        t = time.monotonic()
        instr = wait_instructions()
        self.restores += 1
        self.args.listen = instr.get("listen") or self.args.listen
        self.args.control_token = instr.get("control_token") or self.args.control_token
        self.restore_seed = int(instr.get("seed", time.time_ns()))
        self.restored_phases = {"instructions": time.monotonic() - t}
        if gpu:
            from .hf_model import WeightsSource

            w = instr.get("weights") or {}
            src = None
            if w.get("store") and w.get("image"):
                src = WeightsSource(w["store"], w["image"], w.get("path") or "model.safetensors",
                                    w.get("cache_dir") or None)
            t = time.monotonic()
            back = engine.restore_device(src)  # type: ignore[attr-defined]
            self.restored_phases["device"] = time.monotonic() - t
            self.restored_phases.update({k: v for k, v in back.items() if isinstance(v, float)})
            self.restored_phases["weights_bytes"] = back.get("weights_bytes", 0)

    async def run(self) -> int:
        args = self.args
        self.phases["start"] = max(0.0, time.time() - self.spawned_at)
        t = time.monotonic()
        try:
            engine = start_engine(args, self.phases)
        except EngineError as e:
            log.error("%s", e)
            return 3
        self.phases["engine"] = time.monotonic() - t
        self.engine = engine
        t = time.monotonic()
        await warm_up(engine)
        self.phases["warmup"] = time.monotonic() - t
        self.engine_timings = dict(getattr(engine, "timings", {}) or {})
        self.engine_config = dict(getattr(engine, "config_summary", {}) or {})
        if args.log and args.engine == "vllm":
            try:
                with open(args.log, encoding="utf-8", errors="replace") as f:
                    self.vllm = parse_vllm_timings(f.read())
            except OSError:
                pass
        await self.release_for_snapshot(engine)
        try:
            self.snapshot_point(engine)
        except EngineError as e:
            log.error("%s", e)
            return 3
        if self.restore_seed is not None:
            t = time.monotonic()
            await engine.reseed(self.restore_seed)
            self.restored_phases["reseed"] = time.monotonic() - t
        t = time.monotonic()
        host, port = parse_listen(args.listen)
        self.app.set_engine(engine, ready=True)
        await self.server.start(host, port)
        self.phases["listen"] = time.monotonic() - t
        log.info("serving %s on %s:%d (boot phases %s)", args.name, *self.server.address, self.phases)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        t = time.monotonic()
        await self.server.close()
        await engine.close()
        log.info("stopped: server and engine closed in %.2f s", time.monotonic() - t)
        return 0


def _stop_compile_workers() -> None:
    """Stop torch inductor's compile worker processes, if any: CRIU dumps the whole process tree,
    and they are children of this one."""
    mod = sys.modules.get("torch._inductor.async_compile")
    stop = getattr(mod, "shutdown_compile_workers", None) if mod is not None else None
    if stop is not None:
        try:
            stop()
        except Exception as e:  # noqa: BLE001 - best effort; CRIU's rule check reports leftovers
            log.warning("stopping torch's compile workers: %s", e)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--name", required=True, help="model name served in /v1/models")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--engine", choices=("vllm", "transformers", "echo"), default="vllm")
    p.add_argument("--eager", action="store_true", help="no torch.compile (vLLM --enforce-eager)")
    p.add_argument("--device", default="auto", help="transformers engine: auto, cpu or cuda[:N]")
    p.add_argument("--weights-store", default=None, metavar="URL",
                   help="transformers engine: the casfs store the weights are streamed from")
    p.add_argument("--weights-image", default=None, metavar="ID", help="the model image in that store")
    p.add_argument("--weights-path", default=None, help="the safetensors file (or index json) in the image")
    p.add_argument("--weights-cache-dir", default=None, help="the store's ssd tier directory")
    p.add_argument("--gpu-snapshot", action="store_true",
                   help="release the GPU memory before snapshot.ready() and restore it after")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--control-token", default=os.environ.get("CASFS_SERVE_CONTROL_TOKEN", ""))
    p.add_argument("--log", default=None, help="the log file stdout/stderr go to (for vLLM's timings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve.worker[%(process)d] %(levelname)s %(message)s")
    try:
        parse_listen(args.listen)
    except ValueError as e:
        print(f"serve.worker: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run_and_exit(Worker(args)))


async def _run_and_exit(worker: Worker) -> int:
    """Run the worker; once it stopped, exit at once: after vLLM's own shutdown (well under a
    second) the interpreter's teardown (asyncio's executor, torch's and vLLM's exit handlers)
    took 5.3 s of a measured 6.9 s SIGTERM stop, and nothing of it matters to a replica."""
    rc = await worker.run()
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
