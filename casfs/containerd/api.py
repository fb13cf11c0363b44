"""containerd's snapshots API for Python, generated from the ``.proto`` files Debian ships.

No generated code is committed: the stubs are generated with ``grpcio-tools`` from the
definitions in Debian's ``golang-github-containerd-containerd-dev`` package (and
``gogoproto/gogo.proto`` from ``golang-github-gogo-protobuf-dev``, which they import), into a
cache directory keyed by the definitions' hash and the generator's version, once (at setup by
``scripts/setup_containerd_api.sh``, else on first use), then imported from there.

Where the definitions are looked for, first hit wins:

1. ``$CASFS_CONTAINERD_PROTO_DIR`` (a Go source root: ``.../gocode/src``);
2. ``<checkout>/.cache/containerd-api/src/usr/share/gocode/src`` (what the setup script
   unpacks there with ``apt-get download`` + ``dpkg-deb -x``: the two packages' files only,
   without the ~80 Go library packages their installation would pull in);
3. ``/usr/share/gocode/src`` (the packages installed).

The generated tree goes to ``$CASFS_CONTAINERD_API_DIR``, else
``<checkout>/.cache/containerd-api/gen/<hash>``, else ``$CASFS_HOME/containerd-api/<hash>``
when the checkout is not writable.

The staging step: the definitions import each other as ``github.com/containerd/...``, and a
Python package cannot be named ``github.com``; the three files are copied to
``containerd/api/...`` and ``gogoproto/`` and their import lines rewritten to match. Message
and service names (``containerd.services.snapshots.v1.Snapshots``) and so the wire format are
untouched.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import threading
from types import ModuleType

from ..errors import CasfsError
from ..fsutil import atomic_directory

__all__ = ["ApiUnavailable", "load", "proto_root"]

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CD = "github.com/containerd/containerd/api"
# (path under the Go source root, staged path, import rewrites)
_FILES = [
    (f"{_CD}/types/mount.proto", "containerd/api/types/mount.proto"),
    (f"{_CD}/services/snapshots/v1/snapshots.proto", "containerd/api/services/snapshots/v1/snapshots.proto"),
    ("github.com/gogo/protobuf/gogoproto/gogo.proto", "gogoproto/gogo.proto"),
]
_REWRITE = {f'"{_CD}/types/mount.proto"': '"containerd/api/types/mount.proto"'}
_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}


class ApiUnavailable(CasfsError):
    """The containerd API definitions or grpcio/grpcio-tools are missing."""


def proto_root() -> str:
    """The Go source root that holds containerd's and gogoproto's ``.proto`` files.

    Raises:
        ApiUnavailable: none of the places holds them (says how to get them).
    """
    candidates = [os.environ.get("CASFS_CONTAINERD_PROTO_DIR") or "",
                  os.path.join(_CHECKOUT, ".cache", "containerd-api", "src", "usr", "share", "gocode", "src"),
                  "/usr/share/gocode/src"]
    for root in candidates:
        if root and all(os.path.isfile(os.path.join(root, src)) for src, _ in _FILES):
            return root
    raise ApiUnavailable("containerd's API definitions are missing: run scripts/setup_containerd_api.sh "
                         "(or apt-get install golang-github-containerd-containerd-dev)")


def _digest(root: str) -> str:
    import grpc_tools

    h = hashlib.sha256(getattr(grpc_tools, "__file__", "").encode())
    try:
        from importlib.metadata import version

        h.update(version("grpcio-tools").encode())
    except Exception:  # noqa: BLE001 - only a cache key
        pass
    for src, _ in _FILES:
        with open(os.path.join(root, src), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _out_dir(key: str) -> str:
    env = os.environ.get("CASFS_CONTAINERD_API_DIR")
    if env:
        return os.path.join(env, key)
    cache = os.path.join(_CHECKOUT, ".cache", "containerd-api", "gen")
    try:
        os.makedirs(cache, exist_ok=True)
        if os.access(cache, os.W_OK):
            return os.path.join(cache, key)
    except OSError:
        pass
    from ..urls import home_dir

    return os.path.join(home_dir(), "containerd-api", key)


def generate(root: str, out: str) -> None:
    """Stage the three definitions and run protoc (grpcio-tools) into ``out`` (atomically).

    Raises:
        ApiUnavailable: grpcio-tools is missing or protoc fails.
    """
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise ApiUnavailable(f"the containerd snapshotter needs grpcio and grpcio-tools: "
                             f"pip install 'casfs[containerd]' ({e})") from None
    import grpc_tools

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gen-", dir=parent)
    try:
        stage = os.path.join(tmp, "proto")
        for src, dst in _FILES:
            with open(os.path.join(root, src), encoding="utf-8") as f:
                text = f.read()
            for old, new in _REWRITE.items():
                text = text.replace(old, new)
            path = os.path.join(stage, dst)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        try:
            with atomic_directory(out) as gen:  # renamed into place only when complete
                args = ["grpc_tools.protoc", f"-I{stage}", f"-I{include}", f"--python_out={gen}",
                        f"--grpc_python_out={gen}"] + [dst for _, dst in _FILES]
                cwd = os.getcwd()
                try:
                    os.chdir(stage)
                    rc = protoc.main(args)
                finally:
                    os.chdir(cwd)
                if rc != 0:
                    raise ApiUnavailable(f"protoc failed ({rc}) on containerd's definitions in {root}")
                for dirpath, _dirs, _files in os.walk(gen):  # packages, for the generated imports
                    if dirpath != gen:
                        open(os.path.join(dirpath, "__init__.py"), "a").close()
        except OSError:
            if not os.path.isdir(out):  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(snapshots_pb2, snapshots_pb2_grpc, mount_pb2), generating them first if needed.

    Raises:
        ApiUnavailable: definitions or grpcio/grpcio-tools missing.
    """
    with _lock:
        if not _loaded:
            try:
                import grpc  # noqa: F401
            except ImportError as e:
                raise ApiUnavailable(f"the containerd snapshotter needs grpcio and grpcio-tools: "
                                     f"pip install 'casfs[containerd]' ({e})") from None
            root = proto_root()
            try:
                key = _digest(root)
            except ImportError as e:
                raise ApiUnavailable(f"the containerd snapshotter needs grpcio-tools: "
                                     f"pip install 'casfs[containerd]' ({e})") from None
            out = _out_dir(key)
            if not os.path.isfile(os.path.join(out, "containerd", "api", "types", "mount_pb2.py")):
                generate(root, out)
            if out not in sys.path:
                sys.path.insert(0, out)
            base = "containerd.api.services.snapshots.v1."
            _loaded["pb2"] = importlib.import_module(base + "snapshots_pb2")
            _loaded["grpc"] = importlib.import_module(base + "snapshots_pb2_grpc")
            _loaded["mount"] = importlib.import_module("containerd.api.types.mount_pb2")
    return _loaded["pb2"], _loaded["grpc"], _loaded["mount"]


if __name__ == "__main__":  # scripts/setup_containerd_api.sh: generate now, say where
    pb2, _, _ = load()
    print(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(pb2.__file__))))))
