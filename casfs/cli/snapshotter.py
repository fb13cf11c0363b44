"""``casfs snapshotter``: containerd's remote snapshotter (a proxy plugin) for casfs images."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
containerd configuration (/etc/containerd/config.toml, version 2):

  [proxy_plugins]
    [proxy_plugins.casfs]
      type = "snapshot"
      address = "/run/casfs/snapshotter.sock"

then: ctr image pull --snapshotter casfs REF; ctr run --snapshotter casfs REF ID CMD
(Kubernetes: [plugins."io.containerd.grpc.v1.cri".containerd] snapshotter = "casfs").
Images are published with `casfs push NAME oci://HOST/REPO:TAG`. See docs/containerd.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshotter", help="serve containerd's snapshots API: casfs images as lazy container roots",
        description="Serve containerd's snapshots gRPC API on a unix socket (a proxy plugin). Layers "
                    "that refer to a casfs image (published with `casfs push`) become lazy casfs "
                    "mounts with a writable overlay per container, without downloading the image; "
                    "ordinary layers become ordinary overlay snapshots. Metadata lives in --root and "
                    "survives restarts; image mounts outlive the snapshotter. Runs until SIGTERM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", default="/run/casfs/snapshotter.sock",
                   help="unix socket to serve on (default /run/casfs/snapshotter.sock)")
    p.add_argument("--root", metavar="DIR", default="/var/lib/casfs-snapshotter",
                   help="snapshots and metadata (default /var/lib/casfs-snapshotter)")
    p.add_argument("--image-store", metavar="URL", default=None,
                   help="read every casfs image from this store (a zone mirror, a local store) instead "
                        "of the registry its image names")
    p.add_argument("--image-cache-dir", metavar="DIR", default=None,
                   help="ssd cache tier for image reads (default ROOT/cache; '' for none)")
    p.add_argument("--read-ahead-kb", type=int, default=None, help="kernel readahead of image mounts")
    p.set_defaults(func=cmd_snapshotter)


def cmd_snapshotter(args: argparse.Namespace) -> int:
    import logging

    from casfs.containerd.service import claim_socket, serve
    from casfs.containerd.snapshotter import Snapshotter

    from .main import check_dir_usable, check_store_exists

    if os.geteuid() != 0:
        raise ValueError("casfs snapshotter needs root (it mounts filesystems)")
    if args.read_ahead_kb is not None and args.read_ahead_kb < 0:
        raise ValueError(f"--read-ahead-kb {args.read_ahead_kb}: use 0 or more KiB")
    if args.image_store:
        check_store_exists(args.image_store, what="--image-store")
    check_dir_usable(args.root, "--root")
    check_dir_usable(args.image_cache_dir, "--image-cache-dir")
    if args.verbose == 0:
        logging.getLogger("casfs.snapshotter").setLevel(logging.INFO)
        logging.getLogger().setLevel(logging.INFO)
    from casfs.containerd.mounter import Mounter

    opts = {"read_ahead_kb": args.read_ahead_kb} if args.read_ahead_kb else {}
    mounter = Mounter()  # forked now, while this process has one thread (see casfs.containerd.mounter)
    try:
        # after the fork: the mounter and the mount daemons it forks (which outlive us) must
        # not inherit the lock; before anything is mounted: a second snapshotter stops here
        root_lock = _lock_root(args.root)
        claim_socket(os.path.abspath(args.socket))
    except BaseException:
        mounter.close()
        raise
    sn = Snapshotter(args.root, store=args.image_store, cache_dir=args.image_cache_dir, mount_options=opts,
                     mounter=mounter)
    try:
        n = sn.remount_all()
        if n:
            logging.getLogger("casfs.snapshotter").info("remounted %d casfs image(s)", n)
        serve(sn, args.socket, ready=lambda: print(f"casfs snapshotter: serving on {args.socket}", flush=True))
    finally:
        sn.close()
        mounter.close()
        root_lock.close()
    return 0


def _lock_root(root: str):
    """An exclusive lock on ``root`` (its metadata database and mounts belong to one
    snapshotter at a time); returns the open lock file.

    Raises:
        ValueError: when another process holds it.
    """
    import fcntl

    f = open(os.path.join(root, ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"--root {root} is in use by another casfs snapshotter; stop it first or "
                         "choose another --root") from None
    return f
