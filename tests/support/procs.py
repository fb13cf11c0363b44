"""Starting and stopping real server processes for tests and benchmarks: free ports, waiting
for an HTTP answer, log tails, and a skip reason when a binary is absent."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

__all__ = ["free_port", "log_tail", "missing_binary", "stop", "wait_http"]


def missing_binary(path: str) -> str | None:
    """A skip reason if the executable ``path`` is absent, else None."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return None
    return f"{path} is not installed"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it; races retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen, log: str, timeout: float) -> None:
    """Poll ``url`` until any HTTP answer comes back; raise with the server's log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"{proc.args[0]} did not answer {url} within {timeout:.0f} s:\n"
                                   f"{log_tail(log)}") from None
            time.sleep(0.05)
