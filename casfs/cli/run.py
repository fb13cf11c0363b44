"""``casfs run``: a command in a container whose root filesystem is a lazy mount of an image."""

from __future__ import annotations

import argparse

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
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from casfs.run import RunOptions, run_container

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"bad --env {kv!r}: use KEY=VALUE")
        env[k] = v
    mopts = {"read_ahead_kb": args.read_ahead_kb} if args.read_ahead_kb else {}
    image = open_store_from_args(args).open_image(args.name)
    opts = RunOptions(env=env, cwd=args.workdir, host_network=args.net_host, runtime=args.runtime,
                      mount_options=mopts)
    return run_container(image, cmd, opts)
