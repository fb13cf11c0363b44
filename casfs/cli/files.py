"""``casfs ls``, ``stat``, ``cat``, ``export``: reading an image without mounting it."""

from __future__ import annotations

import argparse
import stat as statmod
import sys

from .format import human, mode_string, mtime_string
from .main import open_store_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list a directory of an image",
                       description="List PATH (default: the root) of image NAME, like `ls -l`.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("stat", help="show an entry's metadata", description="Show the metadata of PATH in image NAME.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_stat)
    p = sub.add_parser("cat", help="write a file of an image to stdout",
                       description="Write regular file PATH of image NAME to standard output, fetching "
                                   "only its chunks. Symlinks are followed inside the image, as cat "
                                   "does in a chroot: an absolute target starts at the image's root, "
                                   "and a loop is an error.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_cat)
    p = sub.add_parser("export", help="extract a whole image to a new directory",
                       description="Extract image NAME into the new directory DIR (the pull + extract "
                                   "baseline). Writes to a temporary sibling and renames it at the end, "
                                   "so a failure leaves nothing half-written.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DIR")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)


def _line(ix, i: int) -> str:
    st = ix.stat(i)
    name = ix.name(i).decode("utf-8", "surrogateescape") or "/"
    if st.is_symlink:
        name += " -> " + ix.readlink(i).decode("utf-8", "surrogateescape")
    return f"{mode_string(st.mode)} {st.nlink:>3} {st.uid:>5} {st.gid:>5} {st.size:>12} {mtime_string(st.mtime_ns)} {name}"


def cmd_ls(args: argparse.Namespace) -> int:
    image = open_store_from_args(args).open_image(args.name)
    ix = image.index
    i = ix.lookup(args.path)
    out = sys.stdout
    if statmod.S_ISDIR(ix.mode(i)):
        for c in ix.children(i):
            out.write(_line(ix, c) + "\n")
    else:
        out.write(_line(ix, i) + "\n")
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    image = open_store_from_args(args).open_image(args.name)
    ix = image.index
    i = ix.lookup(args.path)
    st = ix.stat(i)
    print(f"  path: /{ix.path(i)}")
    print(f"  mode: {mode_string(st.mode)} ({st.mode:o})  ino: {st.ino}  links: {st.nlink}")
    print(f"  owner: {st.uid}:{st.gid}  size: {st.size} ({human(st.size)})  mtime: {mtime_string(st.mtime_ns)}")
    if st.is_symlink:
        print(f"  target: {ix.readlink(i).decode('utf-8', 'surrogateescape')}")
    if st.is_file:
        refs = image.chunk_refs(i)
        packed = sum(1 for r in refs if r.pack)
        print(f"  chunks: {len(refs)} ({packed} in packs), chunk size {human(ix.file_chunk_size(i))}")
    for k, v in ix.xattrs(i).items():
        print(f"  xattr {k.decode(errors='replace')}: {v[:60]!r}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    image = open_store_from_args(args).open_image(args.name)
    ix = image.index
    i = image.resolve(args.path)  # symlinks followed inside the image, as cat does
    if not statmod.S_ISREG(ix.mode(i)):
        from casfs.errors import NotAFile

        raise NotAFile(f"{args.path}: not a regular file ({mode_string(ix.mode(i))[0]} entry); use `casfs ls`")
    size = ix.size(i)
    out = sys.stdout.buffer
    cs = ix.file_chunk_size(i)
    image.prefetch_entry(i)
    off = 0
    while off < size:
        out.write(image.read_entry(i, off, min(cs, size - off)))
        off += cs
    out.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from casfs.export import export

    image = open_store_from_args(args).open_image(args.name)
    r = export(image, args.dest, progress=False if args.no_progress else None)
    print(f"exported {args.name} to {args.dest}: {r.entries} entries, {r.files} files, "
          f"{human(r.bytes)} in {r.seconds:.2f} s")
    for w in r.warnings[:10]:
        print(f"  warning: {w}", file=sys.stderr)
    if len(r.warnings) > 10:
        print(f"  ... {len(r.warnings) - 10} more warnings", file=sys.stderr)
    return 0
