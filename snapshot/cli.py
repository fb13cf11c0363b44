"""``casfs snapshot create|restore|ls|rm``: CPU snapshots (CRIU) stored as casfs images.

Thin over the ``snapshot`` package's public API. The group is a ``casfs.commands`` plugin
(pyproject.toml): casfs's command line loads it, and casfs itself never imports snapshot.
``snapshot`` is imported on use, so ``casfs --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import casfs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="CPU snapshots of processes (CRIU): create, restore, ls, rm",
                       description="Checkpoint a process with CRIU into the store, and restore it "
                                   "(needs root and CRIU >= 4.2: `make setup` builds one).")
    s = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    c = s.add_parser("create", help="run CMD until it calls snapshot.ready(), dump it, store it as TAG",
                     description="Start CMD in its own PID namespace (unshare -p -f setsid), wait "
                                 "until it calls snapshot.ready(), dump it with CRIU and store the "
                                 "images as a casfs image tagged TAG.")
    c.add_argument("--tag", "-t", required=True, help="tag of the snapshot image")
    c.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="append CMD's stdout and stderr to FILE (default: /dev/null)")
    c.add_argument("--leave-running", action="store_true",
                   help="keep CMD running after the dump, and wait for it")
    c.add_argument("--ready-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for snapshot.ready() (default 300)")
    c.add_argument("--deterministic", action="store_true",
                   help="start CMD without address-space randomisation and with PYTHONHASHSEED=0 "
                        "(snapshots of separate runs deduplicate in the store)")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to run")
    c.set_defaults(func=cmd_create)
    r = s.add_parser("restore", help="restore snapshot TAG and wait for it",
                     description="Restore snapshot TAG (refused on an incompatible host) and wait "
                                 "for it to exit, returning its exit status (--detach: print its "
                                 "PID and return at once).")
    r.add_argument("tag", metavar="TAG")
    r.add_argument("--lazy", action="store_true", help="lazy pages (userfaultfd): run before all pages arrive")
    r.add_argument("--source", choices=("auto", "store", "export", "mount"), default="export",
                   help="where CRIU's images come from: a per-host export (default), the store "
                        "itself (lazily, nothing unpacked: pages served as the process touches "
                        "them), a casfs FUSE mount (snapshots taken with CRIU's own layout), or "
                        "auto: the host's export when it has one, else the store where the kernel "
                        "has userfaultfd (casfs serve's default)")
    r.add_argument("--detach", "-d", action="store_true", help="print the PID and return at once")
    r.add_argument("--force", action="store_true", help="skip the host compatibility check")
    r.set_defaults(func=cmd_restore)
    ls = s.add_parser("ls", help="list the CPU snapshots in the store")
    ls.set_defaults(func=cmd_ls)
    rm = s.add_parser("rm", help="remove snapshot TAG (run gc to free its chunks)")
    rm.add_argument("tag", metavar="TAG")
    rm.set_defaults(func=cmd_rm)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fail(e: Exception) -> int:
    print(f"casfs: error: {e}", file=sys.stderr)
    return 1


def cmd_create(args: argparse.Namespace) -> int:
    import snapshot

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("give the command after --: casfs snapshot create -t TAG -- CMD ...")
    store = args.open_store()
    try:
        proc = snapshot.spawn(cmd, stdout=args.output, deterministic=args.deterministic)
        try:
            ref = snapshot.checkpoint(proc, store, args.tag, leave_running=args.leave_running,
                                      ready_timeout=args.ready_timeout)
        except BaseException:
            proc.kill()
            raise
    except (snapshot.CriuError, snapshot.IncompatibleHost) as e:
        return _fail(e)
    t = ref.timings
    print(f"snapshot {args.tag}: image {ref.image_id[:12]}, pages {casfs.format_size(ref.meta['pages_bytes'])}, "
          f"new {casfs.format_size(t['new_bytes'])} of {casfs.format_size(t['bytes'])}, dump {t['dump']:.2f} s, "
          f"store {t['store']:.2f} s")
    if args.leave_running:
        return proc.wait()
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import snapshot

    store = args.open_store()
    try:
        live = snapshot.restore(args.tag, store, lazy=True if args.lazy else None, source=args.source,
                                check=not args.force)
    except (snapshot.CriuError, snapshot.IncompatibleHost) as e:
        return _fail(e)
    t = live.timings
    where = {"export": "the host's export", "store": "the store", "mount": "a casfs mount"}[t["source"]]
    print(f"restored {args.tag} from {where}{' (lazy)' if t['lazy'] else ''}: pid {live.pid} running after {t['total']:.3f} s "
          f"(open {t['open']:.3f}, fetch {t['fetch']:.3f}, criu {t['criu']:.3f})", flush=True)
    if args.detach:
        return 0
    try:
        return live.wait()
    except KeyboardInterrupt:
        live.kill()
        raise


def cmd_ls(args: argparse.Namespace) -> int:
    import snapshot

    store = args.open_store()
    print(f"{'TAG':<28} {'IMAGE ID':<14} {'CREATED':<17} {'PAGES':>10} {'CRIU':<7} COMMAND")
    for tag, image_id, meta in snapshot.list_snapshots(store):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created", 0)))
        argv = list(meta.get("cmd") or [])
        cmd = " ".join([os.path.basename(argv[0]), *argv[1:]] if argv else [])
        cmd = cmd if len(cmd) <= 72 else cmd[:69] + "..."
        print(f"{tag:<28} {image_id[:12]:<14} {created:<17} {casfs.format_size(meta.get('pages_bytes', 0)):>10} "
              f"{(meta.get('criu') or {}).get('version', ''):<7} {cmd}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    import snapshot

    store = args.open_store()
    image = store.open_image(args.tag)
    snapshot.read_meta(image)  # ValueError when TAG is not a snapshot
    store.untag(args.tag)
    dropped = snapshot.drop_export(image.id)
    print(f"removed snapshot {args.tag}{' and its export on this host' if dropped else ''} "
          "(its chunks stay until `casfs gc`)")
    return 0
