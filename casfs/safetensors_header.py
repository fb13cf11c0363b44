"""safetensors headers: the one parser of them in this project (hostile input, bounded).

A safetensors file is an 8-byte little-endian header length, a JSON header, then the data
region; a sharded checkpoint adds a ``model.safetensors.index.json`` (``parse_shard_index``). ``parse_safetensors_header`` bounds the header length (``MAX_HEADER_BYTES``, the limit
safetensors itself enforces), rejects duplicate keys, unknown dtypes, non-integer or negative
shapes and offsets, sizes that disagree with dtype x shape, tensors outside the data region and
tensors that overlap. A header that lies can only produce ``InvalidSafetensors``.

Two readers use it: ``snapshot.weights`` (through the public names in ``casfs``) to place
tensor bytes, and the FUSE mount's prefetch (``safetensors_header_size``/``safetensors_region``)
to stream a file's data region ahead of the reader; for a hint, anything invalid only means
"no prefetch", and a file shorter than its header claims is prefetched up to its end.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["DTYPES", "MAX_DIMS", "MAX_HEADER_BYTES", "MAX_INDEX_JSON_BYTES", "InvalidSafetensors",
           "SafetensorsHeader", "TensorInfo", "header_length", "parse_header", "parse_shard_index",
           "safetensors_header_size", "safetensors_region"]

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_INDEX_JSON_BYTES = 64 << 20
MAX_DIMS = 64
_UNBOUNDED = 1 << 62  # a file size for checks against the header's own claims only

# safetensors dtype name -> (bytes per element, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "C64": (8, "complex64"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2": (1, "float8_e5m2"), "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
}



class InvalidSafetensors(ValueError):
    """A safetensors file (or a sharded set's index json) is malformed, truncated or hostile."""



@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors header. ``begin``/``end`` are offsets in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header. The data region is [data_start, file_size) of the file."""

    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        return self.file_size - self.data_start


def safetensors_header_size(first8: bytes | memoryview) -> int | None:
    """Bytes needed to parse a safetensors header (8 + its JSON length), or None if implausible
    (fewer than 8 bytes, or a length ``header_length`` refuses)."""
    try:
        return 8 + header_length(bytes(first8[:8]), _UNBOUNDED)
    except InvalidSafetensors:
        return None


def safetensors_region(head: bytes | memoryview, file_size: int) -> tuple[int, int] | None:
    """[start, end) of the tensor data of a safetensors file, from its first bytes, for prefetch.

    ``head`` must hold at least ``safetensors_header_size(head)`` bytes. Returns None for
    anything ``parse_header`` rejects or a header without tensor bytes; ``end`` is clipped to
    ``file_size`` (a truncated file is still streamed up to its end).
    """
    need = safetensors_header_size(head)
    if need is None or len(head) < need or need > file_size:
        return None
    try:  # offsets are checked against the header's own claim; the file may be shorter
        header = parse_header(bytes(head[8:need]), _UNBOUNDED)
    except InvalidSafetensors:
        return None
    end = max((t.end for t in header.tensors.values()), default=0)
    if end <= 0:
        return None
    return need, min(file_size, need + end)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:100]!r}")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass; it is not a valid size


def header_length(prefix: bytes, file_size: int, what: str = "file") -> int:
    """Validate the 8-byte length prefix of a ``file_size``-byte safetensors file.

    Raises:
        InvalidSafetensors: the file is too short, or the length is 0, over
            ``MAX_HEADER_BYTES`` or past the end of the file.
    """
    if file_size < 8 or len(prefix) < 8:
        raise InvalidSafetensors(f"{what}: {file_size} bytes is too short for a safetensors file "
                                 "(it needs an 8-byte header length); is the file truncated?")
    n = int.from_bytes(prefix[:8], "little")
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InvalidSafetensors(f"{what}: header length {n} is outside 1..{MAX_HEADER_BYTES}: "
                                 "not a safetensors file, or a corrupted one")
    if 8 + n > file_size:
        raise InvalidSafetensors(f"{what}: header length {n} runs past the end of the "
                                 f"{file_size}-byte file: the file is truncated")
    return n


def parse_header(raw: bytes, file_size: int, what: str = "file") -> SafetensorsHeader:
    """Parse and validate the JSON header ``raw`` of a ``file_size``-byte safetensors file.

    Every tensor must have a known dtype, a shape of non-negative integers, and data offsets
    ``[begin, end)`` inside the data region whose length is dtype size x number of elements;
    no two tensors may overlap. Gaps between tensors are allowed (nothing is read from them).

    Raises:
        InvalidSafetensors: with the offending tensor name and what is wrong with it.
    """
    n = len(raw)
    data_len = file_size - 8 - n
    if data_len < 0:
        raise InvalidSafetensors(f"{what}: header runs past the end of the file (truncated)")
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidSafetensors(f"{what}: header is not valid JSON ({e}); the file is corrupted "
                                 "or not safetensors") from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors(f"{what}: header must be a JSON object, got {type(doc).__name__}")
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, spec in doc.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise InvalidSafetensors(f"{what}: __metadata__ must map strings to strings")
            metadata = dict(spec)
            continue
        label = f"{what}: tensor {name[:200]!r}"
        if not isinstance(spec, dict):
            raise InvalidSafetensors(f"{label}: entry must be an object")
        extra = set(spec) - {"dtype", "shape", "data_offsets"}
        if extra:
            raise InvalidSafetensors(f"{label}: unknown fields {sorted(extra)[:5]}")
        dtype = spec.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InvalidSafetensors(f"{label}: unknown dtype {str(dtype)[:40]!r} "
                                     f"(known: {', '.join(sorted(DTYPES))})")
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS \
                or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidSafetensors(f"{label}: shape must be a list of at most {MAX_DIMS} "
                                     f"non-negative integers, got {str(shape)[:80]}")
        offs = spec.get("data_offsets")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise InvalidSafetensors(f"{label}: data_offsets must be [begin, end] integers")
        begin, end = offs
        if not (0 <= begin <= end <= data_len):
            raise InvalidSafetensors(f"{label}: data_offsets [{begin}, {end}] fall outside the "
                                     f"{data_len}-byte data region (truncated or corrupted file)")
        count = 0 if 0 in shape else 1
        for d in shape:
            if count > data_len:  # bounds the product before it can grow huge
                break
            count *= d
        want = count * DTYPES[dtype][0]
        if want != end - begin:
            raise InvalidSafetensors(f"{label}: {dtype}{shape} needs {want} bytes but its "
                                     f"data_offsets span {end - begin}")
        tensors.append(TensorInfo(name, dtype, tuple(shape), begin, end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    prev: TensorInfo | None = None
    for t in tensors:
        if t.nbytes == 0:
            continue
        if prev is not None and t.begin < prev.end:
            raise InvalidSafetensors(f"{what}: tensors {prev.name[:100]!r} and {t.name[:100]!r} "
                                     "overlap in the data region")
        prev = t
    return SafetensorsHeader(n, file_size, {t.name: t for t in tensors}, metadata)


def parse_shard_index(read: Callable[[], bytes], size: int, index_path: str,
                      what: str = "file") -> dict[str, list[str]]:
    """Shard path -> tensor names, from a sharded checkpoint's ``*.safetensors.index.json``.

    ``read()`` returns the file's ``size`` bytes; it is not called when ``size`` is over
    ``MAX_INDEX_JSON_BYTES``. Shard paths are resolved against ``index_path``'s directory and
    must stay inside the tree (no absolute paths, no ``..``).

    Raises:
        InvalidSafetensors: too large, not strict JSON, no ``weight_map``, or an unsafe path.
    """
    if size > MAX_INDEX_JSON_BYTES:
        raise InvalidSafetensors(f"{what}: {size} bytes is too large for a shard index")
    try:
        doc = json.loads(read().decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidSafetensors(f"{what}: not valid JSON ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InvalidSafetensors(f"{what}: needs a non-empty 'weight_map' object of tensor -> file")
    base = posixpath.dirname(index_path)
    shards: dict[str, list[str]] = {}
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname or fname.startswith("/") \
                or ".." in fname.split("/") or "\\" in fname:
            raise InvalidSafetensors(f"{what}: tensor {name[:100]!r} names an unsafe shard file "
                                     f"{str(fname)[:100]!r} (must be a relative path inside the image)")
        shards.setdefault(posixpath.normpath(posixpath.join(base, fname)), []).append(name)
    return shards
