"""`casfs serve` with the real vLLM engine (CPU build, .venv-vllm) on a tiny random Llama.

The model is built by scripts/make_tiny_model.py (no hub access), stored as a casfs image, and
served by a `casfs serve` subprocess running .venv-vllm's python, which writes the model's config
and tokenizer to disk and boots vLLM eagerly with the fast-boot flags, its weights streamed from
the store through the `casfs` load format (serve/vllm_loader.py); the replica boots once per
module. One more boot mounts the image lazily (FUSE) for vLLM's own loader.
Requests go through the official openai client and raw sockets.

These tests need .venv-vllm (scripts/setup_vllm.sh, run by `make test`'s setup). Without it
they fail, unless SKIP_VLLM=1 says vLLM is deliberately not installed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

import casfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")
MODEL = "tiny"
BOOT_TIMEOUT = 420

pytestmark = pytest.mark.slow


def _require_vllm() -> None:
    if os.environ.get("SKIP_VLLM") == "1":
        pytest.skip("SKIP_VLLM=1: vLLM is deliberately not installed")
    if not os.path.exists(VLLM_PY):
        pytest.fail(f"{VLLM_PY} is missing: run scripts/setup_vllm.sh (or set SKIP_VLLM=1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProc:
    """A `casfs serve` subprocess; ``report`` is the boot report it printed once serving."""

    def __init__(self, store: str, workdir: str, *args: str) -> None:
        self.port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.workdir = workdir
        self.base = f"http://{self.listen}"
        argv = [VLLM_PY, "-m", "casfs.cli.main", "--store", store, "serve", MODEL, "--listen", self.listen,
                "--workdir", workdir, *args]
        # snapshots are exported under the test's own dir (removed with it), not $CASFS_HOME
        env = dict(os.environ, CASFS_SNAPSHOT_CACHE=os.path.join(workdir, "snapshot-cache"))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        self.report = self._read_report()

    def _read_report(self) -> dict:
        deadline = time.monotonic() + BOOT_TIMEOUT
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if r:
                got = os.read(self.proc.stdout.fileno(), 65536)
                if not got:
                    break
                buf += got
                if b"\n" in buf:
                    return json.loads(buf.split(b"\n", 1)[0])
            elif self.proc.poll() is not None:
                break
        self.stop()
        err = self.proc.stderr.read().decode(errors="replace")[-3000:]
        raise AssertionError(f"casfs serve did not boot (status {self.proc.returncode}):\n{err}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A store holding the tiny model as image "tiny" (built with .venv-vllm's transformers)."""
    _require_vllm()
    d = tmp_path_factory.mktemp("serve-vllm")
    model_dir = d / "model"
    subprocess.run([VLLM_PY, os.path.join(ROOT, "scripts", "make_tiny_model.py"), str(model_dir)],
                   check=True, capture_output=True, timeout=300)
    store = casfs.open_store(str(d / "store"))
    casfs.build(store, str(model_dir), tag=MODEL, progress=False)
    store.close()
    yield d
    # the snapshots (~2 GB each in the store and the cache) are not worth keeping for inspection
    shutil.rmtree(d / "store", ignore_errors=True)
    shutil.rmtree(d / "work" / "snapshot-cache", ignore_errors=True)


@pytest.fixture(scope="module")
def replica(tiny_store):
    s = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--eager", "--fast-boot")
    yield s
    assert s.stop() == 0


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# -- boot ------------------------------------------------------------------------------------------


def test_the_replica_boots_through_every_phase_streaming_its_weights_from_casfs(replica):
    r = replica.report
    assert r["mode"] == "cold" and r["engine"] == "vllm" and r["eager"] is True
    assert list(r["phases"]) == ["gpu_health", "mount", "init", "weights", "warmup", "first_token"]
    assert all(v >= 0 for v in r["phases"].values())
    # config and tokenizer on disk, no weights: vLLM loaded them through the casfs load format
    assert r["materialize"] == "metadata" and r["details"]["mount"]["reused"] is False
    assert not os.path.exists(os.path.join(r["model_dir"], "model.safetensors"))
    log = open(r["details"]["worker"]["log"]).read()
    assert "load_format=casfs" in log and "casfs: loaded" in log
    assert r["model_dir"].startswith(replica.workdir)
    assert r["total"] >= sum(r["phases"].values()) * 0.99
    assert r["first_token_text"]
    assert r["gpu"]["status"] in ("no_gpu", "healthy")
    # vLLM's own timings were read from its log
    assert r["details"]["worker"]["vllm"]["weights"] == r["phases"]["weights"]
    status, body = replica.get("/boot")
    assert status == 200 and json.loads(body)["phases"] == r["phases"]


def test_boot_phases_are_exported_as_prometheus_metrics(replica):
    status, body = replica.get("/metrics")
    text = body.decode()
    assert status == 200
    for phase, seconds in replica.report["phases"].items():
        assert _metric(text, f'casfs_serve_boot_phase_seconds{{phase="{phase}"}}') == pytest.approx(seconds)
    assert _metric(text, "casfs_serve_boot_seconds") == pytest.approx(replica.report["total"])
    assert _metric(text, 'casfs_serve_boot_info{mode="cold",snapshot=""}') == 1


# -- the API over vLLM ----------------------------------------------------------------------------------


def test_models_and_health_answer(replica):
    c = replica.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).max_model_len == 512
    assert replica.get("/health")[0] == 200


def test_a_greedy_completion_is_deterministic_and_matches_its_stream(replica):
    c = replica.client()
    a = c.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=12, temperature=0, logprobs=2)
    b = c.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=12, temperature=0, logprobs=2)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs
    assert a.usage.completion_tokens == 12 and a.choices[0].finish_reason == "length"
    assert len(a.choices[0].logprobs.tokens) == 12
    assert "".join(a.choices[0].logprobs.tokens) == a.choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == a.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completions_and_chat_streams_work(replica):
    c = replica.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a chunk?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_bad_inputs_get_openai_error_objects_and_the_server_keeps_serving(replica):
    c = replica.client()
    req = urllib.request.Request(replica.base + "/v1/completions", data=b"{broken",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="llama-70b", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    assert c.completions.create(model=MODEL, prompt="still here", max_tokens=2).usage.completion_tokens == 2


def test_a_client_disconnect_mid_stream_aborts_the_request_in_vllm(replica):
    start = _metric(replica.get("/metrics")[1].decode(), "casfs_serve_generation_tokens_total")
    s = socket.create_connection(("127.0.0.1", replica.port), timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                       "stream": True, "ignore_me": 1}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
              % (len(body), body))
    buf = b""
    while buf.count(b"data: {") < 3:
        got = s.recv(65536)
        assert got
        buf += got
    s.close()
    deadline = time.monotonic() + 30
    while True:
        text = replica.get("/metrics")[1].decode()
        if _metric(text, "casfs_serve_requests_running") == 0:
            break
        assert time.monotonic() < deadline, "the abandoned generation is still running"
        time.sleep(0.1)
    assert _metric(text, 'casfs_serve_client_disconnects_total{endpoint="/v1/completions"}') >= 1
    # it stopped early: far fewer than the 400 tokens asked for were generated
    before = _metric(text, "casfs_serve_generation_tokens_total")
    assert 3 <= before - start < 200
    c = replica.client()
    assert c.completions.create(model=MODEL, prompt="after", max_tokens=3).usage.completion_tokens == 3
    after = _metric(replica.get("/metrics")[1].decode(), "casfs_serve_generation_tokens_total")
    assert after == before + 3


# -- CPU snapshots (snapshot.cpu, CRIU) ------------------------------------------------------------

SNAP = "tiny-snap"
PROMPT = "The cache tier is"


def _greedy(proc: ServeProc) -> tuple[str, list[float]]:
    r = proc.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=2)
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs


def test_a_lazily_mounted_image_with_vllms_own_loader_answers_the_same(tiny_store, replica):
    s = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--eager", "--fast-boot",
                  "--materialize", "mount")
    try:
        r = s.report
        assert r["materialize"] == "mount" and os.path.exists(os.path.join(r["model_dir"], "model.safetensors"))
        assert _greedy(s) == _greedy(replica)
    finally:
        assert s.stop() == 0
    mounts = open("/proc/self/mounts").read()
    assert str(tiny_store / "work") not in mounts, "casfs serve left its model mount behind"


def _require_snapshots() -> None:
    out = subprocess.run([VLLM_PY, "-c", "from serve.snapshots import open_backend; open_backend()"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    if out.returncode != 0:
        pytest.fail("CPU snapshots are unavailable here (scripts/build_criu.sh builds CRIU 4.2.1): "
                    + out.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def snapshotted(tiny_store, replica):
    """A `--snapshot --create` boot: cold init, snapshot, then serving from the snapshot."""
    _require_snapshots()
    s = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--eager", "--fast-boot",
                  "--snapshot", SNAP, "--create")
    yield s
    s.stop()


def test_creating_a_snapshot_boots_cold_then_serves_from_the_snapshot(snapshotted):
    r = snapshotted.report
    assert r["mode"] == "cold" and r["snapshot"] == SNAP
    assert list(r["phases"]) == ["gpu_health", "mount", "init", "weights", "warmup", "snapshot", "restore",
                                 "first_token"]
    created = r["snapshot_create"]
    assert created["tag"] == SNAP and created["pages_bytes"] > 100 << 20
    # (no link_remap count asserted: with vLLM's own loader the EngineCore maps an unlinked glibc
    # semaphore, tqdm's multiprocessing lock, which CRIU link-remaps; the casfs load format shows
    # no progress bar, so this default boot has none)
    worker = r["details"]["worker"]
    assert worker["restores"] == 1 and "reseed" in worker["after_restore"]


def test_a_snapshot_boot_returns_the_same_greedy_completion_as_the_cold_boot(tiny_store, replica, snapshotted):
    cold = _greedy(replica)
    assert _greedy(snapshotted) == cold
    snapshotted.stop()
    restored = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--snapshot", SNAP)
    try:
        r = restored.report
        assert r["mode"] == "restore"
        assert list(r["phases"]) == ["gpu_health", "mount", "restore", "first_token"]
        assert r["details"]["restore"]["timings"]["criu"] > 0
        assert _greedy(restored) == cold
        chat = [{"role": "user", "content": "hello"}]
        a = replica.client().chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=0)
        b = restored.client().chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=0)
        assert a.choices[0].message.content == b.choices[0].message.content
        status, body = restored.get("/metrics")
        assert _metric(body.decode(), f'casfs_serve_boot_info{{mode="restore",snapshot="{SNAP}"}}') == 1
    finally:
        assert restored.stop() == 0


def test_two_restores_of_one_snapshot_serve_at_once_with_their_own_randomness(tiny_store, snapshotted):
    snapshotted.stop()
    a = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--snapshot", SNAP)
    try:
        b = ServeProc(str(tiny_store / "store"), str(tiny_store / "work"), "--snapshot", SNAP)
        try:
            assert a.port != b.port
            assert a.report["details"]["worker"]["pid"] != b.report["details"]["worker"]["pid"]
            assert _greedy(a) == _greedy(b)

            def sample(p: ServeProc) -> str:
                return p.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                                     temperature=1.0).choices[0].text

            # each restore reseeded its engine: unseeded sampling differs between them
            assert sample(a) != sample(b)
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0


# -- the command line without vLLM ------------------------------------------------------------------------


def test_casfs_help_works_without_importing_vllm():
    out = subprocess.run([sys.executable, "-c",
                          "import sys, casfs.cli.main as m\n"
                          "m.build_parser().parse_args(['serve', 'img', '--snapshot', 't'])\n"
                          "assert 'vllm' not in sys.modules, 'vllm imported by the CLI'\n"
                          "print('ok')"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr
    h = subprocess.run([sys.executable, "-m", "casfs.cli.main", "serve", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert h.returncode == 0 and "--snapshot TAG" in h.stdout


def test_create_without_a_snapshot_tag_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", str(tmp_path / "s"), "serve",
                          "img", "--create"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "--create needs --snapshot TAG" in out.stderr
