"""`casfs serve` checks before the slow boot (issue 17, first-use polish): the engine installed
in the worker's interpreter, the listen port free, the image holding a model; each failure is
one line naming the fix, within seconds, with nothing started.

Real processes: `casfs serve` runs as a subprocess of casfs's own venv (which has no vLLM, as a
new user's would) or of .venv-vllm; the busy port is a real listening socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

import casfs
from conftest import write_tree
from serve.preflight import EngineCheck, PreflightError, check_engine, check_model, register_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")


def _serve(python: str, store: str, image: str, *args: str, env_extra: dict | None = None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    t = time.monotonic()
    p = subprocess.run([python, "-m", "casfs.cli.main", "--store", store, "serve", image, *args],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    return p, time.monotonic() - t


@pytest.fixture
def images(tmp_path):
    """A store with "model" (config.json + safetensors) and "notes" (no model)."""
    write_tree(tmp_path / "model", {"config.json": b"{}", "model.safetensors": b"\0" * 64,
                                    "tokenizer.json": b"{}"})
    write_tree(tmp_path / "notes", {"README.md": b"hi", "docs/a.txt": b"a"})
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        casfs.build(s, str(tmp_path / "model"), tag="model", progress=False)
        casfs.build(s, str(tmp_path / "notes"), tag="notes", progress=False)
    return root


def test_serve_from_a_venv_without_vllm_says_which_install_serves_in_one_line(images, tmp_path):
    if _has_vllm(sys.executable):
        pytest.skip("this interpreter has vLLM")
    p, secs = _serve(sys.executable, images, "model", "--no-gpu-check", "--workdir", str(tmp_path / "w"))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "vllm engine is not installed" in lines[0] and ".venv-vllm/bin/casfs serve" in lines[0]
    assert not os.path.exists(tmp_path / "w" / "logs")  # nothing was started


def test_serve_on_a_busy_port_fails_at_once_naming_the_holder(images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p, secs = _serve(sys.executable, images, "model", "--engine", "echo", "--no-gpu-check",
                         "--listen", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "w"))
    assert p.returncode != 0
    line = p.stderr.strip()
    assert "\n" not in line and f"127.0.0.1:{port} is already in use (by pid {os.getpid()}" in line, line
    assert "choose another --listen" in line


def test_serve_of_an_image_without_a_model_fails_before_the_boot(images, tmp_path):
    if not os.path.exists(VLLM_PY):
        pytest.skip(".venv-vllm is not installed")
    p, secs = _serve(VLLM_PY, images, "notes", "--no-gpu-check", "--materialize", "export",
                     "--workdir", str(tmp_path / "w"))
    assert p.returncode != 0
    line = p.stderr.strip()
    assert "\n" not in line, line
    assert "does not hold a model: no config.json and no weights" in line and "README.md" in line
    assert not os.path.exists(tmp_path / "w" / "exports")  # checked before the mount phase


def test_the_model_check_is_per_engine(images):
    with casfs.open_store(images) as s:
        check_model(s.open_image("model"), "vllm")
        check_model(s.open_image("notes"), "echo")  # the echo engine needs no model
        with pytest.raises(PreflightError, match="does not hold a model"):
            check_model(s.open_image("notes"), "vllm")


def test_an_engine_registers_its_own_preflight_hook(monkeypatch):
    import serve.preflight as pf

    monkeypatch.setattr(pf, "ENGINE_CHECKS", dict(pf.ENGINE_CHECKS))
    register_engine("needs-nothing-real", EngineCheck(modules=("casfs_no_such_module_x",),
                                                      install="pip install it"))
    with pytest.raises(PreflightError, match="casfs_no_such_module_x not importable.*pip install it"):
        check_engine("needs-nothing-real")
    with pytest.raises(PreflightError, match="unknown engine"):
        check_engine("nope")


def _has_vllm(python: str) -> bool:
    return subprocess.run([python, "-c", "import importlib.util,sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                          capture_output=True).returncode == 0


def test_a_model_export_reused_by_a_later_boot_is_checked_and_exported_again_when_changed(images, tmp_path):
    """Where FUSE is unusable serve exports the model; a later boot reuses that export only if
    it still matches the image (the same check as snapshot exports: snapshot.verify)."""
    from serve.modeldir import materialize

    with casfs.open_store(images) as s:
        image = s.open_image("model")
        dest, how, detail = materialize(image, "export", str(tmp_path / "w"))
        assert how == "export" and detail["reused"] is False
        assert materialize(image, "export", str(tmp_path / "w"))[2]["reused"] is True
        weights = os.path.join(dest, "model.safetensors")
        with open(weights, "r+b") as f:
            f.write(b"\x01")  # a flipped byte in the weights
        dest2, _, detail = materialize(image, "export", str(tmp_path / "w"))
        assert dest2 == dest and detail["reused"] is False
        with open(weights, "rb") as f:
            assert f.read() == b"\0" * 64


@pytest.mark.parametrize("flag", ["--max-model-len=-1", "--boot-timeout=-5", "--boot-timeout=nan", "--idle-park=0"])
def test_serve_refuses_a_nonpositive_length_or_timeout_before_booting(images, tmp_path, flag):
    """``--max-model-len -1`` booted a replica whose warmup failed with a traceback in its log;
    ``--boot-timeout -5`` booted one and gave up at once ("within -5 s")."""
    p, secs = _serve(sys.executable, images, "model", "--engine", "echo", "--no-gpu-check", "--workdir",
                     str(tmp_path / "w"), "--listen", "127.0.0.1:0", flag)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "must be above 0" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "w" / "logs")  # nothing was started
