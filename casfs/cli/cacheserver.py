"""``casfs cache-server``: serve a blob store's chunks to the hosts of a zone (the AZ cache)."""

from __future__ import annotations

import argparse
import signal
import sys

from .format import human, parse_size

EPILOG = """\
Clients: open_store(..., azcache="http://HOST:PORT/") or CASFS_AZCACHE=http://h1:p/,http://h2:p/
(with CASFS_AZCACHE_TOKEN when the servers have a token). Paths served:
/chunks/<hh>/<hex>, /packs/<hh>/<hex> (with Range), /indexes/<hh>/<hex>, /health, /metrics.
Peer mode: point --cache-dir at this host's own casfs cache directory and loose chunks the
host already holds are served from it.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-server", help="serve chunks to other hosts: the AZ cache tier",
        description="Serve the immutable objects (chunks, packs, indexes) of store --store over HTTP "
                    "from this server's memory and ssd caches, filling them from the store on a miss "
                    "(one fetch per object however many clients ask) and verifying every object "
                    "against its digest before caching it. Runs until SIGTERM or Ctrl-C.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8470",
                   help="address to listen on (default 127.0.0.1:8470; port 0 picks one)")
    p.add_argument("--store", dest="server_store", metavar="URL", default=None,
                   help="the blob store to serve (default: the global --store / $CASFS_STORE)")
    p.add_argument("--cache-dir", dest="server_cache_dir", metavar="DIR", default=None,
                   help="ssd cache directory (default: memory only)")
    p.add_argument("--memory", metavar="SIZE", default="1G", help="memory cache size (default 1G)")
    p.add_argument("--cache-size", metavar="SIZE", default="50G", help="ssd cache size (default 50G)")
    p.add_argument("--token", metavar="T", default=None,
                   help="bearer token clients must send (default $CASFS_CACHE_TOKEN); "
                        "required unless listening on loopback")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync ssd cache files")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections (default 1024); when all are taken a new client gets the slot "
                        "of one idle between requests or still sending its request head")
    p.add_argument("--max-per-client", type=int, default=256, metavar="N",
                   help="open connections from one client address (default 256)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request head must arrive whole within this time of its first byte "
                        "(default 10; slow-sending clients get 408)")
    p.set_defaults(func=cmd_cache_server)


def cmd_cache_server(args: argparse.Namespace) -> int:
    from casfs.cacheserver import CacheServer, parse_listen
    from casfs.urls import default_store_url, open_objects

    host, port = parse_listen(args.listen)
    if args.max_connections < 1 or args.max_per_client < 1 or args.header_timeout <= 0:
        raise ValueError("--max-connections and --max-per-client must be at least 1, --header-timeout above 0")
    from .main import check_dir_usable, check_store_exists

    memory = parse_size(args.memory)
    cache_bytes = parse_size(args.cache_size)
    cache_dir = args.server_cache_dir or getattr(args, "cache_dir", None)
    # a typo'd local --store would be served (and created) empty: every request a miss
    check_store_exists(args.server_store or args.store)
    check_dir_usable(cache_dir, "--cache-dir")
    url = args.server_store or args.store or default_store_url()
    server = CacheServer(open_objects(url), host, port, memory_bytes=memory, cache_dir=cache_dir,
                         cache_bytes=cache_bytes, token=args.token, fsync=not args.no_fsync,
                         max_connections=args.max_connections, max_per_client=args.max_per_client,
                         header_timeout=args.header_timeout)

    def stop(signum, frame):  # noqa: ARG001
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    where = f"ssd {cache_dir} ({human(cache_bytes)})" if cache_dir else "no ssd"
    print(f"casfs cache-server: serving {url} on {server.url} (memory {human(memory)}, {where})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print("casfs cache-server: stopped", file=sys.stderr, flush=True)
    return 0
