"""``casfs copy``, ``stats``, ``gc``: moving images between stores and keeping a store tidy."""

from __future__ import annotations

import argparse
from collections import Counter

from ..layout import CHUNKS, INDEXES, PACKS, PROFILES
from .format import human
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
    p = sub.add_parser("stats", help="objects and bytes in the store, by kind",
                       description="Count the store's objects and bytes by kind, and its cache tier usage.")
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
    check_store_exists(args.dst, create=True)
    src = casfs.open_store(args.src or args.store, cache_dir="")
    dst = casfs.open_store(args.dst, cache_dir="")
    r = copy_image(src, dst, args.name, tag=args.tag, threads=args.threads,
                   progress=False if args.no_progress else None)
    print(f"copied {args.name} ({r.image_id[:12]}) to {dst.url}: {r.objects_copied} of {r.objects_total} "
          f"objects, {human(r.bytes_copied)} in {r.seconds:.2f} s")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
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
