"""Byte counts as people write them: ``format_size(1536) == "1.5 KiB"``, ``parse_size("4M")``."""

from __future__ import annotations

__all__ = ["format_size", "parse_size"]


def format_size(n: float) -> str:
    """Bytes as a short human string (1024-based: B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """'4M', '512k', '1G', '4096' -> bytes. Raises ValueError with the accepted forms."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in "kmgt":
        mult = 1024 ** ("kmgt".index(t[-1]) + 1)
        t = t[:-1]
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix") from None
    if v < 0:
        raise ValueError(f"bad size {text!r}: must not be negative")
    return int(v * mult)
