"""``casfs copy``, ``stats``, ``gc``: moving images between stores and keeping a store tidy."""

from __future__ import annotations

import argparse
from collections import Counter

from ..layout import CHUNKS, INDEXES, PACKS, PROFILES
from .format import format_mount_stats, human
from .main import check_store_exists, open_store_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("copy", help="copy an image and its missing chunks between stores",
                       description="Copy image NAME from store --from to store --to, transferring only "
                                   "the packs and chunks the destination lacks, in parallel, each "
                                   "verified against its digest. The tag is set last.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--from", dest="src", metavar="URL", default=None, help="source store (default: --store)")
    p.add_argument("--to", dest="dst", metavar="URL", required=True, help="destination store")
    p.add_argument("--tag", default=None, help="tag in the destination (default: NAME)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_copy)
    p = sub.add_parser("stats", help="store, image and mount statistics",
                       description="Count the store's objects and bytes by kind, and show per tagged "
                                   "image its logical bytes (file contents, hard links once), the "
                                   "bytes of its distinct chunks (after dedup), their stored bytes "
                                   "(after compression), and the dedup and compression ratios. With "
                                   "--mount DIR, show the counters of the running mount at DIR "
                                   "instead: bytes read, what each tier served, hit rates.")
    p.add_argument("--mount", metavar="DIR", default=None, help="a running casfs mount's counters")
    p.add_argument("--json", action="store_true", help="with --mount: the daemon's raw counters as JSON")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("gc", help="delete objects no tag references",
                       description="Mark everything reachable from any tag, then delete the rest. Never "
                                   "deletes a chunk a tagged image references, nor what a running build "
                                   "or copy uses (they hold leases in the store; one that crashed lapses "
                                   "after 5 minutes); keeps objects younger than --grace seconds. Also "
                                   "removes lapsed leases and a local store's stale temporary files.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="keep unreferenced objects younger than this (default 3600)")
    p.set_defaults(func=cmd_gc)


def cmd_copy(args: argparse.Namespace) -> int:
    import casfs
    from casfs.copy import copy_image

    if args.threads < 1:
        raise ValueError("--threads must be at least 1")
    check_store_exists(args.src or args.store, what="--from" if args.src else "--store")
    src = casfs.open_store(args.src or args.store, cache_dir="")
    vars(args).setdefault("_opened_stores", []).append(src)
    src.resolve(args.name)  # a typo'd name must not create the destination store first
    check_store_exists(args.dst, create=True)
    dst = casfs.open_store(args.dst, cache_dir="")
    vars(args).setdefault("_opened_stores", []).append(dst)
    r = copy_image(src, dst, args.name, tag=args.tag, threads=args.threads,
                   progress=False if args.no_progress else None)
    print(f"copied {args.name} ({r.image_id[:12]}) to {dst.url}: {r.objects_copied} of {r.objects_total} "
          f"objects, {human(r.bytes_copied)} in {r.seconds:.2f} s")
    return 0


def image_sizes(ix) -> tuple[int, int, int]:
    """(logical, unique, stored) bytes of an index: file contents with hard links once; raw
    bytes of its distinct chunks; their stored (framed, compressed) bytes."""
    import stat as statmod

    seen_ino: set[int] = set()
    logical = 0
    for i in range(ix.n_entries):
        if statmod.S_ISREG(ix.mode(i)):
            st = ix.stat(i)
            if st.nlink > 1:
                if st.ino in seen_ino:
                    continue
                seen_ino.add(st.ino)
            logical += st.size
    seen: set[bytes] = set()
    unique = stored = 0
    for ref in ix.all_chunks():
        if ref.digest not in seen:
            seen.add(ref.digest)
            unique += ref.raw_len
            stored += ref.stored_len
    return logical, unique, stored


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def cmd_stats(args: argparse.Namespace) -> int:
    if args.mount:
        return _mount_stats(args.mount, args.json)
    store = open_store_from_args(args)
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for key in store.iter_objects():
        kind = key.partition("/")[0]
        count[kind] += 1
        try:
            size[kind] += store.objects.size(key)
        except KeyError:
            pass
    print(f"store {store.url}")
    print(f"  tags: {len(store.tags())}")
    for kind in (INDEXES, PACKS, CHUNKS, PROFILES):
        print(f"  {kind:<9} {count[kind]:>8} objects {human(size[kind]):>12}")
    print(f"  total     {sum(count.values()):>8} objects {human(sum(size.values())):>12}")
    if store.ssd:
        print(f"  ssd cache {store.ssd.root}: {human(store.ssd.used)} of {human(store.ssd.capacity)}")
    rows = sorted(store.tags().items())
    if rows:
        print(f"\n{'TAG':<24} {'IMAGE ID':<13} {'LOGICAL':>10} {'UNIQUE':>10} {'STORED':>10} "
              f"{'DEDUP':>7} {'COMPRESS':>8}")
    all_logical = 0
    counted: set[str] = set()
    for tag, image_id in rows:
        try:
            logical, unique, stored = image_sizes(store.load_index(image_id))
        except Exception as e:  # noqa: BLE001 - one bad image must not hide the others
            print(f"{tag:<24} {image_id[:12]:<13} error: {e}")
            continue
        if image_id not in counted:
            counted.add(image_id)
            all_logical += logical
        print(f"{tag:<24} {image_id[:12]:<13} {human(logical):>10} {human(unique):>10} {human(stored):>10} "
              f"{_ratio(logical, unique):>7} {_ratio(unique, stored):>8}")
    if rows:
        data = size["packs"] + size["chunks"]
        print(f"{'all tagged images':<38} {human(all_logical):>10} {'':>10} {human(data):>10} "
              f"{_ratio(all_logical, data):>7}  (stored: the store's packs and chunks)")
        print("  (LOGICAL: file bytes, hard links once; UNIQUE: its distinct chunks; STORED: those "
              "as stored; DEDUP = LOGICAL/UNIQUE, COMPRESS = UNIQUE/STORED)")
    return 0


def _mount_stats(mountpoint: str, as_json: bool) -> int:
    """The running mount's counters (the daemon's control socket: ``stats``)."""
    import json

    from casfs.fuse.mount import control

    r = control(mountpoint, "stats")
    if as_json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    print(format_mount_stats(r, mountpoint))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from casfs.gc import collect

    store = open_store_from_args(args)
    r = collect(store, dry_run=args.dry_run, grace_seconds=args.grace)
    verb = "would delete" if args.dry_run else "deleted"
    if args.dry_run:
        for k in r.doomed:
            print(k)
    print(f"gc: kept {r.kept} objects, {verb} {r.deleted} ({human(r.bytes_deleted)}), "
          f"{r.young} unreferenced but younger than {args.grace:.0f} s")
    if r.writers:
        print(f"gc: {len(r.writers)} build(s)/copy(ies) running: kept {r.leased} more objects they may "
              f"use ({', '.join(r.writers[:3])})")
    if r.leases_removed or r.tmp_removed:
        print(f"gc: removed {r.leases_removed} lapsed lease(s) and {r.tmp_removed} stale temporary "
              f"file(s) ({human(r.tmp_bytes)})")
    return 0
