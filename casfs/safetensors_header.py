"""safetensors hints for prefetch: where the tensor bytes of a ``*.safetensors`` file lie.

``safetensors_region`` reads it from the file's first bytes (8-byte little-endian header
length, then a JSON header), so the mount can stream the data region ahead of the reader.
"""

from __future__ import annotations

import json
import struct

__all__ = ["SAFETENSORS_MAX_HEADER", "safetensors_header_size", "safetensors_region"]

SAFETENSORS_MAX_HEADER = 100 << 20


def safetensors_header_size(first8: bytes | memoryview) -> int | None:
    """Bytes needed to parse a safetensors header (8 + its JSON length), or None if implausible."""
    if len(first8) < 8:
        return None
    (n,) = struct.unpack_from("<Q", first8, 0)
    if n < 2 or n > SAFETENSORS_MAX_HEADER:
        return None
    return 8 + n


def safetensors_region(head: bytes | memoryview, file_size: int) -> tuple[int, int] | None:
    """[start, end) of the tensor data of a safetensors file, from its first bytes.

    ``head`` must hold at least ``safetensors_header_size(head)`` bytes. Returns None for
    anything that is not a well-formed safetensors header (this parses untrusted bytes: a bad
    header only means no prefetch).
    """
    need = safetensors_header_size(head)
    if need is None or len(head) < need or need > file_size:
        return None
    try:
        header = json.loads(bytes(head[8:need]))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    end = 0
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) for x in offs)):
            return None
        end = max(end, offs[1])
    if end <= 0:
        return None
    return need, min(file_size, need + end)
