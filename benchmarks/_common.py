"""Shared helpers of the core benchmarks: machine facts, timing, tables, and results JSON.

Every benchmark measures its baseline in the same run and prints ratios against it, because
the machines these run on (2-core Firecracker VMs shared with other work) vary run to run far
more than any code change: a number without its same-run baseline says little.

Benchmarks run from the repository root as modules (``python -m benchmarks.bench_tiers``),
so that ``casfs``, ``benchmarks._common`` and the test servers (``tests.support``) import
without any ``sys.path`` edits.

Results are written as JSON (``write_results``): ``{"benchmark", "command", "machine",
"started", "seconds", "params", "results"}``, by default to ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
MiB = 1 << 20
GiB = 1 << 30


# -- machine ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, kernel, Python, load, git commit."""
    cpu = ""
    flags = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name") and not cpu:
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    cmdline = _read("/proc/cmdline").lower()
    virt = "firecracker VM" if "firecracker" in cmdline or "-fc-" in platform.release() \
        else ("VM" if " hypervisor" in flags else "bare metal")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512f": " avx512f" in flags,
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "virtualization": virt,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
        "nice": os.nice(0),
        "git_commit": commit + ("+dirty" if dirty else ""),
    }


def describe_machine(m: dict[str, Any]) -> str:
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['virtualization']}, "
            f"kernel {m['kernel']}, Python {m['python']}, load {m['loadavg'][0]:.2f}, "
            f"commit {m['git_commit']}")


# -- timing ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """Timings of repeated runs, in seconds."""

    values: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (q in [0, 1])."""
        v = sorted(self.values)
        return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]

    def summary(self, scale: float = 1.0) -> dict[str, float]:
        """min/median/p90/p99/max/mean, each multiplied by ``scale`` (1e3 for ms)."""
        return {"n": len(self.values), "min": self.min * scale, "median": self.median * scale,
                "p90": self.quantile(0.9) * scale, "p99": self.quantile(0.99) * scale,
                "max": max(self.values) * scale, "mean": statistics.fmean(self.values) * scale}


def repeat(fn: Callable[..., Any], repeats: int, warmup: int = 1,
           setup: Callable[[], Any] | None = None) -> Samples:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls. With ``setup``, each call
    is ``fn(setup())`` and only ``fn`` is timed."""
    s = Samples()
    for k in range(warmup + repeats):
        if setup is not None:
            arg = setup()
            t0 = time.perf_counter()
            fn(arg)
        else:
            t0 = time.perf_counter()
            fn()
        dt = time.perf_counter() - t0
        if k >= warmup:
            s.add(dt)
    return s


class Clock:
    """Wall and CPU time of a block: ``with Clock() as c: ...; c.wall, c.cpu``.

    ``cpu`` is user+system seconds of this process (all threads) plus its waited-for children.
    On a shared machine wall time swings with other people's load; CPU seconds per unit of
    work barely move, so benchmarks report both (e.g. MB/s and MB per CPU-second).
    """

    __slots__ = ("wall", "cpu", "_w", "_c")

    @staticmethod
    def process_cpu() -> float:
        """User+system CPU seconds of this process so far (all threads)."""
        s = resource.getrusage(resource.RUSAGE_SELF)
        return s.ru_utime + s.ru_stime

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __enter__(self) -> "Clock":
        self._w, self._c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = self._cpu() - self._c


def ratio(x: float, base: float) -> str:
    """'2.31x' (x / base), or 'n/a'."""
    if not base:
        return "n/a"
    r = x / base
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


# -- output ----------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table of ``rows`` (missing cells blank)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(name: str, params: dict[str, Any], results: Any, *, started: float, out: str | None,
                  machine: dict[str, Any]) -> str:
    """Write the results JSON; returns its path (``out`` or ``benchmarks/results/<name>.json``)."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)]
                            + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": {**machine, "loadavg_end": list(os.getloadavg())},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "params": params,
        "results": results,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
