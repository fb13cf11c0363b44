"""Checks a replica's boot runs before any slow work, each failing with one line a user can act
on: the engine is installed in the interpreter that will run the worker, the listen port is
free, and the image holds a model.

Why up front: a cold vLLM boot takes 30-120 s before the worker binds its port or reads the
model, so a busy port or an image without weights used to fail only after that, with the reason
in a log; and ``casfs serve`` run from casfs's plain venv died with a ``No module named 'vllm'``
traceback.

Engine-aware through one hook per engine (``ENGINE_CHECKS``): an engine names the Python
modules it needs in the worker and whether it needs a model directory. Another engine registers
its own with ``register_engine``.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from casfs import parse_listen

from .errors import BootError

__all__ = ["ENGINE_CHECKS", "EngineCheck", "PreflightError", "check_engine", "check_model",
           "check_port", "register_engine"]

#: files whose names mark model weights in a Hugging Face style directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class PreflightError(BootError):
    """A check before the boot failed; nothing was started."""


@dataclass(frozen=True)
class EngineCheck:
    """What one engine needs before a boot: ``modules`` importable by the worker's Python,
    ``needs_model`` (config.json and weights in the image), and ``install``: how to get it."""

    modules: tuple[str, ...] = ()
    needs_model: bool = True
    install: str = ""


ENGINE_CHECKS: dict[str, EngineCheck] = {
    "vllm": EngineCheck(modules=("vllm",), needs_model=True,
                        install="run casfs serve from the vLLM install, `.venv-vllm/bin/casfs serve ...` "
                                "(scripts/setup_vllm.sh makes it; see the README), or use --engine echo "
                                "for a stand-in that needs no model"),
    "transformers": EngineCheck(modules=("transformers", "torch"), needs_model=True,
                                install="run casfs serve from an environment with torch and transformers: "
                                        "`.venv-vllm/bin/casfs serve ...` on CPU hosts (the transformers "
                                        "extra; see the README), the machine's own Python on a GPU host"),
    "echo": EngineCheck(needs_model=False),
}


def register_engine(name: str, check: EngineCheck) -> None:
    """Declare what engine ``name`` needs (its preflight hook)."""
    ENGINE_CHECKS[name] = check


def _missing_modules(python: str, modules: tuple[str, ...]) -> list[str]:
    """The modules among ``modules`` that ``python`` cannot find (found, not imported: importing
    vLLM alone takes 15-25 s here)."""
    if not modules:
        return []
    # abspath, not realpath: two venvs' pythons are links to one interpreter with other packages
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util

        out = []
        for m in modules:
            try:
                if importlib.util.find_spec(m) is None:
                    out.append(m)
            except (ImportError, ValueError):
                out.append(m)
        return out
    code = ("import importlib.util, sys\n"
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    try:
        p = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PreflightError(f"cannot run the worker's Python {python}: {e}") from None
    if p.returncode != 0:
        raise PreflightError(f"the worker's Python {python} failed to start: "
                             f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return p.stdout.split()


def check_engine(engine: str, python: str = sys.executable) -> None:
    """Raise PreflightError unless ``engine`` is known and its modules are installed for
    ``python`` (the interpreter that will run the worker)."""
    spec = ENGINE_CHECKS.get(engine)
    if spec is None:
        raise PreflightError(f"unknown engine {engine!r} (known: {', '.join(sorted(ENGINE_CHECKS))})")
    missing = _missing_modules(python, spec.modules)
    if missing:
        env = os.path.dirname(os.path.dirname(python))
        raise PreflightError(f"the {engine} engine is not installed in {env} ({', '.join(missing)} "
                             f"not importable): {spec.install or 'install it there'}")


def check_port(listen: str) -> None:
    """Raise PreflightError when ``listen`` (HOST:PORT) cannot be bound right now (in use, or
    an address this host does not have). Port 0 always passes."""
    host, port = parse_listen(listen)
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
        s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PreflightError(f"{listen} is already in use{_holder(port)}: stop that server or "
                                 "choose another --listen HOST:PORT") from None
        raise PreflightError(f"cannot listen on {listen}: {e.strerror or e}") from None
    finally:
        s.close()


def _holder(port: int) -> str:
    """`` (by pid N, NAME)`` for the process listening on ``port``, where /proc tells."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, IndexError, ValueError, StopIteration):
            continue
    if not inodes:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        return f" (by pid {pid}, {f.read().strip()})"
        except OSError:
            continue
    return ""


def check_model(image: Any, engine: str) -> None:
    """Raise PreflightError unless ``image`` (a casfs.Image) holds a model that ``engine`` can
    load: a ``config.json`` and weights (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
    ``*.gguf``) at its top level. Engines that need no model pass."""
    spec = ENGINE_CHECKS.get(engine)
    if spec is not None and not spec.needs_model:
        return
    names = image.listdir("")
    lacks = []
    if "config.json" not in names:
        lacks.append("no config.json")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        lacks.append(f"no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    if lacks:
        shown = ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else "") if names else "nothing"
        raise PreflightError(f"image {image.name} ({image.id[:12]}) does not hold a model: {' and '.join(lacks)} "
                             f"at its top level (it has: {shown}); build it from a Hugging Face model "
                             "directory (casfs build DIR --tag NAME)")


def preflight(cfg: Any) -> None:
    """The checks that need no image: engine installed, port free. Raises PreflightError."""
    check_engine(cfg.engine, cfg.python)
    check_port(cfg.listen)
