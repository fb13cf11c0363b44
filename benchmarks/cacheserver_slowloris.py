"""A `casfs cache-server` under a slowloris attack, at its default limits: N connections from
four loopback addresses trickle request heads one byte every --interval seconds while a
well-behaved client asks for /health; prints each /health answer and its latency.

    ulimit -n 8192; PYTHONPATH=$PWD .venv/bin/python benchmarks/cacheserver_slowloris.py \\
        [--connections 1030] [--rounds 12] [--interval 0.5] [--checkout DIR]

``--checkout DIR`` runs another checkout's server (the baseline) the same way in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attack(checkout: str, store: str, n: int, rounds: int, interval: float) -> list[tuple[str, float]]:
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", store, "--memory", "16M"], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=checkout)
    try:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        socks = []
        for i in range(n):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 4}", 0))
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            socks.append(s)
        payload = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        out = []
        for r in range(rounds):
            for s in socks:
                try:
                    s.send(payload[r % len(payload):r % len(payload) + 1])
                except OSError:
                    pass
            t = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    out.append((c.recv(100)[:12].decode(errors="replace"), time.monotonic() - t))
            except OSError as e:
                out.append((type(e).__name__, time.monotonic() - t))
            time.sleep(interval)
        for s in socks:
            s.close()
        return out
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1030)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--checkout", action="append", default=[])
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="casfs-slowloris-")
    os.makedirs(os.path.join(tmp, "t"))
    with open(os.path.join(tmp, "t", "f"), "wb") as f:
        f.write(b"x" * 1000)
    subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", os.path.join(tmp, "store"), "build",
                    os.path.join(tmp, "t"), "--tag", "t"], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    for co in [*args.checkout, ROOT]:
        res = attack(co, os.path.join(tmp, "store"), args.connections, args.rounds, args.interval)
        ok = sum(1 for code, _ in res if code.endswith("200"))
        lat = sorted(t for _, t in res)
        print(f"{co}: /health answered 200 {ok}/{len(res)} times during {args.connections} slow connections "
              f"(latency {lat[0] * 1000:.0f}-{lat[-1] * 1000:.0f} ms); answers: {sorted(set(c for c, _ in res))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
