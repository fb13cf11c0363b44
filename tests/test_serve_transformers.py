"""`casfs serve --engine transformers` on the CPU, with a tiny random Qwen3, through the official
openai client.

The model is built by scripts/make_model.py (no hub access) into a casfs store. The replica runs
.venv-vllm's python, the environment that holds transformers on CPU hosts (pinned by the
``transformers`` extra: see the README). Its weights are streamed from the store by the engine
(only config and tokenizer are written to disk), its KV cache is static, concurrent requests are
batched. Greedy completions are checked against transformers' own ``generate()``.

The GPU-snapshot path runs here too with a fake GPU layer (tests/fake_gpu.py): the worker really
releases its weights and KV cache (madvise on the CPU), is dumped by CRIU, restored, and streams
its weights back from casfs into the same addresses; the output must not change.

Needs .venv-vllm (scripts/setup_vllm.sh); without it these fail unless SKIP_VLLM=1.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

import casfs
from tests.fake_gpu import FakeGpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")
MODEL = "qwen3-tiny"
BOOT_TIMEOUT = 300

pytestmark = pytest.mark.slow

REFERENCE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d).eval()
out = []
for p in prompts:
    ids = tok.encode(p)
    g = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out.append(g[0][len(ids):].tolist())
print(json.dumps(out))
"""


def _require() -> None:
    if os.environ.get("SKIP_VLLM") == "1":
        pytest.skip("SKIP_VLLM=1: the vLLM venv (which holds transformers here) is deliberately absent")
    if not os.path.exists(PY):
        pytest.fail(f"{PY} is missing: run scripts/setup_vllm.sh (or set SKIP_VLLM=1)")


def _listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(store dir, model dir): the tiny Qwen3 as image qwen3-tiny."""
    _require()
    d = tmp_path_factory.mktemp("serve-hf")
    subprocess.run([PY, os.path.join(ROOT, "scripts", "make_model.py"), str(d / "model"), "--preset", "tiny",
                    "--store", str(d / "store"), "--keep"], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    yield d
    shutil.rmtree(d / "store", ignore_errors=True)


class Serve:
    """A `casfs serve --engine transformers` subprocess; ``report`` is its boot report."""

    def __init__(self, d, *args: str) -> None:
        self.listen = _listen()
        self.base = f"http://{self.listen}"
        argv = [PY, "-m", "casfs.cli.main", "--store", str(d / "store"), "serve", MODEL, "--engine",
                "transformers", "--listen", self.listen, "--workdir", str(d / "work"), "--max-model-len", "256",
                *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=ROOT))
        deadline, buf = time.monotonic() + BOOT_TIMEOUT, b""
        while time.monotonic() < deadline and b"\n" not in buf:
            r, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if r:
                got = os.read(self.proc.stdout.fileno(), 65536)
                if not got:
                    break
                buf += got
            elif self.proc.poll() is not None:
                break
        if b"\n" not in buf:
            self.stop()
            raise AssertionError(f"casfs serve did not boot:\n{self.proc.stderr.read().decode()[-3000:]}")
        self.report = json.loads(buf.split(b"\n", 1)[0])

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def boot(self) -> dict:
        with urllib.request.urlopen(self.base + "/boot", timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def replica(tiny):
    s = Serve(tiny)
    yield s
    s.stop()


PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog and", "a", "cold boots are slow"]


def _reference(tiny, prompts, n):
    out = subprocess.run([PY, "-c", REFERENCE, str(tiny / "model"), json.dumps(prompts), str(n)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_replica_streams_weights_from_casfs_and_writes_only_config_and_tokenizer(replica):
    r = replica.report
    assert r["engine"] == "transformers" and r["materialize"] == "metadata" and r["mode"] == "cold"
    assert not any(n.endswith(".safetensors") for n in os.listdir(r["model_dir"]))
    w = r["details"]["worker"]
    assert w["engine_timings"]["weights_load"] >= 0 and w["engine_config"]["device"] == "cpu"
    assert w["engine_config"]["max_model_len"] == 256 and w["engine_config"]["kv_cache_bytes"] > 0
    assert list(r["phases"])[-1] == "first_token" and "weights" in r["phases"]
    assert r["details"]["memory"]["worker_vmrss_bytes"] > 0


def test_greedy_completions_match_transformers_generate_alone_and_batched(tiny, replica):
    ref = _reference(tiny, PROMPTS, 12)
    client = replica.client()
    tok_url = replica.base + "/v1/completions"

    def ids(prompt: str) -> list[int]:
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                           "logprobs": 0}).encode()
        req = urllib.request.Request(tok_url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    alone = [ids(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
        together = list(ex.map(ids, PROMPTS))
    tok_texts = [[t for t in a["choices"][0]["logprobs"]["tokens"]] for a in alone]
    assert [a["choices"][0]["text"] for a in alone] == [t["choices"][0]["text"] for t in together]
    assert [len(t) for t in tok_texts] == [12] * len(PROMPTS)
    # the same ids as transformers' generate: decode the reference with the served tokenizer
    dec = subprocess.run([PY, "-c", "import json,sys\nfrom transformers import AutoTokenizer\n"
                          "t=AutoTokenizer.from_pretrained(sys.argv[1])\n"
                          "print(json.dumps([t.decode(x, skip_special_tokens=True) for x in json.loads(sys.argv[2])]))",
                          str(tiny / "model"), json.dumps(ref)], check=True, capture_output=True, text=True)
    assert [a["choices"][0]["text"] for a in alone] == json.loads(dec.stdout)
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text \
        == alone[0]["choices"][0]["text"]


def test_concurrent_requests_share_batches(replica):
    client = replica.client()
    before = replica.boot()["worker"]["engine_stats"]

    def one(i: int) -> str:
        return client.completions.create(model=MODEL, prompt=f"request {i} says", max_tokens=48,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        texts = list(ex.map(one, range(6)))
    after = replica.boot()["worker"]["engine_stats"]
    assert after["batches"] - before["batches"] < 6  # fewer batches than requests
    assert after["largest_batch"] >= 2
    assert texts == [one(i) for i in range(6)]  # batched or alone, the same greedy output


def test_a_stream_adds_up_to_the_unstreamed_completion_and_a_stop_string_ends_it(replica):
    client = replica.client()
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Hello", max_tokens=20,
                                                                   temperature=0, stream=True)]
    assert "".join(parts) == full
    stop = full[5:7]
    if stop.strip():
        cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_logprobs_come_in_openai_shapes(replica):
    client = replica.client()
    kw = dict(model=MODEL, prompt="The cache", max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model=MODEL, prompt="The cache", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_chat_completions_use_the_models_template(replica):
    r = replica.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 5


def test_a_prompt_beyond_the_context_is_refused_and_the_replica_keeps_serving(replica):
    client = replica.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=5)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_a_gpu_snapshot_round_trip_releases_and_reloads_the_weights_with_identical_output(tiny, replica,
                                                                                          monkeypatch):
    """The GPU-snapshot pipeline with the fake GPU layer: everything but the driver calls is real."""
    from serve.boot import BootConfig, boot_replica
    from serve.snapshots import SnapshotUnavailable, open_backend

    try:
        open_backend()
    except SnapshotUnavailable as e:
        pytest.fail(f"snapshots cannot run here: {e}")
    monkeypatch.setenv("CASFS_SNAPSHOT_CACHE", str(tiny / "snapcache"))
    want = replica.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12,
                                               temperature=0).choices[0].text
    gpu = FakeGpu()
    cfg = BootConfig(image=MODEL, listen=_listen(), store=str(tiny / "store"), engine="transformers",
                     python=PY, workdir=str(tiny / "work"), max_model_len=256, snapshot="tiny-gpu",
                     create_snapshot=True, gpu_snapshot=True, env={"PYTHONPATH": ROOT})
    rep = boot_replica(cfg, gpu=gpu)
    try:
        r = rep.report
        assert "snapshot_failed" not in r.details, r.details.get("snapshot_failed")
        assert [c[0] for c in gpu.calls] == ["suspend", "resume"]
        w = r.details["worker"]
        assert w["device_release"]["weights_bytes"] > 0 and w["device_release"]["kv_cache_bytes"] > 0
        assert w["after_restore"]["weights_bytes"] > 0 and w["after_restore"]["weights"] >= 0
        client = openai.OpenAI(base_url=f"http://{rep.listen}/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
        assert got.choices[0].text == want
    finally:
        rep.stop()
    with casfs.open_store(str(tiny / "store")) as store:
        assert store.open_image("tiny-gpu") is not None
