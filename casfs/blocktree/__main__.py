"""``python -m casfs.blocktree``: build the BLAKE3 tree library now (setup does this) and say where."""

from __future__ import annotations

import sys

from . import BlockTreeUnavailable, _load, library_path


def main() -> int:
    try:
        _load()
    except BlockTreeUnavailable as e:
        print(f"casfs blocktree: {e}", file=sys.stderr)
        return 1
    print(f"casfs blocktree: {library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
