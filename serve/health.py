"""GPU health check before a replica boots (NVML through nvidia-ml-py, plus an active matmul).

A replica must not boot onto a GPU that will corrupt or crash its work. :func:`check_gpus`
inspects every visible GPU:

* NVML sees it (name, UUID);
* no memory pages pending retirement (older GPUs) and no pending row remapping or remap
  failure (A100/H100 and later);
* no uncorrected (double-bit) ECC errors since the driver loaded (volatile counter);
* temperature below ``max_temp_c`` and below the GPU's own slowdown threshold;
* an active check (``active=True``, when torch with CUDA is importable): a small matrix
  product with an exactly representable known answer, computed on each device and compared
  bit for bit.

Checks NVML reports as not supported on a device are noted, not failed. The result is a
:class:`HealthReport`; ``status`` is ``"healthy"``, ``"unhealthy"`` (with the reasons) or
``"no_gpu"`` (NVML or the driver is absent, or no device is visible: a CPU host; the reason
says which). :func:`require_healthy` raises :class:`GpuUnhealthy` for an unhealthy report, so
boot refuses with a clear reason.

``nvml`` and ``torch`` can be passed in (defaults: ``import pynvml`` / ``import torch``), which
lets the decision rules be tested on hosts without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from casfs import CasfsError

DEFAULT_MAX_TEMP_C = 85


class GpuUnhealthy(CasfsError):
    """A GPU failed its health check; the replica refuses to boot on this host."""


@dataclass
class GpuHealth:
    """One device's result. ``problems`` make it unhealthy; ``notes`` are informational."""

    index: int
    name: str = ""
    uuid: str = ""
    temperature_c: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    active_check: str = "skipped"

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass
class HealthReport:
    """The whole host: ``status`` is "healthy", "unhealthy" or "no_gpu"; ``reason`` explains
    "unhealthy" and "no_gpu"; ``seconds`` is how long the check took."""

    status: str
    reason: str = ""
    driver: str = ""
    gpus: list[GpuHealth] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _nvml_error(nvml: Any) -> type[BaseException]:
    return getattr(nvml, "NVMLError", Exception)


def _not_supported(nvml: Any, e: BaseException) -> bool:
    ns = getattr(nvml, "NVMLError_NotSupported", None)
    return (ns is not None and isinstance(e, ns)) or "Not Supported" in str(e)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def check_gpus(*, max_temp_c: int = DEFAULT_MAX_TEMP_C, active: bool = True,
               nvml: Any = None, torch: Any = None) -> HealthReport:
    """Check every visible GPU; see the module docstring. Never raises for a sick or absent
    GPU (that is the report's job); raises only on programming errors."""
    t0 = time.monotonic()
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return HealthReport("no_gpu", "no GPU: nvidia-ml-py is not installed (pip install 'casfs[gpu]')",
                                seconds=time.monotonic() - t0)
    err = _nvml_error(nvml)
    try:
        nvml.nvmlInit()
    except err as e:
        return HealthReport("no_gpu", f"no GPU: NVML cannot start ({e}); no NVIDIA driver on this host",
                            seconds=time.monotonic() - t0)
    try:
        report = HealthReport("healthy")
        try:
            report.driver = _text(nvml.nvmlSystemGetDriverVersion())
        except err:
            pass
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            report.status, report.reason = "no_gpu", "no GPU: the NVIDIA driver is loaded but no device is visible"
            return report
        for i in range(count):
            report.gpus.append(_check_device(nvml, i, max_temp_c))
    finally:
        try:
            nvml.nvmlShutdown()
        except err:
            pass
    if active:
        _active_checks(report, torch)
    bad = [g for g in report.gpus if not g.healthy]
    if bad:
        report.status = "unhealthy"
        report.reason = "; ".join(f"GPU {g.index} ({g.name or g.uuid or '?'}): {', '.join(g.problems)}" for g in bad)
    report.seconds = time.monotonic() - t0
    return report


def _check_device(nvml: Any, index: int, max_temp_c: int) -> GpuHealth:
    err = _nvml_error(nvml)
    g = GpuHealth(index)
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
    except err as e:
        g.problems.append(f"NVML cannot open the device: {e}")
        return g

    def probe(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(h, *args)
        except err as e:
            if _not_supported(nvml, e):
                g.notes.append(f"{what}: not supported")
            else:
                g.problems.append(f"{what}: NVML error {e}")
            return None

    g.name = _text(probe("name", nvml.nvmlDeviceGetName) or "")
    g.uuid = _text(probe("uuid", nvml.nvmlDeviceGetUUID) or "")

    pending = probe("retired pages", nvml.nvmlDeviceGetRetiredPagesPendingStatus)
    if pending:
        g.problems.append("memory pages are pending retirement (reset the GPU)")
    rows = probe("row remapping", nvml.nvmlDeviceGetRemappedRows)
    if rows is not None:
        _corr, unc, is_pending, failed = rows
        if failed:
            g.problems.append("row remapping failed (the GPU needs service)")
        elif is_pending:
            g.problems.append(f"row remapping is pending ({unc} uncorrectable rows; reset the GPU)")
    ecc_mode = probe("ECC mode", nvml.nvmlDeviceGetEccMode)
    if ecc_mode is not None and ecc_mode[0] == getattr(nvml, "NVML_FEATURE_ENABLED", 1):
        unc = probe("ECC errors", nvml.nvmlDeviceGetTotalEccErrors,
                    nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        if unc:
            g.problems.append(f"{unc} uncorrected ECC errors since the driver loaded")
    elif ecc_mode is not None:
        g.notes.append("ECC is disabled")
    temp = probe("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
    if temp is not None:
        g.temperature_c = int(temp)
        limit = max_temp_c
        slowdown = probe("slowdown threshold", nvml.nvmlDeviceGetTemperatureThreshold,
                         nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        if slowdown:
            limit = min(limit, int(slowdown))
        if g.temperature_c >= limit:
            g.problems.append(f"temperature {g.temperature_c} C is at or above {limit} C")
    return g


def _active_checks(report: HealthReport, torch: Any) -> None:
    """A small matmul with a known exact answer on every device (skipped without torch+CUDA)."""
    if torch is None:
        try:
            import torch  # type: ignore[no-redef]
        except ImportError:
            for g in report.gpus:
                g.active_check = "skipped: torch is not installed"
            return
    if not torch.cuda.is_available():
        for g in report.gpus:
            g.active_check = "skipped: torch has no CUDA here"
        return
    n = 64
    # Small integers: every product and sum is exact in float32, so the answer is exact too.
    a = (torch.arange(n * n, dtype=torch.float32).reshape(n, n) % 7) - 3
    b = (torch.arange(n * n, dtype=torch.float32).reshape(n, n).t() % 5) - 2
    expected = a @ b  # on the CPU
    for g in report.gpus:
        if g.index >= torch.cuda.device_count():
            g.active_check = "skipped: not visible to CUDA"
            continue
        try:
            dev = torch.device("cuda", g.index)
            got = (a.to(dev) @ b.to(dev)).cpu()
            torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - any CUDA failure is the finding
            g.active_check = f"failed: {type(e).__name__}: {e}"
            g.problems.append(f"active check failed: {type(e).__name__}: {e}")
            continue
        if torch.equal(got, expected):
            g.active_check = "passed"
        else:
            wrong = int((got != expected).sum())
            g.active_check = f"failed: {wrong} of {n * n} elements wrong"
            g.problems.append(f"active check: a {n}x{n} matmul gave {wrong} wrong elements")


def require_healthy(report: HealthReport) -> HealthReport:
    """Return ``report`` unless it is unhealthy; then raise GpuUnhealthy with its reasons."""
    if report.status == "unhealthy":
        raise GpuUnhealthy(f"refusing to boot: {report.reason}")
    return report
