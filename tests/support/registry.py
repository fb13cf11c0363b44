"""Debian's ``docker-registry`` (the CNCF distribution registry 2.8, the OCI distribution API)
on 127.0.0.1, with its storage in a private temporary directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator

from .procs import free_port, log_tail, stop, wait_http

__all__ = ["REGISTRY", "Registry", "registry_server"]

REGISTRY = "/usr/bin/docker-registry"

_CONF = """\
version: 0.1
log:
  level: {level}
  accesslog:
    disabled: {no_access_log}
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` (``127.0.0.1:PORT``), ``port``, its storage ``root`` (the
    filesystem driver's tree: ``docker/registry/v2/blobs/sha256/<xx>/<hex>/data``) and its
    ``log`` file."""

    host: str
    port: int
    root: str
    log: str

    def blob_path(self, digest: str) -> str:
        """The file that holds blob ``digest`` (``sha256:<hex>``) in the registry's storage."""
        algo, _, hexd = digest.partition(":")
        return os.path.join(self.root, "docker", "registry", "v2", "blobs", algo, hexd[:2], hexd, "data")


@contextlib.contextmanager
def registry_server(*, binary: str = REGISTRY, start_timeout: float = 30.0,
                    access_log: bool = False) -> Iterator[Registry]:
    """Run ``docker-registry serve`` on a free port of 127.0.0.1 with filesystem storage in a
    temporary directory (deletes enabled, no auth); yield a ``Registry``; stop it on exit.

    Raises:
        RuntimeError: with the registry's log when it exits or does not answer in time.
    """
    with tempfile.TemporaryDirectory(prefix="casfs-registry-") as tmp:
        log = os.path.join(tmp, "registry.log")
        conf = os.path.join(tmp, "config.yml")
        root = os.path.join(tmp, "storage")
        os.makedirs(root)
        for attempt in range(3):
            port = free_port()
            with open(conf, "w") as f:
                f.write(_CONF.format(root=root, port=port, level="info" if access_log else "error",
                                     no_access_log="false" if access_log else "true"))
            with open(log, "wb") as out:
                proc = subprocess.Popen([binary, "serve", conf], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            try:
                wait_http(f"http://127.0.0.1:{port}/v2/", proc, log, start_timeout)
                break
            except RuntimeError:
                stop(proc)
                if attempt == 2 or "in use" not in log_tail(log):
                    raise
        try:
            yield Registry(f"127.0.0.1:{port}", port, root, log)
        finally:
            stop(proc)
