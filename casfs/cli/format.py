"""Small text formatting shared by the CLI commands."""

from __future__ import annotations

import stat as statmod
import time

from ..sizes import format_size as human, parse_size  # noqa: F401 - the commands' short names


def mode_string(mode: int) -> str:
    return statmod.filemode(mode)


def mtime_string(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))


def format_mount_stats(st: dict) -> str:
    """A mount daemon's ``stats`` reply as a few lines: what the container read through the
    mount, and where the bytes came from (per tier: hits, misses, hit rate, bytes)."""
    m = st.get("mount", {})
    lines = [f"casfs mount stats ({str(st.get('image', ''))[:12]}): {m.get('reads', 0)} reads, "
             f"{human(m.get('read_bytes', 0))} read; {m.get('opens', 0)} opens, {m.get('lookups', 0)} lookups; "
             f"{m.get('fetches', 0)} chunk fetches, {m.get('prefetch_chunks', 0)} prefetched, "
             f"{m.get('eio', 0)} I/O errors"]
    for t in st.get("tiers") or []:
        looked = t.get("hits", 0) + t.get("misses", 0)
        rate = f"{100.0 * t.get('hits', 0) / looked:.0f}%" if looked else "-"
        lines.append(f"  {t.get('tier', '?'):<8} {t.get('hits', 0):>7} hits {t.get('misses', 0):>7} misses "
                     f"(hit rate {rate:>4}) {human(t.get('bytes_read', 0)):>10} read  "
                     f"{t.get('errors', 0)} errors")
    return "\n".join(lines)
