"""/dev/shm segments of a snapshotted tree: CRIU records the mappings but not their contents.

``shm_segments`` finds the segments a tree maps (checkpoint saves them with the images),
``mapped_anywhere`` says whether some process on this host still maps one (restore replaces
only stale ones; serve removes those no process maps any more after a replica stops).
"""

from __future__ import annotations

import os

__all__ = ["mapped_anywhere", "shm_segments"]


def shm_segments(pids: list[int]) -> list[str]:
    """Non-deleted files under /dev/shm mapped by ``pids`` (CRIU does not store their contents)."""
    seen: list[str] = []
    for p in pids:
        try:
            with open(f"/proc/{p}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        path = parts[5].strip()
                        if path.startswith("/dev/shm/") and not path.endswith("(deleted)") \
                                and path not in seen:
                            seen.append(path)
        except OSError:
            continue
    return seen


def mapped_anywhere(path: str) -> bool:
    """Whether any process on this host maps or holds ``path`` open."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.rstrip().endswith(" " + path) for line in f):
                    return True
        except OSError:
            continue
    return False

