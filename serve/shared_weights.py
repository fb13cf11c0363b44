"""One host copy of a model's weights for all its parked replicas (issue 12, item 2).

How several worker processes share one pinned copy: pinned host memory is per process (CUDA
IPC hands over device memory, not host memory), so the supervisor puts the weights' verified
chunks in one sealed shared-memory file (``casfs.SharedChunks``: a memfd, read through casfs's
verifying reads, then sealed against writes and resizing). Each worker maps that file,
registers its mapping with CUDA (``cudaHostRegister``: the same physical pages page-locked for
its own context) and lends the chunks to its own ``casfs.PinnedTier`` (``PinnedTier.adopt``);
``snapshot.load_into_module`` then copies every chunk to the GPU straight from there, at the
pinned host-to-device speed, without reading or hashing it. The pages exist once: a parked
replica's PSS counts 1/N of them (``host_memory`` below).

Registration and the driver checkpoint: by default (``pin="always"``) a worker registers the
mapping at its first unpark and keeps it registered while parked: the driver's suspend and
resume carry the registration (measured on the H200, 2026-12-04: 3 + 2 cycles, identical
output, +2 MiB of device state), so an unpark copies at once. ``pin="unpark"`` unregisters it
at every park and registers it again at every unpark, for drivers that would refuse to
checkpoint page-locked shared memory: it costs 0.04-0.10 s per unpark for 1.19 GB.

Measured on the H200 (Qwen3-0.6B shape, 1.19 GB of bf16 weights, docs/benchmarks.md): the
unpark's weights step took 0.20-0.29 s re-reading from casfs (5.3-5.5 GiB/s, page cache),
0.075-0.15 s from the shared copy registered at each unpark (registration 0.04-0.10 s, copy
0.035-0.043 s at 26-32 GiB/s) and 0.040 s from the copy kept registered.

* :class:`HostWeights`: the supervisor's side (create the file once per model, hand out its spec);
* :class:`AttachedWeights`: the worker's side (attach, pin, unpin, the tier the loader copies from).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import casfs

__all__ = ["AttachedWeights", "HostWeights", "host_memory"]

log = logging.getLogger("serve.shared_weights")

PIN_MODES = ("unpark", "always")


class HostWeights:
    """The weights of one model (``weights``: the dict ``serve.boot.weights_source`` returns) in
    one sealed shared-memory file. ``seal_writes``: False only for GPUs that cannot register
    read-only memory (see ``casfs.SharedChunks``). ``pin``: "always" or "unpark" (see the
    module docstring).

    Raises:
        casfs.CasfsError: the model's chunks cannot be read and verified, or no sealed memfd here.
    """

    def __init__(self, weights: dict, *, seal_writes: bool = True, pin: str = "always") -> None:
        from .gpu_snapshots import weight_files

        if pin not in PIN_MODES:
            raise ValueError(f"pin must be one of {PIN_MODES}, not {pin!r}")
        self.weights = dict(weights)
        self.pin = pin
        t0 = time.perf_counter()
        with casfs.open_store(weights["store"], cache_dir=weights.get("cache_dir") or None) as store:
            image = store.open_image(weights["image"])
            self.chunks = casfs.SharedChunks.create(image, weight_files(image), seal_writes=seal_writes,
                                                    name=f"casfs-weights-{image.id[:12]}")
        self.seconds = time.perf_counter() - t0

    @property
    def nbytes(self) -> int:
        """Bytes of the shared file (the weights' distinct chunks, page-aligned)."""
        return self.chunks.size

    def spec(self) -> dict:
        """What a worker's unpark needs (``AttachedWeights``), JSON-able."""
        return {**self.chunks.spec(), "pin": self.pin}

    def report(self) -> dict:
        return {"bytes": self.nbytes, "chunks": len(self.chunks.chunks), "fill_s": self.seconds,
                "sealed_writes": self.chunks.sealed_writes, "pin": self.pin}

    def close(self) -> None:
        """Close the supervisor's descriptor; workers' mappings stay valid until they unmap."""
        self.chunks.close()


class AttachedWeights:
    """A worker's mapping of the supervisor's :class:`HostWeights` (its ``spec``) and the pinned
    tier that lends its chunks to the weights loader. On a CPU device nothing is registered (the
    loader moves the chunks with memmove).

    Raises:
        casfs.CasfsError: the file is gone, or lacks the seals its spec claims.
    """

    def __init__(self, spec: dict, device: Any) -> None:
        self.path = str(spec.get("path"))
        self.pin_mode = spec.get("pin", "unpark")
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        t0 = time.perf_counter()
        self.chunks = casfs.SharedChunks.attach(spec)
        # a tier of lent chunks only: a chunk the file lacks is read by the loader's own staging
        self.tier = casfs.PinnedTier(64 << 10, allocator=casfs.plain_memory, name="shared-weights")
        self.chunks.lend_to(self.tier)
        self.attach_s = time.perf_counter() - t0
        self.populated = False

    def matches(self, spec: dict) -> bool:
        return str(spec.get("path")) == self.path and int(spec.get("size", -1)) == self.chunks.size

    def pin(self) -> dict:
        """Ready for copies: registered with CUDA on a GPU (mapped pages on the CPU). Seconds."""
        out: dict[str, float] = {}
        if self.cuda:
            out["register_s"] = self.chunks.register()
        elif not self.populated:
            out["populate_s"] = self.chunks.populate()
        self.populated = True
        return out

    def unpin(self, parking: bool) -> dict:
        """Before a park (``parking``): unregister unless the pin mode keeps it. Seconds."""
        if self.cuda and (not parking or self.pin_mode != "always"):
            return {"unregister_s": self.chunks.unregister()}
        return {}

    def close(self) -> None:
        self.tier.free()
        self.chunks.close()


def host_memory(pid: int) -> dict[str, int]:
    """A process's host memory from /proc/PID/smaps_rollup, in bytes: ``rss``, ``pss`` and their
    anonymous / shared-memory / file parts. PSS divides every page among the processes mapping
    it, so a shared file of S bytes mapped by N processes adds S/N to each. {} when unreadable."""
    names = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "pss_anon", "Pss_Shmem": "pss_shmem",
             "Pss_File": "pss_file", "Shared_Clean": "shared_clean", "Private_Dirty": "private_dirty"}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in names:
                    out[names[k]] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out
