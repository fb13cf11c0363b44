"""How long `casfs serve` takes to stop on SIGTERM, and what it leaves running.

Boots a real replica (vLLM's CPU build from .venv-vllm, the tiny random Llama of
scripts/make_tiny_model.py, eager + fast boot) as a child process, waits for it to serve,
sends SIGTERM to `casfs serve`, and measures (wall seconds from the signal): the worker gone,
`casfs serve` exited (its own child: `Popen.wait`, not a `kill -0` poll that counts an unreaped
zombie), and whether any of the replica's processes or its model mount outlived it.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_stop.py [--repeat 2] [--checkout DIR]

``--checkout DIR`` runs another checkout's casfs (e.g. a worktree of an older commit: the
baseline), with the same model, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _group(pgid: int) -> list[int]:
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                rest = f.read().rpartition(b")")[2].split()
            if int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
                out.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    return out


def one(checkout: str, store: str, work: str) -> dict:
    listen = f"127.0.0.1:{_port()}"
    env = dict(os.environ, PYTHONPATH=checkout, CASFS_RUNTIME_DIR=os.path.join(work, "run"),
               CASFS_HOME=os.path.join(work, "home"))
    os.makedirs(work, exist_ok=True)
    err = open(os.path.join(work, "serve.err"), "wb")
    p = subprocess.Popen([VLLM_PY, "-m", "casfs.cli.main", "--store", store, "serve", "tiny", "--listen", listen,
                          "--no-gpu-check", "--eager", "--fast-boot", "--workdir", work],
                         env=env, cwd=checkout, stdout=subprocess.PIPE, stderr=err)
    buf = b""
    deadline = time.monotonic() + 600
    while b"\n" not in buf and time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 1)[0]:
            got = os.read(p.stdout.fileno(), 65536)
            if not got:
                p.wait()
                with open(os.path.join(work, "serve.err"), "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise SystemExit(f"casfs serve ({checkout}) exited with {p.returncode} before serving:\n{tail}")
            buf += got
    report = json.loads(buf.split(b"\n")[0])
    worker = int(report["details"]["worker"]["pid"])
    group = _group(worker)
    mp = report.get("model_dir", "")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    worker_gone = None
    while p.poll() is None:
        if worker_gone is None and not _alive(worker):
            worker_gone = time.monotonic() - t0
        time.sleep(0.01)
    exited = time.monotonic() - t0
    if worker_gone is None:
        worker_gone = exited
    time.sleep(0.5)
    left = [q for q in group if _alive(q)]
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == mp for line in f)
    for q in left:
        os.kill(q, signal.SIGKILL)
    if mounted:
        subprocess.run(["umount", "-l", mp], capture_output=True)
    return {"boot_s": report["total"], "worker_gone_s": worker_gone, "serve_exit_s": exited,
            "left_processes": len(left), "left_mount": mounted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--checkout", action="append", default=[], help="another checkout to measure (baseline)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="casfs-serve-stop-")
    model, store = os.path.join(tmp, "model"), os.path.join(tmp, "store")
    subprocess.run([VLLM_PY, os.path.join(ROOT, "scripts", "make_tiny_model.py"), model], check=True,
                   capture_output=True)
    stores = {}
    for n, co in enumerate([*args.checkout, ROOT]):  # each checkout builds its own (formats change)
        stores[co] = f"{store}-{n}"
        subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", stores[co], "build", model, "--tag", "tiny"],
                       check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=co), cwd=co)
    results: dict[str, list[dict]] = {}
    for i in range(args.repeat):
        for co in [*args.checkout, ROOT]:
            r = one(co, stores[co], os.path.join(tmp, f"w{i}-{len(results.get(co, []))}-{os.path.basename(co)}"))
            results.setdefault(co, []).append(r)
            print(f"{co}: {r}", flush=True)
    base = results[args.checkout[0]] if args.checkout else None
    for co, rs in results.items():
        ws = [r["worker_gone_s"] for r in rs]
        es = [r["serve_exit_s"] for r in rs]
        line = (f"{co}: worker gone {min(ws):.2f}-{max(ws):.2f} s, casfs serve exited {min(es):.2f}-{max(es):.2f} s "
                f"after SIGTERM; left behind: {sum(r['left_processes'] for r in rs)} processes, "
                f"{sum(r['left_mount'] for r in rs)} mounts")
        if base is not None and co == ROOT:
            b = sorted(r["serve_exit_s"] for r in base)[len(base) // 2]
            m = sorted(es)[len(es) // 2]
            line += f"; median exit {b / m:.1f}x faster than {args.checkout[0]}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
