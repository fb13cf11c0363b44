"""A warm, single-threaded helper process that makes the snapshotter's image mounts.

Why: ``casfs.mount`` starts its daemon by forking the calling process when that process has no
other threads (the daemon then serves the image whose index is already loaded), and otherwise
by spawning ``python -m casfs.cli.main mount``, which imports Python and casfs's CLI again and
loads the index a second time. The snapshotter is a gRPC server, full of threads, so every
mount took the slow path: measured here (2-core VM under load) 1.0-1.5 s per mount, of which
~0.26 s is the registry (resolve + index over a 50 ms RTT link) and the rest interpreter and
CLI start-up. The helper is forked before the gRPC server starts, stays single-threaded, and
forks each mount daemon from its warm interpreter.

Protocol: two pipes (a daemon forked from the helper closes inherited pipes, so it keeps
nothing of them); one JSON line per request ``{"image", "store", "cache_dir", "mountpoint",
"options"}`` and one per answer ``{"ok": true}`` or ``{"error": "..."}``. The helper exits when
its request pipe closes (the snapshotter is gone); the mount daemons it forked live on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

__all__ = ["Mounter", "MounterGone"]

log = logging.getLogger("casfs.snapshotter")


class MounterGone(RuntimeError):
    """The helper process is not there (the caller mounts by itself instead)."""


class Mounter:
    """Fork the helper now (call before any thread starts). Thread-safe: one request at a time."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the snapshotter decides when to stop
                _serve(req_r, rep_w)
            except BaseException:  # noqa: BLE001 - never return into the parent's code
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        self.pid = pid
        self._req = os.fdopen(req_w, "w", buffering=1)
        self._rep = os.fdopen(rep_r, "r")
        self._lock = threading.Lock()

    def mount(self, image: str, store: str, cache_dir: str | None, mountpoint: str, options: dict) -> None:
        """Mount ``image`` of ``store`` at ``mountpoint`` through the helper.

        Raises:
            MounterGone: the helper is not there.
            casfs.CasfsError: the mount failed (the helper's message).
        """
        from ..errors import CasfsError

        msg = json.dumps({"image": image, "store": store, "cache_dir": cache_dir, "mountpoint": mountpoint,
                          "options": options})
        with self._lock:
            try:
                self._req.write(msg + "\n")
                self._req.flush()
                line = self._rep.readline()
            except (OSError, ValueError) as e:
                raise MounterGone(f"mount helper gone: {e}") from None
        if not line:
            raise MounterGone("mount helper gone")
        answer = json.loads(line)
        if "error" in answer:
            raise CasfsError(answer["error"])

    def close(self) -> None:
        """Close the request pipe (the helper exits) and reap it."""
        for f in (self._req, self._rep):
            try:
                f.close()
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(req_r: int, rep_w: int) -> None:
    import casfs

    with os.fdopen(req_r, "r") as req, os.fdopen(rep_w, "w", buffering=1) as rep:
        for line in req:
            store = None
            try:
                r = json.loads(line)
                store = casfs.open_store(r["store"], cache_dir=r["cache_dir"] if r["cache_dir"] is not None else "")
                # by id, without Store.resolve's existence check: one round trip less, and the
                # index load fails just as clearly when the image is not there
                image = casfs.Image(store, r["image"], store.load_index(r["image"]))
                casfs.mount(image, r["mountpoint"], casfs.MountOptions(**r["options"]))
                answer: dict = {"ok": True}
            except Exception as e:  # noqa: BLE001 - every failure goes back as a message
                answer = {"error": str(e) or type(e).__name__}
            finally:
                if store is not None:
                    store.close()
            rep.write(json.dumps(answer) + "\n")
            rep.flush()
            # reap the intermediate children of casfs.mount's double fork (already waited) and
            # any spawned daemon that exited
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
