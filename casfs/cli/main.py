"""``casfs`` entry point: parses arguments, dispatches to a command module, maps errors to
one actionable line and a nonzero exit (tracebacks only with ``-v``).

casfs's own command groups are listed below; ``serve`` and ``snapshot`` (and any other
package's) come in through the ``casfs.commands`` entry-point group (``casfs.cli.plugins``),
so casfs imports nothing above it."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys

from .plugins import register_plugins

# Each module defines register(subparsers) adding its commands; each command sets func(args)->int.
COMMAND_MODULES = [
    "casfs.cli.images",
    "casfs.cli.build",
    "casfs.cli.files",
    "casfs.cli.transfer",
    "casfs.cli.mount",
    "casfs.cli.run",
    "casfs.cli.cacheserver",
]

DESCRIPTION = """\
casfs: lazy, content-addressed, tiered images for fast cold starts.

An image is a content-addressed index (the metadata tree) plus chunks (file contents cut at
fixed offsets, named by blake3, zstd-compressed). Chunks are read through tiers: memory ->
local SSD cache -> AZ cache servers -> blob store (a local directory by default, S3, or HTTP).
"""

EPILOG = """\
store selection: --store URL, else $CASFS_STORE, else the embedded local store
$CASFS_HOME/store (default ~/.local/share/casfs/store). URLs: /path or file:///path,
s3://bucket/prefix?endpoint=http://host:port, http(s)://host/path (read-only).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casfs", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", metavar="URL", default=None, help="blob store URL (default: $CASFS_STORE or the local store)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="ssd cache tier directory (default: $CASFS_HOME/cache for remote stores; none for local)")
    p.add_argument("--azcache", metavar="URLS", default=None,
                   help="AZ cache servers, comma-separated http://host:port/ (default: $CASFS_AZCACHE)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks on errors")
    p.add_argument("--version", action="version", version=f"casfs {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    register_plugins(sub, set(sub.choices))
    return p


def _version() -> str:
    from casfs import __version__

    return __version__


def open_store_from_args(args: argparse.Namespace):
    """The Store named by --store/--cache-dir (shared by every command)."""
    import casfs

    return casfs.open_store(args.store, cache_dir=args.cache_dir, azcache=getattr(args, "azcache", None))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="casfs: %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.open_store = functools.partial(open_store_from_args, args)  # for plugin commands
    from casfs.errors import CasfsError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("casfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CasfsError, OSError, ValueError) as e:
        if args.verbose:
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.strerror else \
            f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
        print(f"casfs: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
