"""Small text formatting shared by the CLI commands."""

from __future__ import annotations

import stat as statmod
import time

from ..sizes import format_size as human, parse_size  # noqa: F401 - the commands' short names


def mode_string(mode: int) -> str:
    return statmod.filemode(mode)


def mtime_string(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))



def format_mount_stats(r: dict, mountpoint: str) -> str:
    """A mount daemon's ``stats`` reply as text (``casfs stats --mount``, ``casfs run --stats``):
    what programs read through the mount, and what each tier served (hits, misses, hit rate,
    bytes, latency)."""
    m = r.get("mount", {})
    lines = [f"mount {mountpoint} (image {str(r.get('image', ''))[:12]}, daemon pid {r.get('pid')})",
             f"  reads: {m.get('reads', 0)} ({human(m.get('read_bytes', 0))} read by programs), "
             f"opens: {m.get('opens', 0)}, lookups: {m.get('lookups', 0)}, EIO: {m.get('eio', 0)}",
             f"  chunk fetches: {m.get('fetches', 0)}, served from memory at once: {m.get('inline_hits', 0)}, "
             f"prefetched: {m.get('prefetch_chunks', 0)}",
             f"  {'TIER':<14} {'HITS':>8} {'MISSES':>8} {'HIT RATE':>8} {'ERRORS':>7} {'READ':>10} "
             f"{'WRITTEN':>10} {'P50':>8} {'P99':>8}"]
    for t in r.get("tiers", []):
        asked = t["hits"] + t["misses"]
        rate = f"{100 * t['hits'] / asked:.1f}%" if asked else "-"
        lines.append(f"  {t['tier']:<14} {t['hits']:>8} {t['misses']:>8} {rate:>8} {t['errors']:>7} "
                     f"{human(t['bytes_read']):>10} {human(t['bytes_written']):>10} "
                     f"{_us(t['p50_us']):>8} {_us(t['p99_us']):>8}")
    rp = r.get("replay")
    if rp:
        lines.append(f"  profile replay: {rp}")
    return "\n".join(lines)


def _us(v: float) -> str:
    return "-" if not v else (f"{v / 1000:.1f} ms" if v >= 1000 else f"{v:.0f} us")
