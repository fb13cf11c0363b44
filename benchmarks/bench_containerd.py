#!/usr/bin/env python3
"""Cold `ctr run` of a real root filesystem: the casfs snapshotter against containerd's own
pull + unpack (overlayfs), both from one local registry behind the delay relay.

The image is a Debian bookworm root with Python (``debootstrap --variant=minbase
--include=python3``, made once into ``--rootfs``). It is published twice to Debian's
docker-registry on 127.0.0.1, through a ``tests.support.FaultProxy`` relay that adds
``--rtt-ms`` of round trip and a ``--rate-mbit`` cap each way (this kernel has no netem):

  plain: an ordinary OCI image, one gzip'd tar layer of the root (what ``docker build`` makes);
  casfs: ``casfs push`` of the same root built with casfs, with a startup profile recorded
         once beforehand (``casfs mount --record-profile`` + the workload in a chroot).

Each round starts from a cold host: a fresh containerd (own root, state, sockets), a fresh
casfs snapshotter (empty caches), page cache dropped. Timed from nothing to the container's
first byte of output:

  (a) ``ctr image pull`` (overlayfs: fetch + unpack every layer) then ``ctr run --rm REF ID CMD``
  (b) ``ctr image pull --snapshotter casfs`` then ``ctr run --rm --snapshotter casfs ...``

Bytes moved are what the relay carried from the registry to the host. Prints a table with
the ratio (a)/(b) per round and writes JSON to ``--out``.

Usage: python -m benchmarks.bench_containerd [--rootfs DIR] [--rtt-ms 50] [--rate-mbit 1000]
       [--repeat 3] [--cmd "python3 -c 'print(42)'"]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks._common import describe_machine, human_bytes, machine_info, write_results
from benchmarks.bench_cold_start import drop_caches, tree_stats
from tests.support import FaultProxy
from tests.support.containerd import CTR, containerd_server, snapshotter_process
from tests.support.registry import registry_server

CASFS = [sys.executable, "-m", "casfs.cli.main"]


def sh(*cmd: str, env: dict | None = None, timeout: float = 1800) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-2000:]}")
    return p.stdout


def ensure_rootfs(path: str) -> str:
    if not os.path.exists(os.path.join(path, "usr", "bin", "python3")):
        print(f"debootstrap --variant=minbase --include=python3 bookworm {path} (~2 min)...", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        sh("debootstrap", "--variant=minbase", "--include=python3", "bookworm", path,
           "http://deb.debian.org/debian")
    return path


def push_plain(registry_host: str, repo: str, tag: str, root: str, work: str) -> int:
    """An ordinary single-layer OCI image of ``root`` (gzip level 6, like docker); returns the
    layer's size."""
    from casfs.oci.registry import Registry, sha256_digest

    tar_path = os.path.join(work, "layer.tar")
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)
    with open(tar_path, "rb") as f:
        raw = f.read()
    os.unlink(tar_path)
    layer = gzip.compress(raw, compresslevel=6, mtime=0)
    reg = Registry(registry_host, repo, timeout=300)
    ld = reg.push_blob(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                                    "Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw)]}}).encode()
    cd = reg.push_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": cd, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": ld, "size": len(layer)}]}).encode()
    reg.put_manifest(tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return len(layer)


def build_casfs(root: str, store: str, work: str, cmd: list[str]) -> str:
    """Build ``root`` into local store ``store`` and record its startup profile (the workload
    run once in a chroot of a casfs mount). Returns the image id."""
    out = sh(*CASFS, "--store", store, "build", root, "--tag", "debian-python", "--no-progress")
    print(out.strip(), flush=True)
    mnt = os.path.join(work, "profile-mnt")
    os.makedirs(mnt, exist_ok=True)
    sh(*CASFS, "--store", store, "mount", "debian-python", mnt, "--record-profile", "120", "--no-profile")
    try:
        subprocess.run(["/usr/sbin/chroot", mnt, *cmd], capture_output=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        sh(*CASFS, "profile", "stop", mnt)
    finally:
        sh(*CASFS, "umount", mnt)
    return sh(*CASFS, "--store", store, "images").strip()


def first_output(cd, args: list[str], timeout: float = 600) -> tuple[float, int, bytes]:
    """Run ``ctr ARGS``; returns (seconds to its first stdout byte, exit code, all stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([CTR, "--address", cd.socket, "--namespace", cd.namespace, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    err = p.stderr.read()
    rc = p.wait(timeout)
    if rc != 0 or not first:
        raise SystemExit(f"ctr {' '.join(args)} failed ({rc}): {err.decode(errors='replace')[-2000:]}")
    return t_first, rc, first + rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", default="/var/tmp/casfs-oci-bench/rootfs",
                    help="Debian root with python3 (debootstrapped there if missing)")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="emulated round trip to the registry")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="emulated bandwidth cap, each way")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cmd", default="python3 -c 'import json, sqlite3, email.parser; print(42)'",
                    help="the container's command (its first output line is the finish)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/containerd.json)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, mounts, dropping the page cache)")
    started = time.time()
    machine = machine_info()
    cmd = shlex.split(args.cmd)
    root = ensure_rootfs(args.rootfs)
    nfiles, nbytes = tree_stats(root)
    print(f"image: {root}: {nfiles} files, {human_bytes(nbytes)}", flush=True)
    work = tempfile.mkdtemp(prefix="casfs-ctrbench-", dir="/var/tmp")
    rounds = []
    try:
        store = os.path.join(work, "store")
        build_casfs(root, store, work, cmd)
        with registry_server() as reg, FaultProxy(reg.port) as relay:
            half = args.rtt_ms / 2000.0
            rate = args.rate_mbit * 1e6 / 8
            relay.set_latency(up=half, down=half)
            relay.set_rate(up=rate, down=rate)
            via = f"127.0.0.1:{relay.port}"
            layer_bytes = push_plain(reg.host, "bench/plain", "v1", root, work)
            print(f"plain image: one layer of {human_bytes(layer_bytes)} (gzip -6)", flush=True)
            env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
            print(sh(*CASFS, "--store", store, "push", "debian-python", f"{via}/bench/casfs:v1",
                     "--no-progress", env=env, timeout=3600).strip(), flush=True)
            for r in range(args.repeat):
                row = {"round": r + 1}
                order = ("plain", "casfs") if r % 2 == 0 else ("casfs", "plain")
                for which in order:
                    drop_caches()
                    with snapshotter_process() as sn, containerd_server(sn.socket) as cd:
                        ref = f"{via}/bench/{which}:v1"
                        snap = ["--snapshotter", "casfs"] if which == "casfs" else []
                        before = relay.stats["bytes_down"]
                        t0 = time.perf_counter()
                        cd.ctr("image", "pull", "--plain-http", *snap, ref, timeout=1800)
                        t_pull = time.perf_counter() - t0
                        t_run, _, out = first_output(cd, ["run", "--rm", *snap, ref, f"b{r}{which}", *cmd])
                        total = t_pull + t_run
                        time.sleep(0.5)  # let the lazy mount's background prefetch finish counting
                        moved = relay.stats["bytes_down"] - before
                        row[which] = {"pull_s": round(t_pull, 3), "run_to_first_output_s": round(t_run, 3),
                                      "total_s": round(total, 3), "bytes_moved": moved,
                                      "output": out.decode(errors="replace").strip()[:80]}
                row["ratio"] = round(row["plain"]["total_s"] / row["casfs"]["total_s"], 2)
                rounds.append(row)
                print(f"round {r + 1}: plain {row['plain']['total_s']:.2f} s "
                      f"(pull {row['plain']['pull_s']:.2f}, {human_bytes(row['plain']['bytes_moved'])}) | "
                      f"casfs {row['casfs']['total_s']:.2f} s (pull {row['casfs']['pull_s']:.2f}, "
                      f"{human_bytes(row['casfs']['bytes_moved'])}) | {row['ratio']:.1f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(which: str, k: str) -> float:
        return statistics.median(r[which][k] for r in rounds)

    ratios = [r["ratio"] for r in rounds]
    print(f"\ncold `ctr run` to first output, {args.cmd!r}, registry behind a {args.rtt_ms:.0f} ms RTT, "
          f"{args.rate_mbit:.0f} Mbit/s relay ({nfiles} files, {human_bytes(nbytes)}):")
    print(f"{'':36} {'total s':>9} {'pull s':>8} {'run s':>8} {'moved':>11}")
    for which, name in (("plain", "(a) pull + unpack (overlayfs)"), ("casfs", "(b) casfs snapshotter")):
        print(f"{name:36} {med(which, 'total_s'):>9.2f} {med(which, 'pull_s'):>8.2f} "
              f"{med(which, 'run_to_first_output_s'):>8.2f} {human_bytes(med(which, 'bytes_moved')):>11}")
    print(f"ratio (a)/(b): {min(ratios):.1f}-{max(ratios):.1f}x (median {statistics.median(ratios):.1f}x); "
          f"bytes moved {med('plain', 'bytes_moved') / max(1, med('casfs', 'bytes_moved')):.0f}x fewer")
    print(describe_machine(machine))
    path = write_results("containerd", {"rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit, "cmd": args.cmd,
                                        "files": nfiles, "bytes": nbytes, "repeat": args.repeat},
                         {"rounds": rounds, "ratio_range": [min(ratios), max(ratios)]},
                         started=started, out=args.out, machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
