"""``casfs serve``: boot an OpenAI-compatible replica of a model image and serve until stopped.

Thin over serve.boot; vLLM is imported only by the replica process, so ``casfs --help`` and
this module work without it. The group is a ``casfs.commands`` plugin (pyproject.toml): casfs's
command line loads it, and casfs itself never imports serve.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from .preflight import ENGINE_CHECKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model image over an OpenAI-compatible API (vLLM or transformers)",
        description="Boot a replica of MODEL_IMAGE (a casfs image of a Hugging Face model directory: "
                    "config, tokenizer, safetensors) and serve /v1/completions, /v1/chat/completions, "
                    "/v1/models, /health and /metrics until SIGTERM/SIGINT. The boot is a timed "
                    "pipeline: GPU health -> mount (lazy) -> restore from --snapshot, or cold init -> "
                    "weights -> warmup -> first token; its JSON report is printed to stdout (one "
                    "line) and served at /boot.")
    p.add_argument("image", metavar="MODEL_IMAGE", help="tag or id of the model image")
    p.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:8000)")
    p.add_argument("--snapshot", metavar="TAG", default=None,
                   help="restore the replica from the snapshot TAG (with --create: make it; a "
                        "transformers replica on a GPU makes a GPU snapshot: weights and KV cache "
                        "left out, GPU state through the driver's checkpoint). A failed or "
                        "incompatible snapshot boots cold instead, the reason in the report. A "
                        "restored replica keeps the engine settings and model name it was created "
                        "with (--name/--engine/--eager/--fast-boot/--max-model-len are then ignored); "
                        "use the same --workdir for creating and restoring")
    p.add_argument("--snapshot-source", choices=("auto", "store", "export"), default="auto",
                   help="where a restore reads the snapshot: store (lazily: memory pages come from "
                        "the casfs store as the replica touches them, nothing unpacked; needs "
                        "userfaultfd), export (exported once per host, restored eagerly); default "
                        "auto: this host's export of the snapshot when it has one (an eager restore from it "
                        "was faster: 5.8 s against 9.9-11.4 s), else store where the kernel allows; "
                        "export for GPU snapshots (from the store "
                        "the driver's resume faults its device state in page by page: 10x slower, "
                        "measured on the H200). A GPU snapshot whose store restore fails is retried "
                        "once from the export, before any cold boot")
    p.add_argument("--create", action="store_true",
                   help="with --snapshot: cold boot, then snapshot the ready replica as TAG")
    p.add_argument("--name", default=None, help="model name in the API (default: MODEL_IMAGE)")
    p.add_argument("--engine", choices=("auto", *ENGINE_CHECKS), default="auto",
                   help="auto (default: vllm where the worker's Python has it, else transformers), "
                        "vllm, transformers (Hugging Face models with a static KV cache, compiled "
                        "decoding and CUDA graphs on a GPU; weights streamed from casfs), or echo: a "
                        "deterministic stand-in that needs no model")
    p.add_argument("--eager", action="store_true",
                   help="skip torch.compile (vLLM --enforce-eager; transformers still records CUDA "
                        "graphs of the eager step on a GPU)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="transformers engine: auto (the GPU if any), cpu or cuda[:N]")
    p.add_argument("--restore-gpu", default=None, metavar="GPU",
                   help="where a GPU snapshot resumes: auto (its own GPU when it has the memory, else the "
                        "GPU of the same model with the most free memory), cuda:N or N (nvidia-smi's index), "
                        "or a GPU UUID (default: the GPU it was made on)")
    p.add_argument("--fast-boot", action="store_true",
                   help="run vLLM's model in its EngineCore process, OpenMP threads unpinned "
                        "(VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_OMP_THREADS_BIND=nobind)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N", help="context length")
    p.add_argument("--materialize", choices=("auto", "mount", "export"), default="auto",
                   help="how the engine gets the model (default auto: config and tokenizer on disk, "
                        "weights streamed from casfs, vLLM through its casfs load format; mount: a "
                        "lazy FUSE mount of the image and vLLM's own loader; export: a full copy)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="mounts, exports and logs (default $CASFS_HOME/serve)")
    p.add_argument("--no-gpu-check", action="store_true", help="skip the GPU health phase")
    p.add_argument("--report", metavar="PATH", default=None, help="also write the boot report here")
    p.add_argument("--boot-timeout", type=float, default=900.0, metavar="SECONDS")
    p.add_argument("--park", type=int, default=0, metavar="N",
                   help="a warm pool: boot N replicas (from --snapshot where it restores; a GPU snapshot restores "
                        "one process per PID at a time, so the others boot cold), park "
                        "them (GPU memory released: weights and KV cache freed, GPU state moved to host "
                        "memory by the driver) and serve on --listen as their front door: a request "
                        "unparks one (free GPU memory checked and reserved first), a replica idle for "
                        "--idle-park seconds is parked again. GET /pool and /metrics show the pool")
    p.add_argument("--idle-park", type=float, default=60.0, metavar="SECONDS",
                   help="with --park: park an active replica after this long without requests (default 60)")
    p.add_argument("--exit-after-boot", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .boot import BootConfig, boot_replica

    if args.create and not args.snapshot:
        raise ValueError("--create needs --snapshot TAG (the tag to store the snapshot under)")
    for flag, value in (("--max-model-len", args.max_model_len), ("--boot-timeout", args.boot_timeout),
                        ("--idle-park", args.idle_park)):
        if value is not None and not value > 0:  # (-1 failed the replica's warmup with a traceback)
            raise ValueError(f"{flag} {value}: must be above 0")
    cfg = BootConfig(image=args.image, listen=args.listen, store=args.store, cache_dir=args.cache_dir,
                     name=args.name, engine=args.engine, eager=args.eager, device=args.device,
                     fast_boot=args.fast_boot,
                     max_model_len=args.max_model_len, materialize=args.materialize, workdir=args.workdir,
                     snapshot=args.snapshot, snapshot_source=args.snapshot_source,
                     create_snapshot=args.create, gpu_check=not args.no_gpu_check, restore_gpu=args.restore_gpu,
                     boot_timeout=args.boot_timeout, report_path=args.report)
    if args.park:
        return _serve_pool(args, cfg)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Installed before booting: a SIGTERM at any point stops what was started (boot_replica
    # cleans up after itself; a booted replica is stopped below), never orphans it.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)  # a closed terminal stops the replica as Ctrl-C does
    try:
        replica = boot_replica(cfg)
    except KeyboardInterrupt:
        print("casfs serve: interrupted while booting; stopped what was started", file=sys.stderr)
        return 130
    try:
        print(json.dumps(replica.report.to_dict()), flush=True)
        phases = " ".join(f"{k}={v:.2f}s" for k, v in replica.report.phases.items())
        print(f"casfs serve: {replica.report.mode} boot of {args.image} to first token in "
              f"{replica.report.total:.2f} s ({phases}); serving on http://{args.listen}/v1 "
              f"[pid {replica.pid}, log {replica.log_path}]", file=sys.stderr, flush=True)
        if args.exit_after_boot:
            code = 0
        else:
            code = replica.wait()
            print(f"casfs serve: the replica exited with status {code} (log {replica.log_path})",
                  file=sys.stderr)
            code = 1 if code else 0
    except KeyboardInterrupt:
        code = 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the shutdown finish
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    t = time.monotonic()
    replica.stop()
    print(f"casfs serve: stopped in {time.monotonic() - t:.2f} s (replica and model mount)", file=sys.stderr)
    return code


def _free_listen(host: str) -> str:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def _serve_pool(args: argparse.Namespace, cfg: object) -> int:
    """``--park N``: boot N replicas, park them, serve as their front door (serve.front)."""
    import asyncio
    import dataclasses

    from casfs import parse_listen

    from .boot import boot_replica
    from .front import FrontDoor
    from .gpu_snapshots import DriverGpu
    from .pool import WarmPool

    if args.park < 1:
        raise ValueError("--park needs N >= 1 replicas")
    host, _ = parse_listen(args.listen)
    gpu = DriverGpu()

    def boot(i: int):
        return boot_replica(dataclasses.replace(cfg, listen=_free_listen(host), report_path=None,
                                                create_snapshot=args.create and i == 0))

    pool = WarmPool(boot, args.park, gpu)
    try:
        parked = pool.park_all()
        print(json.dumps({"pool": [{"pid": p.replica.pid, "listen": p.replica.listen, "parked": p.parked}
                                   for p in pool.replicas], "parks": parked}, default=str), flush=True)
        front = FrontDoor(pool, idle_s=args.idle_park)

        async def run() -> None:
            addr = await front.start(args.listen)
            print(f"casfs serve: {len(pool.replicas)} parked replica(s) of {args.image} behind "
                  f"http://{addr[0]}:{addr[1]}/v1 (unparked on demand, parked after {args.idle_park:.0f} s idle)",
                  file=sys.stderr, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            await front.close()

        asyncio.run(run())
    finally:
        pool.stop()
    return 0
