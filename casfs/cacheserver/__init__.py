"""The casfs cache server: an HTTP server of a blob store's immutable objects (chunks, packs,
indexes) from its own memory and ssd tiers, filled from the blob store on a miss. Any number
of them form the AZ cache tier (``casfs.tiers.azcache``); one per host over that host's ssd
makes the hosts of a zone serve each other (peer mode, see ``objects``).

Modules: ``http`` (the HTTP/1.1 server), ``app`` (paths, ranges, auth, metrics endpoint),
``objects`` (the verified cache and its fill path), ``metrics`` (Prometheus text),
``server`` (``CacheServer``, tying them together).
"""

from ..listen import parse_listen
from .app import CacheApp, parse_range
from .objects import ObjectCache, verify_object
from .server import TOKEN_ENV, CacheServer, is_loopback

__all__ = ["CacheApp", "CacheServer", "ObjectCache", "TOKEN_ENV", "is_loopback", "parse_listen",
           "parse_range", "verify_object"]
