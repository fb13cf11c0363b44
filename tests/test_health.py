"""serve.health: the GPU health check a replica runs before it boots.

On a host with an NVIDIA GPU (the device machine) the real check runs against NVML and CUDA.
Where NVML is absent (CI, these CPU machines) those tests skip, and the check must report
"no GPU". The decision rules (temperature, retired pages, row remapping, ECC, unsupported
queries) cannot be exercised on real sick hardware here, so they run against FakeNvml, a
stand-in for the few pynvml functions the check calls: the one place these tests use a fake,
because no real faulty GPU can be had.
"""

from __future__ import annotations

import pytest

from serve import health
from serve.boot import BootConfig, boot_replica


def _nvml_reason() -> str | None:
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"NVML is unavailable: {e}"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "no GPU visible to NVML"
    finally:
        pynvml.nvmlShutdown()
    return None


NO_NVML = _nvml_reason()


@pytest.mark.skipif(NO_NVML is None, reason="this host has a GPU: the no-GPU path cannot be observed")
def test_without_nvml_the_check_reports_no_gpu():
    report = health.check_gpus()
    assert report.status == "no_gpu"
    assert report.reason.startswith("no GPU") and report.gpus == []
    assert health.require_healthy(report) is report  # a CPU host boots


@pytest.mark.gpu
@pytest.mark.skipif(NO_NVML is not None, reason=f"needs an NVIDIA GPU: {NO_NVML}")
def test_a_healthy_gpu_passes_with_its_active_check():
    report = health.check_gpus()
    assert report.status == "healthy", report.reason
    assert report.driver and report.gpus
    for g in report.gpus:
        assert g.name and g.uuid.startswith("GPU-") and g.temperature_c is not None
        try:
            import torch
        except ImportError:
            continue
        if torch.cuda.is_available():
            assert g.active_check == "passed"


# -- decision rules, on a stand-in NVML (see the module docstring) --------------------------------


class FakeNvml:
    """The pynvml calls serve.health makes, answering from per-device dicts."""

    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FEATURE_ENABLED = 1

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, *devices: dict, init_error: str | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.shut = False

    def _get(self, h: int, key: str, default):
        v = self.devices[h].get(key, default)
        if v == "unsupported":
            raise self.NVMLError_NotSupported("Not Supported")
        if isinstance(v, Exception):
            raise v
        return v

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return "580.00"

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self._get(h, "name", "Fake H100")

    def nvmlDeviceGetUUID(self, h):
        return self._get(h, "uuid", f"GPU-{h}")

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._get(h, "pending_pages", 0)

    def nvmlDeviceGetRemappedRows(self, h):
        return self._get(h, "remapped", (0, 0, 0, 0))

    def nvmlDeviceGetEccMode(self, h):
        return self._get(h, "ecc_mode", (1, 1))

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        assert (kind, counter) == (1, 0)  # uncorrected, volatile
        return self._get(h, "ecc_uncorrected", 0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._get(h, "temp", 40)

    def nvmlDeviceGetTemperatureThreshold(self, h, which):
        return self._get(h, "slowdown", 90)


def check(*devices, **kw):
    kw.setdefault("active", False)
    return health.check_gpus(nvml=FakeNvml(*devices), **kw)


def test_a_sound_gpu_is_healthy():
    r = check({})
    assert r.status == "healthy" and r.reason == "" and r.driver == "580.00"
    assert r.gpus[0].name == "Fake H100" and r.gpus[0].temperature_c == 40


@pytest.mark.parametrize("device,expect", [
    ({"temp": 88}, "temperature 88 C is at or above 85 C"),
    ({"temp": 80, "slowdown": 79}, "at or above 79 C"),
    ({"pending_pages": 1}, "pending retirement"),
    ({"remapped": (0, 2, 1, 0)}, "row remapping is pending"),
    ({"remapped": (0, 0, 0, 1)}, "row remapping failed"),
    ({"ecc_uncorrected": 3}, "3 uncorrected ECC errors"),
])
def test_each_fault_makes_the_gpu_unhealthy_with_a_reason(device, expect):
    r = check({}, device)
    assert r.status == "unhealthy"
    assert expect in r.reason and r.reason.startswith("GPU 1 (Fake H100)")
    assert r.gpus[0].healthy and not r.gpus[1].healthy
    with pytest.raises(health.GpuUnhealthy, match="refusing to boot: GPU 1"):
        health.require_healthy(r)


def test_queries_a_gpu_does_not_support_are_noted_not_failed():
    r = check({"pending_pages": "unsupported", "remapped": "unsupported", "ecc_mode": "unsupported"})
    assert r.status == "healthy"
    assert set(r.gpus[0].notes) == {"retired pages: not supported", "row remapping: not supported",
                                    "ECC mode: not supported"}


def test_ecc_counters_are_not_read_when_ecc_is_off():
    r = check({"ecc_mode": (0, 0), "ecc_uncorrected": FakeNvml.NVMLError("must not be called")})
    assert r.status == "healthy" and "ECC is disabled" in r.gpus[0].notes


def test_an_nvml_error_on_a_query_is_a_problem():
    r = check({"temp": FakeNvml.NVMLError("GPU is lost")})
    assert r.status == "unhealthy" and "temperature: NVML error GPU is lost" in r.reason


def test_nvml_that_cannot_start_or_sees_no_device_means_no_gpu():
    r = health.check_gpus(nvml=FakeNvml(init_error="Driver Not Loaded"))
    assert r.status == "no_gpu" and "Driver Not Loaded" in r.reason
    nv = FakeNvml()
    r = health.check_gpus(nvml=nv)
    assert r.status == "no_gpu" and "no device is visible" in r.reason and nv.shut


def test_the_active_check_is_skipped_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the active check runs for real (see the GPU test)")
    r = check({}, active=True)
    assert r.status == "healthy" and r.gpus[0].active_check == "skipped: torch has no CUDA here"


def test_an_unhealthy_gpu_refuses_the_boot_before_anything_is_mounted(tmp_path):
    cfg = BootConfig(image="does-not-exist", store=str(tmp_path / "store"), engine="echo",
                     workdir=str(tmp_path / "work"))
    with pytest.raises(health.GpuUnhealthy, match="temperature 99 C"):
        boot_replica(cfg, health_check=lambda: check({"temp": 99}))
    assert not (tmp_path / "work" / "models").exists()
    # with a healthy GPU the same config gets past the health phase and fails at the image
    import casfs

    with pytest.raises(casfs.ImageNotFound):
        boot_replica(cfg, health_check=lambda: check({}))
