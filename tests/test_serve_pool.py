"""serve.pool on the CPU: parking and unparking real transformers replicas, with a fake GPU layer.

The replicas are real (.venv-vllm's python, the tiny Qwen3 streamed from a casfs store); parking
really frees their weights and KV cache (madvise on the CPU) and unparking streams the weights
back from casfs. Only the driver's suspend/resume is fake (tests/fake_gpu.py). On the H200 the
same code runs against the driver in benchmarks/gpu/bench_gpu_replica.py --park.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

import casfs
from serve.errors import BootError
from serve.pool import NoCapacity, ParkedReplica, Reservations, WarmPool, park, unpark
from tests.fake_gpu import FakeGpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")
MODEL = "qwen3-tiny"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if os.environ.get("SKIP_VLLM") == "1":
        pytest.skip("SKIP_VLLM=1: the vLLM venv (which holds transformers here) is deliberately absent")
    if not os.path.exists(PY):
        pytest.fail(f"{PY} is missing: run scripts/setup_vllm.sh (or set SKIP_VLLM=1)")
    d = tmp_path_factory.mktemp("pool")
    subprocess.run([PY, os.path.join(ROOT, "scripts", "make_model.py"), str(d / "model"), "--preset", "tiny",
                    "--store", str(d / "store")], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    return d


def _listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _booter(d):
    from serve.boot import BootConfig, boot_replica

    def boot(i: int):
        return boot_replica(BootConfig(image=MODEL, listen=_listen(), store=str(d / "store"), engine="transformers",
                                       python=PY, workdir=str(d / "work"), max_model_len=128,
                                       env={"PYTHONPATH": ROOT}))
    return boot


def _complete(rep, prompt: str = "Hello, my name is") -> str:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{rep.listen}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


def _health(rep) -> int:
    try:
        with urllib.request.urlopen(f"http://{rep.listen}/health", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_parked_replica_frees_its_memory_queues_requests_and_unparks_with_the_same_output(tiny):
    gpu = FakeGpu()
    rep = _booter(tiny)(0)
    try:
        want = _complete(rep)
        from serve.pool import _weights_of

        p = ParkedReplica(rep, weights=_weights_of(rep))
        pr = park(p, gpu)
        assert pr["released"]["weights_bytes"] > 0 and pr["released"]["kv_cache_bytes"] > 0
        assert [c[:1] for c in gpu.calls] == [("suspend",)] and gpu.calls[0][1] == rep.pid
        assert p.parked and _health(rep) == 503
        with pytest.raises(BootError, match="already parked"):
            park(p, gpu)
        got: list[str] = []
        waiting = threading.Thread(target=lambda: got.append(_complete(rep)))  # arrives while parked
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive() and not got  # queued, not refused
        ur = unpark(p, gpu, Reservations(gpu), model=MODEL)
        waiting.join(60)
        assert got == [want] and _complete(rep) == want
        assert [c[0] for c in gpu.calls] == ["suspend", "resume"] and not p.parked
        assert ur["weights_bytes_copied"] == pr["released"]["weights_bytes"] or ur["weights_bytes_copied"] > 0
        assert set(ur["phases"]) == {"reserve", "resume", "weights_and_kv", "first_token"}
        assert _health(rep) == 200
    finally:
        rep.stop()


def test_an_unpark_without_enough_free_gpu_memory_is_refused_and_the_replica_stays_parked(tiny):
    gpu = FakeGpu()
    rep = _booter(tiny)(0)
    try:
        from serve.pool import _weights_of

        p = ParkedReplica(rep, weights=_weights_of(rep))
        park(p, gpu)
        gpu.free_bytes = p.need_bytes() - 1
        with pytest.raises(NoCapacity, match="unpark needs"):
            unpark(p, gpu, Reservations(gpu))
        assert p.parked and [c[0] for c in gpu.calls] == ["suspend"]  # resume was never called
        res = Reservations(gpu)
        gpu.free_bytes = p.need_bytes() + 10
        t = res.reserve(p.need_bytes())  # another unpark holds it: the next one does not fit
        with pytest.raises(NoCapacity, match="promised to other unparks"):
            unpark(p, gpu, res)
        res.release(t)
        unpark(p, gpu, res, probe=False)
        assert not p.parked and res.held == 0
    finally:
        rep.stop()


def test_a_pool_replaces_a_replica_whose_resume_failed_and_counts_it_in_its_metrics(tiny):
    gpu = FakeGpu(fail_resume=1)
    pool = WarmPool(_booter(tiny), 2, gpu)
    try:
        reports = pool.park_all()
        assert len(reports) == 2 and all(r["op"] == "park" for r in reports)
        first_pid = pool.replicas[0].replica.pid
        p, r = pool.acquire()
        assert p.replica.pid != first_pid and r["phases"]["first_token"] > 0
        assert pool.failed and pool.failed[0]["pid"] == first_pid and not os.path.exists(f"/proc/{first_pid}/status")
        assert len(pool.replicas) == 1
        pool.release(p)
        text = pool.render_metrics()
        assert 'casfs_pool_events_total{kind="failed_unparks"} 1' in text
        assert 'casfs_pool_events_total{kind="parks"} 3' in text and 'casfs_pool_replicas{state="parked"} 1' in text
    finally:
        pool.stop()


def test_the_front_door_unparks_on_demand_relays_streams_and_parks_again_when_idle(tiny):
    import asyncio
    import time

    import openai

    from serve.front import FrontDoor

    gpu = FakeGpu()
    pool = WarmPool(_booter(tiny), 1, gpu)
    loop = asyncio.new_event_loop()
    front = FrontDoor(pool, idle_s=1.0)
    try:
        want = _complete(pool.replicas[0].replica)
        pool.park_all()
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        host, port = asyncio.run_coroutine_threadsafe(front.start("127.0.0.1:0"), loop).result(30)
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=8, temperature=0)
        assert got.choices[0].text == want and [c[0] for c in gpu.calls] == ["suspend", "resume"]
        parts = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Hello, my name is", max_tokens=8, temperature=0, stream=True)]
        assert "".join(parts) == want and len(parts) > 1
        deadline = time.monotonic() + 20
        # parked as soon as the suspend returns; the pool counts the park just after (CI once
        # read /metrics in between)
        while not (pool.replicas[0].parked and pool.counters["parks"] == 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pool.replicas[0].parked and [c[0] for c in gpu.calls] == ["suspend", "resume", "suspend"]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            m = r.read().decode()
        assert 'casfs_pool_events_total{kind="unparks"} 1' in m and 'casfs_pool_events_total{kind="parks"} 2' in m
        with urllib.request.urlopen(f"http://{host}:{port}/pool", timeout=10) as r:
            assert json.load(r)["replicas"][0]["parked"] is True
    finally:
        asyncio.run_coroutine_threadsafe(front.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        pool.stop()


def test_an_unpark_copies_the_weights_from_the_shared_host_copy_and_reads_casfs_when_it_is_gone(tiny):
    from serve.pool import _weights_of, shared_weights

    gpu = FakeGpu()
    rep = _booter(tiny)(0)
    hw = shared_weights(_weights_of(rep), gpu)
    try:
        want = _complete(rep)
        p = ParkedReplica(rep, weights=_weights_of(rep), shared=hw.spec())
        park(p, gpu)
        ur = unpark(p, gpu, Reservations(gpu), model=MODEL)
        sw = ur["shared_weights"]
        assert "error" not in sw and sw["pinned_bytes"] >= ur["weights_bytes_copied"] > 0, sw  # chunks (header too), no casfs read
        assert _complete(rep) == want
        pr = park(p, gpu)
        assert pr["host_memory_while_parked"]["pss_shmem"] >= hw.nbytes * 0.9  # it maps the one copy
        p.shared = {**hw.spec(), "path": str(tiny / "no-such-copy")}
        ur = unpark(p, gpu, Reservations(gpu), model=MODEL)
        assert "cannot open" in ur["shared_weights"]["error"] and ur["shared_weights"]["pinned_bytes"] == 0
        assert ur["weights_bytes_copied"] > 0 and _complete(rep) == want
    finally:
        rep.stop()
        hw.close()
