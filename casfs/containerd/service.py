"""containerd's snapshots gRPC service (``containerd.services.snapshots.v1.Snapshots``) over a
``Snapshotter``, served on a unix socket: what containerd's ``proxy_plugins`` talk to.

Errors become the status codes containerd's ``errdefs.FromGRPC`` turns back into its own:
NotFound -> NOT_FOUND, AlreadyExists -> ALREADY_EXISTS, FailedPrecondition ->
FAILED_PRECONDITION, InvalidArgument -> INVALID_ARGUMENT; anything else is UNKNOWN with the
message (and a traceback in the log).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from typing import Callable

from .api import load
from .snapshotter import AlreadyExists, FailedPrecondition, InvalidArgument, Mount, NotFound, Snapshotter

__all__ = ["claim_socket", "serve"]

log = logging.getLogger("casfs.snapshotter")
_LIST_BATCH = 100


def _servicer(sn: Snapshotter):
    import grpc

    pb, pb_grpc, mount_pb = load()
    codes = {NotFound: grpc.StatusCode.NOT_FOUND, AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
             FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
             InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT}

    def mounts(ms: list[Mount]):
        return [mount_pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in ms]

    def info(s):
        i = pb.Info(name=s.key, parent=s.parent, kind=s.kind, labels=s.labels)
        i.created_at.FromNanoseconds(int(s.created * 1e9))
        i.updated_at.FromNanoseconds(int(s.updated * 1e9))
        return i

    def rpc(fn: Callable):
        def call(self, request, context):
            try:
                return fn(request)
            except tuple(codes) as e:
                log.debug("%s: %s", fn.__name__, e)
                context.abort(codes[type(e)], str(e))
            except Exception as e:  # noqa: BLE001 - the client gets the message, the log the trace
                log.exception("%s failed", fn.__name__)
                context.abort(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
        call.__name__ = fn.__name__
        return call

    class Servicer(pb_grpc.SnapshotsServicer):
        @rpc
        def Prepare(req):
            return pb.PrepareSnapshotResponse(mounts=mounts(sn.prepare(req.key, req.parent, dict(req.labels))))

        @rpc
        def View(req):
            return pb.ViewSnapshotResponse(mounts=mounts(sn.prepare(req.key, req.parent, dict(req.labels),
                                                                    view=True)))

        @rpc
        def Mounts(req):
            return pb.MountsResponse(mounts=mounts(sn.mounts(req.key)))

        @rpc
        def Commit(req):
            sn.commit(req.name, req.key, dict(req.labels))
            return _empty()

        @rpc
        def Remove(req):
            sn.remove(req.key)
            return _empty()

        @rpc
        def Stat(req):
            return pb.StatSnapshotResponse(info=info(sn.stat(req.key)))

        @rpc
        def Update(req):
            s = sn.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
            return pb.UpdateSnapshotResponse(info=info(s))

        def List(self, request, context):
            snaps = sn.list()
            for i in range(0, len(snaps), _LIST_BATCH):
                yield pb.ListSnapshotsResponse(info=[info(s) for s in snaps[i:i + _LIST_BATCH]])

        @rpc
        def Usage(req):
            size, inodes = sn.usage(req.key)
            return pb.UsageResponse(size=size, inodes=inodes)

        @rpc
        def Cleanup(req):
            for d in sn.cleanup():
                log.info("cleanup: removed %s", d)
            return _empty()

    return Servicer()


def _empty():
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


def claim_socket(path: str) -> None:
    """Remove a stale socket at ``path``; refuse anything else there: a file or directory (a
    mistyped --socket must not delete a user's file) or a socket some process still serves
    (a second snapshotter would take containerd's connections from the first).

    Raises:
        OSError: naming the path and what to do.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"--socket {path} exists and is not a socket; refusing to replace it "
                                    "(choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a snapshotter that was killed
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is serving on --socket {path} (a running casfs "
                                    "snapshotter?); stop it first or choose another path")


def serve(snapshotter: Snapshotter, socket_path: str, *, workers: int = 16,
          ready: Callable[[], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve ``snapshotter`` on unix socket ``socket_path`` until SIGTERM/SIGINT (or ``stop``).

    A stale socket file is replaced; the socket is removed on exit. Mounts stay.

    Raises:
        ApiUnavailable: grpcio or the API definitions are missing.
        OSError: the socket cannot be bound, ``socket_path`` is something other than a socket
            (never removed), or a live process serves on it (another snapshotter).
    """
    import grpc

    _, pb_grpc, _ = load()
    socket_path = os.path.abspath(socket_path)
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    claim_socket(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(_servicer(snapshotter), server)
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise OSError(f"cannot listen on {socket_path}")
    os.chmod(socket_path, 0o600) if os.path.exists(socket_path) else None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        os.chmod(socket_path, 0o600)
    except OSError:
        pass
    log.info("casfs snapshotter serving on %s (root %s)", socket_path, snapshotter.root)
    if ready:
        ready()
    try:
        stop.wait()
    finally:
        server.stop(grace=2).wait()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
