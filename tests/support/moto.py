"""moto's S3-compatible server in its own process on 127.0.0.1 (``moto[server]``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from typing import Iterator

from .procs import free_port, log_tail, stop, wait_http

__all__ = ["MOTO_SERVER", "aws_test_environment", "moto_server"]

MOTO_SERVER = os.path.join(os.path.dirname(sys.executable), "moto_server")


_AWS_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT")


@contextlib.contextmanager
def aws_test_environment() -> Iterator[None]:
    """Dummy credentials for boto3's chain, and nothing from the developer's shell (no profile,
    session token, endpoint or config files), for the duration of the block; the environment is
    restored afterwards."""
    values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in (*values, *_AWS_CLEARED)}
    os.environ.update(values)
    for var in _AWS_CLEARED:
        os.environ.pop(var, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def moto_server(*, binary: str = MOTO_SERVER, start_timeout: float = 60.0,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """Run moto's S3-compatible server in its own process; yield ``http://127.0.0.1:PORT``.

    Any S3 credentials are accepted by moto; set ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` to dummy values so that boto3's chain finds some.
    ``env`` adds variables to the server's environment (e.g.
    ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` makes moto check credentials against its IAM).

    Raises:
        RuntimeError: with the server's log when it exits or does not answer in time.
    """
    with tempfile.TemporaryDirectory(prefix="casfs-moto-") as tmp:
        log = os.path.join(tmp, "moto.log")
        for attempt in range(3):
            port = free_port()
            with open(log, "wb") as out:
                proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})})
            try:
                wait_http(f"http://127.0.0.1:{port}/", proc, log, start_timeout)
                break
            except RuntimeError:
                stop(proc)
                if attempt == 2 or "in use" not in log_tail(log):
                    raise
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
