"""``casfs images``, ``tag``, ``rm``: what the store holds and what it is called."""

from __future__ import annotations

import argparse

from casfs.image import Image

from .format import human
from .main import open_store_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="list tagged images: tag, id, entries, size",
                       description="List every tag in the store with its image id, entry count, "
                                   "total file bytes and chunk count (loads each index).")
    p.add_argument("--all", action="store_true", help="also list untagged images")
    p.set_defaults(func=cmd_images)
    p = sub.add_parser("tag", help="point a tag at an image", description="Point tag NAME at IMAGE (a tag or id).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_tag)
    p = sub.add_parser("rm", help="remove a tag (run gc to free space)",
                       description="Remove tag NAME. Its chunks stay until `casfs gc` finds them unreferenced.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_rm)


def cmd_images(args: argparse.Namespace) -> int:
    store = open_store_from_args(args)
    tags = store.tags()
    rows = [(t, i) for t, i in sorted(tags.items())]
    if args.all:
        tagged = set(tags.values())
        rows += [("<none>", i) for i in store.image_ids() if i not in tagged]
    print(f"{'TAG':<28} {'IMAGE ID':<14} {'ENTRIES':>9} {'SIZE':>10} {'CHUNKS':>8}")
    for tag, image_id in rows:
        try:
            ix = store.load_index(image_id)
        except Exception as e:  # noqa: BLE001 - one bad image must not hide the others
            print(f"{tag:<28} {image_id[:12]:<14} error: {e}")
            continue
        size = Image(store, image_id, ix).logical_bytes()  # hard links once, as build counted
        print(f"{tag:<28} {image_id[:12]:<14} {ix.n_entries:>9} {human(size):>10} {ix.n_chunks:>8}")
    for tag, why in store.unreadable_tags():  # listed, never silently left out
        print(f"{tag:<28} {'?':<14} error: {why}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store_from_args(args)
    store.tag(args.name, store.resolve(args.image))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = open_store_from_args(args)
    store.untag(args.name)
    return 0
