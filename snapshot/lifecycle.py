"""The snapshotted program's side: "init is done, snapshot me here", and hooks after restore.

Like Modal's ``@enter(snap=True)`` / ``@enter(snap=False)``: everything a program does before
``ready()`` is done once and captured in the snapshot; what it registers with
``after_restore`` runs every time ``ready()`` returns, whether the process was restored from
a snapshot, kept running after one was taken, or was never snapshotted at all (a cold start),
so per-boot work (reseeding random generators, reopening sockets, refreshing tokens) lives
in one place::

    import snapshot
    model = load_model()                     # snapshotted once

    @snapshot.after_restore
    def reconnect():                         # runs on every boot
        global conn; conn = open_connection()

    restored = snapshot.ready()              # blocks while the supervisor dumps us

How it talks to the supervisor (``snapshot.cpu``): ``spawn`` sets ``$CASFS_SNAPSHOT_READY``
to a file path. ``ready()`` writes a small JSON report there (its PIDs, Python and library
versions) and sleeps. The supervisor dumps the process; after a restore it sends
``SIG_RESTORED`` (after a dump that left the process running, ``SIG_CONTINUE``) and
``ready()`` returns. Without that variable ``ready()`` runs the hooks and returns at once.

Contract: call ``ready()`` from the main thread (Python runs signal handlers there), and at most
once per process (later calls return the first answer without waiting).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

__all__ = ["ENV_READY", "SIG_CONTINUE", "SIG_RESTORED", "after_restore", "ready", "reseed_random",
           "restored", "supervised"]

ENV_READY = "CASFS_SNAPSHOT_READY"
SIG_CONTINUE = signal.SIGRTMIN + 3
SIG_RESTORED = signal.SIGRTMIN + 4
# Libraries whose versions a ready report records (when imported): the restore host must
# have the same ones (checked by snapshot.cpu before CRIU runs).
KEY_LIBRARIES = ("numpy", "torch", "transformers", "vllm", "safetensors", "tokenizers", "jax",
                 "tensorflow", "scipy", "triton")

F = TypeVar("F", bound=Callable[[], object])

_hooks: list[Callable[[], object]] = []
_state: dict[str, bool | None] = {"answer": None}
_lock = threading.Lock()


class _Woken(BaseException):
    """Raised by the wake-up signal handler to leave the sleep in ``ready()`` at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def after_restore(fn: F) -> F:
    """Register ``fn()`` to run each time ``ready()`` returns (usable as a decorator).

    Hooks run in registration order; an exception in one propagates out of ``ready()``.
    """
    with _lock:
        _hooks.append(fn)
    return fn


def supervised() -> bool:
    """Whether a snapshot supervisor started this process (``$CASFS_SNAPSHOT_READY`` is set)."""
    return bool(os.environ.get(ENV_READY))


def restored() -> bool:
    """Whether ``ready()`` has returned after a restore from a snapshot."""
    return bool(_state["answer"])


def reseed_random() -> None:
    """Reseed ``random`` (and numpy's and torch's global generators when imported) from the OS.

    Register it with ``after_restore(reseed_random)`` so that replicas restored from one
    snapshot do not draw identical random numbers.
    """
    seed = int.from_bytes(os.urandom(8), "little")
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(seed)


def _ns_pids() -> list[int]:
    """This process's PID in each PID namespace, outermost first (``NSpid`` of /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return [os.getpid()]


def _libraries() -> dict[str, dict[str, str]]:
    out = {}
    for name in KEY_LIBRARIES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        version = getattr(mod, "__version__", None)
        path = getattr(mod, "__file__", None) or ""
        out[name] = {"version": str(version) if version is not None else "",
                     "path": os.path.dirname(os.path.dirname(path)) if path else ""}
    return out


def _report() -> dict:
    pids = _ns_pids()
    return {"pid": os.getpid(), "ns_pids": pids, "python": sys.version.split()[0],
            "executable": sys.executable, "libraries": _libraries(), "time": time.time()}


def _write_report(path: str) -> None:
    import casfs  # here, not at the top: only a supervised process pays for the import

    casfs.atomic_write(path, json.dumps(_report()))


def _run_hooks() -> None:
    with _lock:
        hooks = list(_hooks)
    for fn in hooks:
        fn()


def ready(timeout: float | None = None) -> bool:
    """Mark initialisation done: block while the supervisor snapshots this process.

    Returns True when the process continues after a restore from a snapshot, False when it was
    not restored (no supervisor, the supervisor left it running after the dump, or ``timeout``
    seconds passed without an answer). The ``after_restore`` hooks run before it returns.

    Raises:
        RuntimeError: when called from a thread other than the main thread.
    """
    if _state["answer"] is not None:
        return bool(_state["answer"])
    path = os.environ.get(ENV_READY)
    if not path:
        _state["answer"] = False
        _run_hooks()
        return False
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("snapshot.ready() must be called from the main thread")

    def wake(signum: int, _frame: object) -> None:
        raise _Woken(signum)

    old = {s: signal.signal(s, wake) for s in (SIG_CONTINUE, SIG_RESTORED)}
    answer = False
    try:
        try:
            _write_report(path)
            deadline = None if timeout is None else time.monotonic() + timeout
            # Short sleeps: a signal that lands on another thread still reaches this one
            # (CPython runs handlers in the main thread between bytecodes).
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.25)
        except _Woken as w:
            answer = w.signum == SIG_RESTORED
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _state["answer"] = answer
    _run_hooks()
    return answer
