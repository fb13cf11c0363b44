"""``casfs`` entry point: parses arguments, dispatches to a command module, maps errors to
one actionable line and a nonzero exit (tracebacks only with ``-v``).

casfs's own command groups are listed below; ``serve`` and ``snapshot`` (and any other
package's) come in through the ``casfs.commands`` entry-point group (``casfs.cli.plugins``),
so casfs imports nothing above it."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading

from .plugins import register_plugins

# Each module defines register(subparsers) adding its commands; each command sets func(args)->int.
COMMAND_MODULES = [
    "casfs.cli.images",
    "casfs.cli.build",
    "casfs.cli.files",
    "casfs.cli.transfer",
    "casfs.cli.push",
    "casfs.cli.mount",
    "casfs.cli.run",
    "casfs.cli.cacheserver",
    "casfs.cli.snapshotter",
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
s3://bucket/prefix?endpoint=http://host:port, http(s)://host/path (read-only),
oci://host[:port]/repo (an OCI registry repository; casfs push publishes there).
A local --store path must exist, except for `casfs build` and `casfs copy --to`, which
create it (the default store is made on first use). The global options may come before or
after the command: `casfs --store X images` = `casfs images --store X`.
"""


def _global_options(p: argparse.ArgumentParser, default: object) -> None:
    """The options every command takes, before or after its name (``default``: their defaults
    on the top-level parser; ``argparse.SUPPRESS`` on a command's, so a value given before the
    command is not reset by the command's parser)."""
    p.add_argument("--store", metavar="URL", default=default,
                   help="blob store URL (default: $CASFS_STORE or the local store)")
    p.add_argument("--cache-dir", metavar="DIR", default=default,
                   help="ssd cache tier directory (default: $CASFS_HOME/cache for remote stores; none for local)")
    p.add_argument("--azcache", metavar="URLS", default=default,
                   help="AZ cache servers, comma-separated http://host:port/ (default: $CASFS_AZCACHE)")
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more logging; tracebacks on errors")


def _add_global_options_to_commands(sub: argparse._SubParsersAction) -> None:
    """``casfs images --store X`` as well as ``casfs --store X images``: every command's parser
    (and every nested command's) accepts the global options, unless it defines them itself."""
    for parser in set(sub.choices.values()):
        taken = {s for a in parser._actions for s in a.option_strings}
        if not taken & {"--store", "--cache-dir", "--azcache", "-v", "--verbose"}:
            _global_options(parser, argparse.SUPPRESS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_global_options_to_commands(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casfs", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(p, None)
    p.add_argument("--version", action="version", version=f"casfs {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    register_plugins(sub, set(sub.choices))
    _add_global_options_to_commands(sub)
    return p


def _version() -> str:
    from casfs import __version__

    return __version__


def check_store_exists(url: str | None, *, create: bool = False, what: str = "--store") -> None:
    """Refuse a local store path that does not exist, unless ``create`` (a build, a copy's
    destination) or it is the default store (``$CASFS_HOME/store``, made on first use): a typo
    in ``--store`` must not print an empty table and leave new directories behind.

    Raises:
        StoreError: naming the path and how to start a store there.
    """
    import casfs
    from casfs.errors import StoreError

    if url is None:
        url = os.environ.get("CASFS_STORE")
        what = "$CASFS_STORE"
    if not url or url == casfs.default_store_url() and not os.environ.get("CASFS_STORE"):
        return
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("", "file"):
        return
    path = os.path.abspath(os.path.expanduser(url[len("file://"):] if scheme else url))
    if os.path.isdir(path):
        return
    if create:
        print(f"casfs: creating a new store at {path}", file=sys.stderr)
        return
    raise StoreError(f"{what} {path} does not exist (to start a new store there, build into it or "
                     f"create the directory: mkdir -p {path})")


def check_dir_usable(path: str | None, what: str) -> None:
    """Create directory ``path`` (an option's cache or state directory) if needed, or refuse it
    in one line naming the option (an OSError alone named neither the option nor the cause).

    Raises:
        StoreError: when it is not a directory or cannot be created.
    """
    from casfs.errors import StoreError

    if not path:
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreError(f"{what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{what} {path}: cannot create it ({e.strerror})") from None


def open_store_from_args(args: argparse.Namespace, *, create: bool = False, **options):
    """The Store named by --store/--cache-dir (shared by every command). A local ``--store``
    path must exist unless ``create`` (``check_store_exists``). ``options`` go to
    ``casfs.open_store`` (e.g. ``memory_bytes``)."""
    import casfs

    check_store_exists(args.store, create=create)
    check_dir_usable(args.cache_dir, "--cache-dir")
    store = casfs.open_store(args.store, cache_dir=args.cache_dir, azcache=getattr(args, "azcache", None),
                             **options)
    # closed by main() (their background reads ended) before the command's verdict is printed
    vars(args).setdefault("_opened_stores", []).append(store)
    return store


def _close_opened(args: argparse.Namespace) -> None:
    opened = vars(args).get("_opened_stores") or []
    while opened:
        try:
            opened.pop().close()
        except Exception as e:  # noqa: BLE001 - closing must not replace the command's own outcome
            logging.getLogger("casfs").warning("closing the store failed: %s", e)


WARNINGS_SHOWN = 10


@contextlib.contextmanager
def summarised_warnings(shown: int | None = WARNINGS_SHOWN):
    """Show at most ``shown`` log warnings/errors while a command runs, then one line counting
    the rest, so a failing command's one ``casfs: error:`` line comes last and is not drowned
    (an export over a corrupt store logged 1,533 lines, the error at line 92). None: all."""
    if shown is None:
        yield
        return
    counter = {"n": 0}

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        counter["n"] += 1
        return counter["n"] <= shown

    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)
        if counter["n"] > shown:
            print(f"casfs: {counter['n'] - shown} more warnings not shown (-v shows them all)",
                  file=sys.stderr, flush=True)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP received by a command: handled as Ctrl-C is (whatever the command
    started is undone on the way out), the exit status 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_interrupt():
    """While a command runs, SIGTERM and SIGHUP (``kill``, ``timeout``, a closed terminal)
    raise ``Stopped`` like Ctrl-C raises KeyboardInterrupt, so leases, temporary files and
    mounts are released by the same ``finally`` blocks instead of left behind by a sudden
    death. Commands that run servers or containers install their own handlers on top. A
    signal the caller ignores (``nohup``) stays ignored. Main thread only (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _stop)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


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
        with stop_signals_interrupt(), summarised_warnings(shown=WARNINGS_SHOWN if not args.verbose else None):
            try:
                return int(args.func(args) or 0)
            finally:
                _close_opened(args)  # (background prefetches log their failures before the summary)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        by = f" by {signal.Signals(signum).name}" if signum != signal.SIGINT else ""
        print(f"casfs: interrupted{by}", file=sys.stderr)
        return 128 + signum
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
