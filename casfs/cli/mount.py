"""``casfs mount``, ``umount``, ``profile show``, ``profile stop``: serving images through FUSE."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .format import human, parse_size
from .main import open_store_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount", help="mount an image read-only (lazy: chunks are fetched on first read)",
        description="Mount image NAME read-only at MOUNTPOINT. Blocks only on loading the index and "
                    "returns once the mount answers; a background daemon serves it (stop it with "
                    "`casfs umount MOUNTPOINT`, SIGTERM or SIGINT). Needs /dev/fuse (and root for "
                    "kernel tuning and --allow-other).")
    p.add_argument("name", metavar="NAME", help="tag or image id")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", "-f", action="store_true", help="serve from this process until unmounted")
    p.add_argument("--allow-other", action="store_true", help="let other users see the files")
    p.add_argument("--read-ahead-kb", type=int, metavar="N", default=None,
                   help="kernel readahead for the mount in KiB (default 4096)")
    p.add_argument("--max-background", type=int, metavar="N", default=None,
                   help="FUSE background requests in flight (default 64)")
    p.add_argument("--record-profile", type=float, nargs="?", const=30.0, default=None, metavar="SECONDS",
                   help="record a startup profile for SECONDS (default 30; without SECONDS put the flag "
                        "after MOUNTPOINT) or until `casfs profile stop MOUNTPOINT`")
    p.add_argument("--no-profile", action="store_true", help="do not replay the image's startup profile")
    p.add_argument("--no-readahead", action="store_true", help="no user-space readahead or safetensors prefetch")
    p.add_argument("--log-file", metavar="PATH", default=None, help="daemon log (default: in the runtime dir)")
    p.add_argument("--memory", metavar="SIZE", default=None,
                   help="the daemon's memory tier of decompressed chunks (default 512M; 0: none)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount a casfs mount and stop its daemon",
                       description="Unmount MOUNTPOINT and wait for its daemon to exit (a profile being "
                                   "recorded is saved first).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the daemon (default 20)")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("profile", help="startup profiles: show, stop recording",
                       description="Startup profiles record which chunks a boot reads first; later "
                                   "mounts prefetch them in that order.")
    psub = p.add_subparsers(dest="profile_command", metavar="COMMAND")
    q = psub.add_parser("show", help="print an image's startup profile",
                        description="Print the startup profile of image NAME: order, path, chunk, bytes.")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--limit", type=int, default=None, help="print at most this many rows")
    q.set_defaults(func=cmd_profile_show)
    q = psub.add_parser("stop", help="stop recording on a mount and save the profile",
                        description="Stop the startup-profile recording of the mount at MOUNTPOINT and "
                                    "store the profile now.")
    q.add_argument("mountpoint", metavar="MOUNTPOINT")
    q.set_defaults(func=cmd_profile_stop)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _options(args: argparse.Namespace):
    from casfs.fuse.mount import MountOptions

    return MountOptions(allow_other=args.allow_other, read_ahead_kb=args.read_ahead_kb,
                        max_background=args.max_background, record_profile=args.record_profile,
                        replay_profile=not args.no_profile, readahead=not args.no_readahead,
                        log_file=args.log_file, verbose=max(1, args.verbose))


def cmd_mount(args: argparse.Namespace) -> int:
    from casfs.fuse import daemon
    from casfs.fuse.mount import mount

    for value, flag in ((args.read_ahead_kb, "--read-ahead-kb"), (args.max_background, "--max-background")):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive number")
    if args.record_profile is not None and args.record_profile <= 0:
        raise ValueError("--record-profile SECONDS must be > 0")
    memory = {} if args.memory is None else {"memory_bytes": parse_size(args.memory)}
    t0 = time.perf_counter()
    image = open_store_from_args(args, **memory).open_image(args.name)
    opts = _options(args)
    if args.ready_fd is not None:  # re-executed as a daemon by casfs.fuse.mount.mount()
        return daemon.daemon_body(image, args.mountpoint, opts, args.ready_fd, opts.log_file or os.devnull)
    if args.foreground:
        def ready(info) -> None:
            print(f"casfs: mounted {image.name} ({image.id[:12]}) at {info.mountpoint} "
                  f"in {(time.perf_counter() - t0) * 1e3:.0f} ms; Ctrl-C unmounts", file=sys.stderr)

        daemon.serve(image, args.mountpoint, opts, on_ready=ready)
        return 0
    info = mount(image, args.mountpoint, opts)
    print(f"mounted {image.name} ({image.id[:12]}) at {info.mountpoint} "
          f"[pid {info.pid}, {(time.perf_counter() - t0) * 1e3:.0f} ms, log {info.log}]", file=sys.stderr)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from casfs.fuse.mount import unmount

    unmount(args.mountpoint, timeout=args.timeout)
    return 0


def cmd_profile_stop(args: argparse.Namespace) -> int:
    from casfs.fuse.mount import control

    reply = control(args.mountpoint, "profile-stop")
    print(f"saved {reply['key']} ({reply['chunks']} chunks)")
    return 0


def cmd_profile_show(args: argparse.Namespace) -> int:
    from casfs.errors import CasfsError
    from casfs.profiles import load_profile

    store = open_store_from_args(args)
    image = store.open_image(args.name)
    prof = load_profile(store, image.id)
    if prof is None:
        print(f"casfs: image {image.name} ({image.id[:12]}) has no startup profile "
              f"(record one with `casfs mount --record-profile`)", file=sys.stderr)
        return 1
    ix = image.index
    print(f"{'ORDER':>6} {'CHUNK':>6} {'BYTES':>10} {'STORED':>10} {'LOC':<6} PATH")
    files = set()
    for n, it in enumerate(prof.items):
        files.add(it.entry)
        if args.limit is not None and n >= args.limit:
            continue
        try:
            path = "/" + ix.path(it.entry)
        except CasfsError:
            path = f"<entry {it.entry} not in this image>"
        loc = "pack" if it.ref.pack is not None else "loose"
        print(f"{n:>6} {it.chunk:>6} {human(it.ref.raw_len):>10} {human(it.ref.stored_len):>10} {loc:<6} {path}")
    print(f"total: {len(prof.items)} chunks ({len(prof.refs())} distinct) from {len(files)} files, "
          f"{human(prof.raw_bytes)} raw, {human(prof.stored_bytes)} stored")
    return 0
