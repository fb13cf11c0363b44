"""Parked replicas: a warm pool that holds no GPU memory and resumes onto the GPU on demand (issue 12).

A replica (transformers engine on a GPU) is **parked** in two steps: the worker finishes its
running batch, holds new ones and frees its weights and KV cache while keeping their addresses
(``POST /_casfs/park``); then the NVIDIA driver moves the rest of its GPU state (context,
kernels, CUDA graphs and their pool) into the worker's host memory (``snapshot.suspend``). The
process keeps running on the CPU (its HTTP server answers; /health says 503, requests wait in
its queue) and holds no GPU memory. **Unpark** reverses it: free GPU memory is checked and
*reserved* first (a driver restore that runs out of memory leaves the process stuck for good:
NVIDIA/cuda-checkpoint#44), then ``snapshot.resume``, then ``POST /_casfs/unpark``: memory back
at the same addresses, the weights streamed in from casfs, the KV cache zeroed; the captured
graphs replay unchanged. A replica whose resume failed is killed by ``snapshot.resume`` and
recorded (``failed``); the pool then unparks or boots another.

Every park and unpark returns a report (phases in seconds, bytes freed / copied back, GPU
memory before and after) and updates the pool's Prometheus metrics (``render_metrics``).

Weights while parked: one host copy for all the parked replicas of a model
(serve.shared_weights: a sealed shared-memory file of the weights' verified chunks, made once by
the pool, mapped and page-locked by each worker, lent to its ``casfs.PinnedTier``): an unpark
copies the weights from it at the pinned host-to-device speed instead of re-reading them from
casfs. Without it (``shared=False``, or when a worker cannot use it: the reason is in its
report) the weights are re-read from casfs (the page cache or the store's tiers). Every park
report carries the worker's host memory (``host_memory``: RSS and PSS, where the shared copy
counts 1/N in each of N replicas).

The GPU calls go through serve.gpu_snapshots' GpuLayer (the driver); the CPU tests pass a fake
one, named as such.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import casfs

from .client import CONTROL_HEADER, first_token, http_json
from .errors import BootError
from .shared_weights import HostWeights, host_memory

__all__ = ["NoCapacity", "ParkedReplica", "Reservations", "WarmPool", "park", "park_cycles", "shared_weights",
           "unpark"]

DEFAULT_HEADROOM = 256 << 20


class NoCapacity(BootError):
    """Not enough free GPU memory to unpark a replica now (nothing was changed)."""


class Reservations:
    """GPU memory promised to unparks in flight, so two at once never both count the same free
    bytes. ``reserve`` raises NoCapacity when ``free - reserved < need``."""

    def __init__(self, gpu: Any) -> None:
        self.gpu = gpu
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._next = 0

    def reserve(self, need: int) -> int:
        with self._lock:
            free = int(self.gpu.memory().get("free", 0))
            held = sum(self._held.values())
            if free - held < need:
                raise NoCapacity(f"unpark needs {need >> 20} MiB of GPU memory; {free >> 20} MiB are free and "
                                 f"{held >> 20} MiB are promised to other unparks")
            self._next += 1
            self._held[self._next] = need
            return self._next

    def release(self, ticket: int) -> None:
        with self._lock:
            self._held.pop(ticket, None)

    @property
    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())


@dataclass
class ParkedReplica:
    """A replica's park state: the suspended GPU state, what the worker released, its weights."""

    replica: Any
    state: Any = None
    released: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    shared: dict | None = None  # serve.shared_weights.HostWeights.spec(): the host copy to copy from

    @property
    def parked(self) -> bool:
        return self.state is not None

    def need_bytes(self, headroom: int = DEFAULT_HEADROOM) -> int:
        """GPU memory an unpark needs: the driver's state, the weights and the KV cache."""
        dev = sum((getattr(self.state, "device_bytes", None) or {}).values()) if self.state is not None else 0
        return int(dev + self.released.get("weights_bytes", 0) + self.released.get("kv_cache_bytes", 0) + headroom)


def _control(rep: Any, path: str, body: dict | None = None, timeout: float = 300.0) -> dict:
    status, out = http_json(rep.listen, "POST", path, body or {}, timeout=timeout,
                            headers={CONTROL_HEADER: rep.control_token})
    if status != 200:
        msg = out.get("error", {}).get("message") if isinstance(out, dict) else out
        raise BootError(f"{path} on replica pid {rep.pid}: HTTP {status}: {msg}")
    return out if isinstance(out, dict) else {}


def park(p: ParkedReplica, gpu: Any) -> dict:
    """Park a serving replica (see the module docstring). Returns the report.

    Raises:
        BootError: the worker could not release its memory, or the suspend failed (the worker
            is then unparked again on the worker side where possible).
    """
    if p.parked:
        raise BootError(f"replica pid {p.replica.pid} is already parked")
    t0 = time.perf_counter()
    before = gpu.memory()
    p.released = _control(p.replica, "/_casfs/park")
    t1 = time.perf_counter()
    try:
        p.state = gpu.suspend(p.replica.pid)
    except Exception as e:  # noqa: BLE001 - CheckpointError, GpuUnavailable
        try:
            _control(p.replica, "/_casfs/unpark", {"weights": p.weights, "shared": p.shared})
        except BootError:
            pass
        raise BootError(f"suspending replica pid {p.replica.pid} failed: {type(e).__name__}: {e}") from None
    t2 = time.perf_counter()
    after = gpu.memory()
    held = gpu.process_memory(p.replica.pid) if hasattr(gpu, "process_memory") else None
    return {"op": "park", "process_gpu_bytes_while_parked": held, "pid": p.replica.pid, "phases": {"release": t1 - t0, "suspend": t2 - t1},
            "total": t2 - t0, "released": p.released, "host_memory_while_parked": host_memory(p.replica.pid),
            "device_state_bytes": sum((getattr(p.state, "device_bytes", None) or {}).values()),
            "gpu_memory_before": before, "gpu_memory_after": after}


def unpark(p: ParkedReplica, gpu: Any, reservations: Reservations, *, model: str | None = None,
           probe: bool = True) -> dict:
    """Unpark a parked replica onto the GPU; with ``probe``, time a first token too. Returns the report.

    Raises:
        NoCapacity: not enough free GPU memory (the replica stays parked, untouched).
        BootError: the resume or the reload failed; the replica was killed (``snapshot.resume``
            kills a process whose restore failed): boot another.
    """
    if not p.parked:
        raise BootError(f"replica pid {p.replica.pid} is not parked")
    t0 = time.perf_counter()
    before = gpu.memory()
    ticket = reservations.reserve(p.need_bytes())
    try:
        t1 = time.perf_counter()
        try:
            gpu.resume(p.state)
        except Exception as e:  # noqa: BLE001 - RestoreFailed (process killed), CheckpointError
            p.state = None
            raise BootError(f"resuming replica pid {p.replica.pid} failed: {type(e).__name__}: {e}") from None
        p.state = None
        t2 = time.perf_counter()
        back = _control(p.replica, "/_casfs/unpark", {"weights": p.weights, "shared": p.shared})
        t3 = time.perf_counter()
    finally:
        reservations.release(ticket)
    report: dict = {"op": "unpark", "pid": p.replica.pid,
                    "phases": {"reserve": t1 - t0, "resume": t2 - t1, "weights_and_kv": t3 - t2},
                    "worker": back, "weights_bytes_copied": back.get("weights_bytes", 0),
                    "shared_weights": back.get("shared_weights"),
                    "gpu_memory_before": before}
    if probe:
        secs, text = first_token(p.replica.listen, model or p.replica.cfg.name or p.replica.cfg.image)
        report["phases"]["first_token"] = secs
        report["first_token_text"] = text
    report["total"] = time.perf_counter() - t0
    report["gpu_memory_after"] = gpu.memory()
    if hasattr(gpu, "process_memory"):
        report["process_gpu_bytes"] = gpu.process_memory(p.replica.pid)
    return report


def _weights_of(rep: Any) -> dict:
    """Where the replica's weights come from (the boot report's worker arguments)."""
    cfg = rep.cfg
    with casfs.open_store(cfg.store, cache_dir=cfg.cache_dir) as store:
        from .boot import weights_source

        return weights_source(store, store.open_image(rep.report.image_id or cfg.image))


def shared_weights(weights: dict, gpu: Any, pin: str = "always") -> HostWeights:
    """The host copy of a model's weights for its parked replicas (sealed against writes unless
    the GPU cannot register read-only memory: ``gpu.host_register_read_only()``).

    Raises:
        casfs.CasfsError: the weights cannot be read and verified, or no sealed memfd here.
    """
    probe = getattr(gpu, "host_register_read_only", None)
    return HostWeights(weights, seal_writes=bool(probe()) if probe is not None else True, pin=pin)


class WarmPool:
    """N replicas of one model, parked, unparked on demand (``acquire``) and parked again
    (``release``). ``boot`` is how a replica is started (serve.boot.boot_replica with a
    per-replica listen address); ``gpu`` the GPU layer. ``shared``: keep one host copy of the
    weights for all of them (serve.shared_weights; ``host_weights`` then holds it, or None with
    the reason in ``shared_error`` when it could not be made). ``events``: every report, in
    order; ``failed``: replicas whose unpark failed (killed), with the reason."""

    def __init__(self, boot: Callable[[int], Any], n: int, gpu: Any, *, shared: bool = True) -> None:
        self.gpu = gpu
        self.reservations = Reservations(gpu)
        self.events: list[dict] = []
        self.failed: list[dict] = []
        self._lock = threading.Lock()
        self._boot = boot
        self.replicas: list[ParkedReplica] = []
        self.host_weights: HostWeights | None = None
        self.shared_error: str | None = None
        for i in range(n):
            self._add(i)
        if shared and self.replicas:
            try:
                self.host_weights = shared_weights(self.replicas[0].weights, gpu)
            except (casfs.CasfsError, OSError, ValueError) as e:
                self.shared_error = f"{type(e).__name__}: {e}"
            for p in self.replicas:
                p.shared = self.host_weights.spec() if self.host_weights is not None else None
        self.counters = {"parks": 0, "unparks": 0, "failed_unparks": 0, "no_capacity": 0}
        self.seconds: dict[str, list[float]] = {"park": [], "unpark": []}

    def _add(self, i: int) -> ParkedReplica:
        rep = self._boot(i)
        p = ParkedReplica(rep, weights=_weights_of(rep),
                          shared=self.host_weights.spec() if self.host_weights is not None else None)
        self.replicas.append(p)
        return p

    def park_all(self) -> list[dict]:
        return [self.release(p) for p in self.replicas if not p.parked]

    def release(self, p: ParkedReplica) -> dict:
        """Park ``p`` again (it must be idle)."""
        r = park(p, self.gpu)
        with self._lock:
            self.counters["parks"] += 1
            self.seconds["park"].append(r["total"])
            self.events.append(r)
        return r

    def acquire(self, *, probe: bool = True) -> tuple[ParkedReplica, dict]:
        """Unpark a parked replica (the first that fits); a failed one is recorded and the next
        is tried. Raises NoCapacity, or BootError when none is left."""
        for p in list(self.replicas):
            if not p.parked:
                continue
            try:
                r = unpark(p, self.gpu, self.reservations, probe=probe)
            except NoCapacity:
                self.counters["no_capacity"] += 1
                raise
            except BootError as e:
                self.counters["failed_unparks"] += 1
                self.failed.append({"pid": p.replica.pid, "reason": str(e)})
                self.replicas.remove(p)
                p.replica.stop(timeout=5)
                continue
            with self._lock:
                self.counters["unparks"] += 1
                self.seconds["unpark"].append(r["total"])
                self.events.append(r)
            return p, r
        raise BootError("no parked replica could be unparked: " + "; ".join(f["reason"] for f in self.failed[-3:]))

    def render_metrics(self) -> str:
        """The pool's state as Prometheus text: replicas parked/active, parks, unparks, failures,
        reserved bytes, park/unpark seconds."""
        reg = casfs.MetricRegistry()
        g = reg.add(casfs.Gauge("casfs_pool_replicas", "replicas in the pool by state", ("state",)))
        parked = sum(1 for p in self.replicas if p.parked)
        g.set(parked, state="parked")
        g.set(len(self.replicas) - parked, state="active")
        c = reg.add(casfs.Counter("casfs_pool_events_total", "parks, unparks, failed unparks, refusals", ("kind",)))
        for k, v in self.counters.items():
            c.inc(v, kind=k)
        reg.add(casfs.Gauge("casfs_pool_reserved_bytes", "GPU memory promised to unparks in flight")).set(
            self.reservations.held)
        h = reg.add(casfs.Histogram("casfs_pool_seconds", "park and unpark durations", ("op",)))
        for op, vals in self.seconds.items():
            for v in vals:
                h.observe(v, op=op)
        return reg.render()

    def stop(self) -> None:
        """Stop every replica. A parked one is killed outright (its GPU state is in host memory;
        it could not run its shutdown, whose CUDA calls would block); an active one gets SIGTERM."""
        import os
        import signal

        for p in self.replicas:
            if p.parked:
                try:
                    os.kill(p.replica.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.replica.stop(timeout=30)
        if self.host_weights is not None:
            self.host_weights.close()


def park_cycles(rep: Any, n: int, *, probe: Callable[[], dict], reference: dict | None, gpu: Any = None,
                shared: HostWeights | None = None, pin: str | None = None) -> dict:
    """(benchmarks) ``n`` park/unpark cycles of one serving replica; after each unpark, the time to
    first token and ``probe()``'s output compared with ``reference`` (tokens and log-probabilities).
    ``shared``: unpark from this host copy of the weights (else from casfs), with its pin mode
    or ``pin`` ("unpark": registered at each unpark; "always": kept registered while parked)."""
    if gpu is None:
        from .gpu_snapshots import DriverGpu

        gpu = DriverGpu()
    spec = shared.spec() if shared is not None else None
    if spec is not None and pin:
        spec["pin"] = pin
    p = ParkedReplica(rep, weights=_weights_of(rep), shared=spec)
    res = Reservations(gpu)
    cycles = []
    for _ in range(n):
        pr = park(p, gpu)
        ur = unpark(p, gpu, res, model=rep.report.image)
        out = probe()
        same = None
        if reference is not None:
            same = out["tokens"] == reference["tokens"] and out["token_logprobs"] == reference["token_logprobs"] \
                and out["top_logprobs"] == reference["top_logprobs"]
        cycles.append({"park": pr, "unpark": ur, "identical": same})
    return {"cycles": cycles}
