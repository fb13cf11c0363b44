"""A tensor-parallel replica: N rank processes of one transformers model (``serve.tp_worker``),
parked and unparked together with the driver's checkpoint API (issue 16).

``TpReplica(model_dir, world=2, device="cuda").start()`` boots the ranks cold (rank R on GPU R,
NCCL; on a CPU host gloo). ``generate`` sends a greedy request to every rank and checks they
agree. ``park()`` is the snapshot protocol of ``snapshot.gpugroup``:

1. quiesce: every rank meets the others at a barrier and destroys its communicators;
2. ``snapshot.suspend_group``: every rank locked before any is checkpointed (rolled back if one
   fails, so a failed park leaves the replica serving: its communicators are rebuilt);

and ``unpark()`` the reverse: ``snapshot.resume_group`` (every rank restored before any is
unlocked; on failure every rank is killed and the replica must boot cold), then new
communicators over a fresh rendezvous port, checked with an all-reduce. Each step is timed.

Every rank's environment has NVLink multicast off, as the GPU machine's documentation requires
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``), and
no ``CUDA_VISIBLE_DEVICES`` (the ranks see every GPU). What is not here yet: the CRIU dump of the
ranks to a casfs snapshot (a restore from disk on another host; the ranks are plain children of
this supervisor, talking over pipes), and an OpenAI front for the group. The CPU tests drive it
with gloo and a fake driver; nothing of it has run on two GPUs (none was lent): see
docs/multigpu.md.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

from .errors import BootError

__all__ = ["NVLS_OFF", "TpError", "TpReplica", "free_port"]

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class TpError(BootError):
    """A rank failed, died or disagreed with the others; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call (the next rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TpReplica:
    """N ranks of one model (see the module docstring).

    Args:
        model_dir: a transformers model directory (Llama/Qwen-style; heads, KV heads and MLP
            width divisible by ``world``).
        world: the number of ranks (GPUs).
        device: "cuda" (rank R on GPU R, NCCL) or "cpu" (gloo).
        python: the interpreter with torch and transformers.
        env: extra environment for every rank (after the NVLink multicast switches).
        log_dir: where each rank's stderr goes (``rank-R.log``; default: discarded).
        timeout_s: how long a boot or a command may take.
    """

    def __init__(self, model_dir: str, *, world: int = 2, device: str = "cpu", python: str = sys.executable,
                 env: dict[str, str] | None = None, log_dir: str | None = None, dtype: str = "auto",
                 timeout_s: float = 600.0) -> None:
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        self.model_dir, self.world, self.device, self.python = model_dir, world, device, python
        self.env, self.log_dir, self.dtype, self.timeout_s = dict(env or {}), log_dir, dtype, timeout_s
        self.procs: list[subprocess.Popen] = []
        self.ready: list[dict] = []
        self.group: Any = None  # snapshot.SuspendedGroup while parked
        self.events: list[dict] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def parked(self) -> bool:
        return self.group is not None

    def rank_env(self) -> dict[str, str]:
        """A rank's environment: this one's, NVLink multicast off, every GPU visible, ``env``."""
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env.update(NVLS_OFF)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def start(self) -> dict:
        """Boot every rank cold; returns ``{"boot_s", "ranks": [ready lines]}``.

        Raises:
            TpError: a rank died or did not become ready in time (every rank is stopped).
        """
        t0 = time.monotonic()
        init = f"tcp://127.0.0.1:{free_port()}"
        env = self.rank_env()
        for r in range(self.world):
            argv = [self.python, "-m", "serve.tp_worker", "--model-dir", self.model_dir, "--rank", str(r),
                    "--world", str(self.world), "--init", init, "--device", self.device, "--dtype", self.dtype]
            err: Any = subprocess.DEVNULL
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                err = open(os.path.join(self.log_dir, f"rank-{r}.log"), "ab")
            try:
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                                   env=env, start_new_session=True))
            finally:
                if err is not subprocess.DEVNULL:
                    err.close()
        try:
            self.ready = self._replies("boot")
        except TpError:
            self.stop()
            raise
        for r, line in enumerate(self.ready):
            if not line.get("ready"):
                self.stop()
                raise TpError(f"rank {r} did not boot: {line.get('error')}")
        out = {"boot_s": time.monotonic() - t0, "ranks": self.ready}
        self.events.append({"op": "start", **out})
        return out

    def _send(self, cmd: dict) -> None:
        data = (json.dumps(cmd) + "\n").encode()
        for r, p in enumerate(self.procs):
            try:
                assert p.stdin is not None
                p.stdin.write(data)
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                raise TpError(f"rank {r} (pid {p.pid}) is gone: {self._why(r)}") from None

    def _why(self, r: int) -> str:
        p = self.procs[r]
        rc = p.poll()
        tail = ""
        if self.log_dir:
            try:
                with open(os.path.join(self.log_dir, f"rank-{r}.log"), "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 600))
                    lines = f.read().decode(errors="replace").strip().splitlines()
                tail = f"; last log line: {lines[-1]}" if lines else ""
            except OSError:
                pass
        return (f"exited with status {rc}" if rc is not None else "no answer") + tail

    def _replies(self, what: str) -> list[dict]:
        deadline = time.monotonic() + self.timeout_s
        out: list[dict] = []
        for r, p in enumerate(self.procs):
            assert p.stdout is not None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TpError(f"rank {r} (pid {p.pid}) did not answer {what} within {self.timeout_s:.0f} s")
                ready, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
                if ready:
                    line = p.stdout.readline()
                    if not line:
                        raise TpError(f"rank {r} (pid {p.pid}) closed its pipe during {what}: {self._why(r)}")
                    break
                if p.poll() is not None:
                    raise TpError(f"rank {r} (pid {p.pid}) died during {what}: {self._why(r)}")
            try:
                out.append(json.loads(line))
            except ValueError:
                raise TpError(f"rank {r} answered {what} with {line[:200]!r}") from None
        return out

    def call(self, op: str, **kw: Any) -> list[dict]:
        """Send ``op`` to every rank, return their answers (rank order). Raises TpError."""
        if self.parked:
            raise TpError(f"the replica is parked (its ranks are checkpointed): unpark it before {op}")
        self._send({"op": op, **kw})
        out = self._replies(op)
        bad = [(r, a["error"]) for r, a in enumerate(out) if "error" in a]
        if bad:
            raise TpError("; ".join(f"rank {r}: {e}" for r, e in bad))
        return out

    def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        """Greedy tokens and log-probabilities (every rank must agree exactly). Raises TpError."""
        t = time.monotonic()
        outs = self.call("generate", ids=list(ids), max_new_tokens=int(max_new_tokens))
        first = {k: outs[0][k] for k in ("tokens", "logprobs")}
        for r, o in enumerate(outs[1:], 1):
            if {k: o[k] for k in ("tokens", "logprobs")} != first:
                raise TpError(f"rank {r} disagrees with rank 0: {o['tokens']} != {first['tokens']}")
        return {**first, "seconds": time.monotonic() - t}

    def park(self) -> dict:
        """Quiesce, then suspend every rank's GPU state (``snapshot.suspend_group``). Returns the
        report. A failed suspend that rolled back rebuilds the communicators: still serving.

        Raises:
            TpError: quiesce or suspend failed (``killed`` in the message when the group is gone).
        """
        import snapshot

        t0 = time.monotonic()
        self.call("quiesce")
        t1 = time.monotonic()
        try:
            self.group = snapshot.suspend_group(self.pids)
        except snapshot.GroupFailed as e:
            if e.state == "running":
                self.call("rebuild", init=f"tcp://127.0.0.1:{free_port()}")
            raise TpError(f"parking the tensor-parallel replica failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - CheckpointError before any lock, GpuUnavailable: nothing suspended
            self.call("rebuild", init=f"tcp://127.0.0.1:{free_port()}")
            raise TpError(f"parking the tensor-parallel replica failed: {type(e).__name__}: {e}") from None
        t2 = time.monotonic()
        rep = {"op": "park", "phases": {"quiesce": t1 - t0, "suspend": t2 - t1}, "total": t2 - t0,
               "device_state_bytes": sum(m.total_device_bytes for m in self.group.members)}
        self.events.append(rep)
        return rep

    def unpark(self, **resume_kw: Any) -> dict:
        """Resume every rank (``snapshot.resume_group``), then rebuild the communicators. Returns
        the report.

        Raises:
            TpError: the resume failed (the message says whether the ranks were killed: then boot
                the replica cold) or the rebuild failed.
        """
        import snapshot

        if not self.parked:
            raise TpError("the replica is not parked")
        t0 = time.monotonic()
        try:
            res = snapshot.resume_group(self.group, **resume_kw)
        except snapshot.GroupFailed as e:
            if e.state != "checkpointed":
                self.group = None
            raise TpError(f"unparking the tensor-parallel replica failed: {e}") from None
        self.group = None
        t1 = time.monotonic()
        rb = self.call("rebuild", init=f"tcp://127.0.0.1:{free_port()}")
        t2 = time.monotonic()
        rep = {"op": "unpark", "phases": {"resume": t1 - t0, "rebuild": t2 - t1}, "total": t2 - t0,
               "resume": {"restore_s": res.restore_s, "unlock_s": res.unlock_s},
               "process_group_s": max(r.get("process_group", 0.0) for r in rb)}
        self.events.append(rep)
        return rep

    def stop(self, timeout: float = 10.0) -> None:
        """End every rank: ``exit`` when serving, SIGKILL otherwise (a parked rank cannot run its
        CUDA teardown) or when it does not go in ``timeout`` seconds."""
        import signal

        if self.procs and not self.parked and all(p.poll() is None for p in self.procs):
            try:
                self._send({"op": "exit"})
            except TpError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if self.parked:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        self.procs = []
        self.group = None
