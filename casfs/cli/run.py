"""``casfs run``: a command in a container whose root filesystem is a lazy mount of an image."""

from __future__ import annotations

import argparse
import json

from .format import format_mount_stats
from .main import open_store_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a command in a container rooted on a lazy mount of an image",
        description="Mount image NAME lazily, put a tmpfs overlay on top (the image stays read-only; "
                    "writes vanish afterwards), and run CMD in an OCI container (runc) with its own "
                    "/proc, /dev and /tmp. The exit code of CMD is passed through. Needs root.",
        epilog="example: casfs run debian -- sh -c 'cat /etc/os-release'")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (after --)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    p.add_argument("-w", "--workdir", default="/", help="working directory in the container")
    p.add_argument("--net-host", action="store_true", help="share the host network (default: private, lo only)")
    p.add_argument("--runtime", default="runc", help="OCI runtime: runc (default) or crun")
    p.add_argument("--read-ahead-kb", type=int, default=None, help="kernel readahead for the mount")
    p.add_argument("--tmpfs-size", default="1G", metavar="SIZE",
                   help="size of the writable layer (a tmpfs holding the container's writes): "
                        "512M, 1G, 50%% of memory... (default 1G)")
    p.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="after passing SIGINT/SIGTERM/SIGHUP to the container, kill it this many "
                        "seconds later if it has not exited (default 10)")
    p.add_argument("--stats", action="store_true",
                   help="print the mount's counters at exit (reads, bytes, fetches by tier, hit rates) "
                        "to stderr")
    p.add_argument("--stats-json", default=None, metavar="PATH",
                   help="at exit, write the mount's statistics to PATH as JSON (FUSE requests and bytes "
                        "read, bytes each tier served: what the start touched and fetched)")
    p.add_argument("--record-profile", type=float, default=None, metavar="SECONDS",
                   help="record a startup profile of what CMD reads (saved when CMD ends or after "
                        "SECONDS); later runs of the image prefetch it")
    p.add_argument("--no-profile", action="store_true", help="do not replay the image's startup profile")
    p.set_defaults(func=cmd_run, run_parser=p)


def _options_after_name(args: argparse.Namespace) -> argparse.Namespace:
    """``casfs run NAME --tmpfs-size 2G -- CMD``: argparse hands everything after NAME to CMD,
    so the container ran "--tmpfs-size" as its command. Options between NAME and ``--`` are
    parsed as options; an option-like CMD without ``--`` is refused (no command starts with
    '-').

    Raises:
        ValueError: for options after NAME without ``--`` to end them.
    """
    cmd = args.cmd
    if not cmd or cmd[0] == "--" or not cmd[0].startswith("-"):
        return args
    if "--" not in cmd:
        raise ValueError(f"{cmd[0]!r} is not a command: put options before NAME, or end them with --: "
                         f"casfs run [OPTIONS] {args.name} -- CMD [ARGS...]")
    i = cmd.index("--")
    return args.run_parser.parse_args([*cmd[:i], args.name, *cmd[i:]], namespace=args)


def cmd_run(args: argparse.Namespace) -> int:
    import sys

    from casfs.run import Interrupted, RunOptions, check_size, run_container

    args = _options_after_name(args)
    check_size(args.tmpfs_size)  # ValueError: one line, before anything is mounted
    if args.stop_timeout < 0:
        raise ValueError("--stop-timeout must be at least 0")

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"bad --env {kv!r}: use KEY=VALUE")
        env[k] = v
    mopts: dict = {"read_ahead_kb": args.read_ahead_kb} if args.read_ahead_kb else {}
    if args.record_profile:
        mopts["record_profile"] = args.record_profile
    if args.no_profile or args.record_profile:
        mopts["replay_profile"] = False
    image = open_store_from_args(args).open_image(args.name)
    opts = RunOptions(env=env, cwd=args.workdir, host_network=args.net_host, runtime=args.runtime,
                      mount_options=mopts, tmpfs_size=args.tmpfs_size, stop_timeout=args.stop_timeout)
    def show(st: dict) -> None:
        if args.stats:
            print(format_mount_stats(st, f"of {args.name} (the container's root)"), file=sys.stderr)
        if args.stats_json:
            from casfs import atomic_write

            atomic_write(args.stats_json, json.dumps(st, indent=1))
    try:
        return run_container(image, cmd, opts, stats=show if args.stats or args.stats_json else None)
    except Interrupted as e:
        print(f"casfs: {e}", file=sys.stderr)
        return 128 + e.signum
