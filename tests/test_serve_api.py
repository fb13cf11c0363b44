"""serve's OpenAI-compatible API, end to end over real sockets with the official openai client.

The engine behind the API is serve.echo.EchoEngine, a small deterministic engine that stands
in for vLLM (vLLM lives in .venv-vllm; tests/test_serve_vllm.py runs the same API over it).
Everything else is the real thing: serve.http's asyncio server on 127.0.0.1, serve.app's
validation, error objects, SSE streaming, disconnect handling and metrics.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time
import urllib.request

import openai
import pytest

from serve.app import ServeApp, error_response
from serve.echo import EchoEngine
from serve.http import HttpServer
from casfs import Counter, Histogram
from casfs import MetricRegistry as Registry
from serve.metrics import ServeMetrics

MODEL = "tiny-echo"


class Served:
    """An app + HTTP server on its own event loop thread."""

    def __init__(self, engine: EchoEngine | None, **server_kw) -> None:
        self.engine = engine
        self.app = ServeApp(engine, served_names=[MODEL], boot_report=lambda: {"mode": "test"})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = HttpServer(self.app.handle, on_error=lambda s, m: error_response(s, m), **server_kw)
        self.host, self.port = self.call(self.server.start("127.0.0.1", 0))
        self.base = f"http://{self.host}:{self.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=30)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, r.getheader("content-type"), data
        finally:
            conn.close()

    def close(self) -> None:
        self.client.close()
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served():
    s = Served(EchoEngine(MODEL, max_model_len=64))
    yield s
    s.close()


@pytest.fixture
def slow_served():
    """Each token takes 50 ms, so a client can leave mid-generation."""
    s = Served(EchoEngine(MODEL, max_model_len=4096, token_delay=0.05))
    yield s
    s.close()


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# -- happy paths --------------------------------------------------------------------------------


def test_models_lists_and_retrieves_the_served_model(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        served.client.models.retrieve("other")
    assert e.value.body["code"] == "model_not_found"


def test_a_completion_returns_the_engines_text_and_token_usage(served):
    r = served.client.completions.create(model=MODEL, prompt="hello", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == "ollehol"  # the echo engine reads the prompt backwards, cycling
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 7, 13)


def test_a_prompt_may_be_a_one_string_list_or_token_ids(served):
    a = served.client.completions.create(model=MODEL, prompt=["abc"], max_tokens=4)
    ids = EchoEngine().encode("abc")
    b = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
    assert a.choices[0].text == b.choices[0].text == "cbac"


def test_a_chat_completion_returns_an_assistant_message(served):
    r = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        max_tokens=4)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    prompt = "<system>S\n<user>hi\n<assistant>"
    assert msg.content == prompt[::-1][:4]
    assert r.usage.prompt_tokens == len(prompt)


def test_chat_without_max_tokens_fills_the_rest_of_the_context(served):
    r = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert r.usage.total_tokens == 64 and r.choices[0].finish_reason == "length"


def test_text_parts_in_chat_content_are_joined(served):
    r = served.client.chat.completions.create(
        model=MODEL, max_tokens=3,
        messages=[{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]}])
    assert r.usage.prompt_tokens == len("<user>abc\n<assistant>")


def test_streamed_completion_chunks_add_up_to_the_unstreamed_completion(served):
    full = served.client.completions.create(model=MODEL, prompt="streaming", max_tokens=12).choices[0].text
    chunks = list(served.client.completions.create(model=MODEL, prompt="streaming", max_tokens=12, stream=True,
                                                   stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full
    assert len(text_chunks) == 12  # one event per token
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_a_streamed_chat_starts_with_the_role_and_ends_with_a_finish_reason(served):
    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hey"}], max_tokens=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "<user>hey\n<assistant>"[::-1][:5]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_sequence_ends_the_completion_before_it(served):
    r = served.client.completions.create(model=MODEL, prompt="abcdef", max_tokens=20, stop=["cb"])
    assert r.choices[0].text == "fed" and r.choices[0].finish_reason == "stop"
    streamed = list(served.client.completions.create(model=MODEL, prompt="abcdef", max_tokens=20,
                                                     stop="cb", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "fed"
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_come_back_in_the_openai_shapes(served):
    r = served.client.completions.create(model=MODEL, prompt="xy", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["y", "x", "y"] and len(lp.token_logprobs) == 3
    assert lp.text_offset == [0, 1, 2]
    assert all(len(t) == 2 for t in lp.top_logprobs)
    c = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                              max_tokens=2, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == list(">t") and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].bytes == list(b">")


def test_concurrent_streams_each_get_their_own_output(slow_served):
    results: dict[str, str] = {}

    def run(prompt: str) -> None:
        chunks = slow_served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True)
        results[prompt] = "".join(c.choices[0].text for c in chunks)

    prompts = ["abc", "xyz", "123", "pq"]
    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {p: (p[::-1] * 6)[:6] for p in prompts}


# -- bad input ------------------------------------------------------------------------------------


def _error(data: bytes) -> dict:
    body = json.loads(data)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"a string"', b"\xff\xfe"])
def test_a_malformed_json_body_gets_an_error_object_and_the_server_keeps_serving(served, body):
    status, ctype, data = served.raw("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and ctype == "application/json"
    err = _error(data)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    assert served.client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text == "ko"


def test_an_unknown_model_is_a_404_model_not_found(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.completions.create(model="gpt-9", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_a_prompt_longer_than_the_context_is_refused_with_context_length_exceeded(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=MODEL, prompt="x" * 200)
    assert e.value.body["code"] == "context_length_exceeded" and "64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with the completion
        served.client.completions.create(model=MODEL, prompt="x" * 40, max_tokens=40)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 100}])
    assert e.value.body["param"] == "messages"


@pytest.mark.parametrize("max_tokens", [-1, 0, -1000])
def test_negative_or_zero_max_tokens_is_refused(served, max_tokens):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=max_tokens)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=max_tokens)


@pytest.mark.parametrize("field,value", [
    ("temperature", 5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 2), ("best_of", 3),
    ("echo", True), ("max_tokens", "ten"), ("max_tokens", 2.5), ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", 7), ("logprobs", 99), ("seed", "s"), ("presence_penalty", 9), ("stream", "yes"),
    ("prompt", ["one", "two"]), ("prompt", []), ("prompt", {"a": 1}), ("prompt", [1, -2]),
])
def test_invalid_completion_fields_are_refused_with_the_field_named(served, field, value):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, field: value}
    status, _, data = served.raw("POST", "/v1/completions", json.dumps(body).encode())
    assert status == 400
    assert _error(data)["param"] == field


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": 5}], [{"role": "user"}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}], ["text"]])
def test_invalid_chat_messages_are_refused(served, messages):
    status, _, data = served.raw("POST", "/v1/chat/completions",
                                 json.dumps({"model": MODEL, "messages": messages}).encode())
    assert status == 400 and _error(data)["param"] == "messages"


def test_a_missing_model_field_is_refused(served):
    status, _, data = served.raw("POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 400 and _error(data)["param"] == "model"


def test_unknown_routes_and_wrong_methods_get_error_objects(served):
    status, _, data = served.raw("GET", "/v2/nothing")
    assert status == 404 and _error(data)["code"] == "not_found"
    status, _, data = served.raw("GET", "/v1/completions")
    assert status == 405 and "POST" in _error(data)["message"]
    status, _, data = served.raw("DELETE", "/v1/models/" + MODEL)
    assert status == 405


def test_http_protocol_errors_are_answered_and_do_not_stop_the_server(served):
    def send(raw: bytes) -> bytes:
        with socket.create_connection((served.host, served.port), timeout=10) as s:
            s.sendall(raw)
            out = b""
            while True:
                got = s.recv(65536)
                if not got:
                    return out
                out += got

    assert send(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert send(b"GET / SPDY/9\r\n\r\n").startswith(b"HTTP/1.1 505")
    assert send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert send(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(b"HTTP/1.1 411")
    assert send(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    reply = send(b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and MODEL.encode() in reply


def test_an_engine_failure_is_a_500_error_object_or_a_final_error_event(served):
    served.engine.healthy = False
    with pytest.raises(openai.InternalServerError) as e:
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.body["code"] == "engine_error"
    with pytest.raises(openai.APIError, match="unhealthy"):
        list(served.client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True))
    served.engine.healthy = True
    assert served.client.completions.create(model=MODEL, prompt="ab", max_tokens=1).choices[0].text == "b"


# -- client disconnects -------------------------------------------------------------------------------


def _post_and_read_events(served, body: dict, events: int) -> socket.socket:
    s = socket.create_connection((served.host, served.port), timeout=10)
    payload = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%b" % (len(payload), payload))
    buf = b""
    while buf.count(b"data: ") < events:
        got = s.recv(65536)
        assert got, "server closed the stream early"
        buf += got
    return s


def test_a_client_that_disconnects_mid_stream_aborts_its_generation(slow_served):
    s = _post_and_read_events(slow_served, {"model": MODEL, "prompt": "abc", "max_tokens": 2000,
                                            "stream": True}, events=3)
    s.close()
    engine = slow_served.engine
    assert wait_for(lambda: len(engine.aborted) == 1)
    assert engine.finished == []
    # the server keeps serving, and counted the disconnect
    r = slow_served.client.completions.create(model=MODEL, prompt="ok", max_tokens=2)
    assert r.choices[0].text == "ko"
    assert wait_for(lambda: slow_served.app.metrics.disconnects.get(endpoint="/v1/completions") == 1)
    assert slow_served.app.metrics.running.get() == 0


def test_a_client_that_disconnects_before_a_full_answer_aborts_it(slow_served):
    s = socket.create_connection((slow_served.host, slow_served.port), timeout=10)
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "max_tokens": 2000}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
    engine = slow_served.engine
    assert wait_for(lambda: len(engine.started) == 1)
    s.close()
    assert wait_for(lambda: len(engine.aborted) == 1)
    assert wait_for(lambda: slow_served.app.metrics.disconnects.get(endpoint="/v1/chat/completions") == 1)
    assert slow_served.client.models.list().data[0].id == MODEL


def test_keep_alive_connections_serve_several_requests(served):
    conn = http.client.HTTPConnection(served.host, served.port, timeout=10)
    try:
        for prompt in ("ab", "cd", "ef"):
            conn.request("POST", "/v1/completions",
                         body=json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] == prompt[::-1]
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": MODEL, "prompt": "gh", "max_tokens": 3, "stream": True}))
        r = conn.getresponse()
        assert r.getheader("transfer-encoding") == "chunked"
        assert r.read().endswith(b"data: [DONE]\n\n")
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# -- health, metrics, boot --------------------------------------------------------------------------


def test_health_is_503_until_an_engine_is_attached_and_ready():
    s = Served(None)
    try:
        status, _, data = s.raw("GET", "/health")
        assert status == 503 and _error(data)["code"] == "not_ready"
        status, _, data = s.raw("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode())
        assert status == 503
        engine = EchoEngine(MODEL)
        s.app.set_engine(engine)
        assert s.raw("GET", "/health")[0] == 200
        engine.healthy = False
        status, _, data = s.raw("GET", "/health")
        assert status == 503 and _error(data)["code"] == "engine_unhealthy"
    finally:
        s.close()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_latency_and_time_to_first_token(served):
    served.client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
    list(served.client.completions.create(model=MODEL, prompt="abc", max_tokens=3, stream=True))
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    status, ctype, data = served.raw("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    m = _samples(data.decode())
    assert m['casfs_serve_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert m['casfs_serve_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert m["casfs_serve_generation_tokens_total"] == 8
    assert m["casfs_serve_prompt_tokens_total"] == 8  # bos + 3 chars, twice
    assert m['casfs_serve_time_to_first_token_seconds_count{endpoint="/v1/completions"}'] == 2
    assert m['casfs_serve_request_seconds_count{endpoint="/v1/completions"}'] == 3
    assert m["casfs_serve_requests_running"] == 0


def test_boot_phases_are_exported_in_metrics_and_the_boot_report_is_served(served):
    served.app.metrics.record_boot({"mount": 0.25, "restore": 1.5, "first_token": 0.01}, 1.76, "restore", "snap1")
    m = _samples(served.raw("GET", "/metrics")[2].decode())
    assert m['casfs_serve_boot_phase_seconds{phase="restore"}'] == 1.5
    assert m["casfs_serve_boot_seconds"] == 1.76
    assert m['casfs_serve_boot_info{mode="restore",snapshot="snap1"}'] == 1
    status, _, data = served.raw("GET", "/boot")
    assert status == 200 and json.loads(data) == {"mode": "test"}


def test_histogram_buckets_are_cumulative_and_labels_are_escaped():
    r = Registry()
    h = r.add(Histogram("lat", "latency", ("path",), buckets=(0.1, 1.0)))
    c = r.add(Counter("hits", "hits", ("path",)))
    for v in (0.05, 0.5, 5.0):
        h.observe(v, path='a"b')
    c.inc(path="x\ny")
    text = r.render()
    assert 'lat_bucket{path="a\\"b",le="0.1"} 1' in text
    assert 'lat_bucket{path="a\\"b",le="1"} 2' in text
    assert 'lat_bucket{path="a\\"b",le="+Inf"} 3' in text
    assert 'lat_count{path="a\\"b"} 3' in text and 'hits{path="x\\ny"} 1' in text
    with pytest.raises(ValueError):
        c.inc(-1, path="x")
    with pytest.raises(ValueError):
        c.inc(1, wrong="label")
    assert ServeMetrics().render().endswith("\n")


def test_importing_serve_needs_neither_vllm_nor_torch():
    import subprocess
    import sys

    code = ("import sys, serve\n"
            "for name in serve.__all__: getattr(serve, name)\n"
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the boot pipeline with the echo engine (no vLLM) ------------------------------------------------


@pytest.fixture
def echo_image(tmp_path):
    import casfs

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "echo"}')
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(model), tag="echo-model", progress=False)
    store.close()
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_echo_replica_boots_through_the_pipeline_and_serves(echo_image):
    from serve.boot import BootConfig, boot_replica

    listen = f"127.0.0.1:{_free_port()}"
    cfg = BootConfig(image="echo-model", listen=listen, store=str(echo_image / "store"), engine="echo",
                     workdir=str(echo_image / "work"), report_path=str(echo_image / "report.json"))
    replica = boot_replica(cfg)
    try:
        r = replica.report
        assert r.mode == "cold" and list(r.phases) == ["gpu_health", "mount", "init", "warmup", "first_token"]
        assert r.first_token_text == "x"  # the probe prompt read backwards
        assert r.materialize in ("mount", "export") and os.path.isfile(os.path.join(r.model_dir, "config.json"))
        assert json.load(open(echo_image / "report.json"))["phases"] == r.phases
        client = openai.OpenAI(base_url=f"http://{listen}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="echo-model", prompt="abc", max_tokens=3).choices[0].text == "cba"
        with urllib.request.urlopen(f"http://{listen}/metrics") as resp:
            m = _samples(resp.read().decode())
        assert m['casfs_serve_boot_phase_seconds{phase="mount"}'] == pytest.approx(r.phases["mount"])
        # the supervisor's control channel needs the token
        conn = http.client.HTTPConnection(*listen.rsplit(":", 1), timeout=10)
        conn.request("POST", "/_casfs/report", body=b"{}", headers={"X-Casfs-Control": "wrong"})
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        replica.stop()
    assert not replica.alive()
    if r.materialize == "mount":
        from casfs.fuse.mount import is_mounted

        assert not is_mounted(r.model_dir)


def test_a_missing_snapshot_falls_back_to_a_cold_boot(echo_image):
    from serve.boot import BootConfig, boot_replica
    from serve.snapshots import SnapshotUnavailable, open_backend

    try:
        open_backend()
    except SnapshotUnavailable as e:
        pytest.skip(f"snapshots cannot run here: {e}")
    cfg = BootConfig(image="echo-model", listen=f"127.0.0.1:{_free_port()}", store=str(echo_image / "store"),
                     engine="echo", workdir=str(echo_image / "work"), snapshot="never-made")
    replica = boot_replica(cfg)
    try:
        assert replica.report.mode == "cold" and "restore" not in replica.report.phases
        assert "no snapshot never-made" in replica.report.details["snapshot_refused"]
    finally:
        replica.stop()
