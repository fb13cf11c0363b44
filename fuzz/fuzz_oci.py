"""Fuzz target: the parsers of what an OCI registry (or an image in it) sends casfs:
``casfs.objects.oci.parse_catalog`` (catalog and pointer manifests), ``parse_tag_index`` (a
casfs tag's image index) and ``casfs.oci.publish.parse_reference`` (the ``/.casfs-ref.json``
a reference layer carries into the snapshotter).

Contract under test: for any bytes, ``parse_catalog`` returns a mapping whose keys are valid
object keys (never a tag) and whose values are (``sha256:<64 hex>``, size >= 0), or raises
``StoreError``; ``parse_tag_index`` returns None, or (bytes, a list of sha256 digests), or
raises ``StoreError``; ``parse_reference`` returns (64 hex digits, a non-empty store URL of at
most 4096 characters) or raises ``ValueError``. Nothing else may escape (no RecursionError
from hostile nesting, no TypeError from odd JSON types).

Two input modes (first byte): raw bytes to all three parsers, or structured: a
``FuzzedDataProvider`` edits one of three valid documents (a catalog, a tag index, a reference)
as JSON values, so that most inputs stay JSON and reach the field checks.

Run: ``.venv/bin/python fuzz/fuzz_oci.py fuzz/corpus-oci -max_total_time=60``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["casfs"]):
    import casfs  # noqa: F401
    from casfs.errors import StoreError
    from casfs.layout import check_key
    from casfs.objects.oci import parse_catalog, parse_tag_index
    from casfs.oci.publish import parse_reference

import seeds  # noqa: E402

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
BASES = [json.loads(b[1:]) for b in seeds.sample_oci()]
VALUES = [None, True, 0, -1, 1 << 70, 1.5, "", "x" * 300, "sha256:" + "0" * 64, [], {}, [[[]]],
          "tags/x", "chunks/" + "a" * 64, "../x"]


def check(data: bytes) -> None:
    try:
        found = parse_catalog(data)
    except StoreError:
        pass
    else:
        for key, (digest, size) in found.items():
            assert check_key(key) == key and not key.startswith("tags/"), key
            assert DIGEST.match(digest) and isinstance(size, int) and size >= 0, (digest, size)
    try:
        tag = parse_tag_index(data)
    except StoreError:
        pass
    else:
        if tag is not None:
            body, catalogs = tag
            assert isinstance(body, bytes) and all(DIGEST.match(d) for d in catalogs)
    try:
        image, store = parse_reference(data)
    except ValueError:
        pass
    else:
        assert re.fullmatch(r"[0-9a-f]{64}", image) and 0 < len(store) <= 4096


def mutate(fdp: atheris.FuzzedDataProvider, doc):
    """Replace a few values somewhere inside ``doc`` (a JSON value)."""
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and fdp.ConsumeBool():
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            k = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
            path.append((node, k))
            node = node[k]
        if not path:
            continue
        parent, k = path[-1]
        choice = fdp.ConsumeIntInRange(0, len(VALUES))
        parent[k] = (fdp.ConsumeUnicodeNoSurrogates(40) if choice == len(VALUES)
                     else json.loads(json.dumps(VALUES[choice])))  # a fresh copy: no shared lists
    return doc


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        check(data[1:])
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    base = json.loads(json.dumps(BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)]))
    check(json.dumps(mutate(fdp, base)).encode())


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
