"""Fuzz target: ``casfs.export`` of fuzzed indexes into a sandbox; nothing may escape it.

Contract under test: for any index (parsed normally, or with the parser's name check switched
off so that the exporter's own defences are what is tested), ``casfs.export(image, BOX/out)``
either writes a tree under ``BOX/out`` or raises ``CasfsError`` / ``OSError`` leaving nothing
behind; in every case nothing outside ``BOX/out`` is created, changed or removed (the
sandbox ``BOX`` holds a canary file and a canary directory that hostile names and symlinks aim
at). Any other exception is a bug, and so is a file or directory anywhere in BOX other than
the canaries and ``out``.

Input (first byte's low bit): 0 = the index's name check stays on (the normal path), 1 = it
is switched off (``casfs.index.check_names`` replaced by a no-op: the second line of
defence). The rest drives a ``FuzzedDataProvider`` that takes a real index (``casfs.build`` of
a small tree whose chunks are in a real local store, so file contents can be written) apart
into names and columns and applies a few typed mutations: an entry renamed to a hostile name
(``..``, ``.``, empty, ``/``-separated, absolute into BOX, a sibling's name, random bytes),
an entry turned into a symlink aimed into BOX or at ``..``, parent/first/count/mode set to
boundary values, and two entries swapped. The names heap and ``name_end`` are rebuilt, so
length changes stay consistent and the parse gets through to the export.

Run: ``.venv/bin/python fuzz/fuzz_export.py fuzz/corpus-export -max_total_time=60``
(``scripts/fuzz.sh`` does this for every target, after writing the seeds).
"""

from __future__ import annotations

import array
import os
import shutil
import stat as statmod
import struct
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["casfs"]):  # before anything else imports casfs
    import casfs
    from casfs import export as exportmod  # noqa: F401
    from casfs import index as indexmod
    from casfs.errors import CasfsError
    from casfs.image import Image

import seeds  # noqa: E402

SECTIONS = indexmod._SECTIONS
HEADER = indexmod._HEADER
LENGTHS = indexmod._LENGTHS
COLS = [name for name, tc, _ in SECTIONS if tc is not None]
TYPECODE = {name: tc for name, tc, _ in SECTIONS}
REAL_CHECK = indexmod.check_names

TOP = tempfile.mkdtemp(prefix="casfs-fuzz-export-")
BOX = os.path.join(TOP, "box")
OUT = os.path.join(BOX, "out")
STORE, BASES = seeds.export_store(os.path.join(TOP, "store"))


def _make_box() -> None:
    os.makedirs(os.path.join(BOX, "canary-dir"), exist_ok=True)
    with open(os.path.join(BOX, "canary"), "wb") as f:
        f.write(b"canary\n")
    os.utime(os.path.join(BOX, "canary"), ns=(10**18, 10**18))
    os.utime(os.path.join(BOX, "canary-dir"), ns=(10**18, 10**18))


def _listing(root: str) -> dict:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, root)
            if rel == "box/out" or rel.startswith("box/out/") or rel == "store" or rel.startswith("store/"):
                continue  # (the store is read, never written, by an export)
            st = os.lstat(p)
            data = open(p, "rb").read() if statmod.S_ISREG(st.st_mode) else None
            # (box's own mtime changes as out comes and goes)
            out[rel] = (st.st_mode, None if rel == "box" else st.st_mtime_ns, data)
    return out


_make_box()
EXPECTED = _listing(TOP)


class Parts:
    """A serialized index as a header, per-entry names, columns and the other heaps."""

    def __init__(self, data: bytes) -> None:
        _, self.version, self.chunk_size, *self.counts = HEADER.unpack_from(data, 0)
        self.cols: dict[str, array.array] = {}
        self.heaps: dict[str, bytes] = {}
        off = HEADER.size + LENGTHS.size
        for (name, tc, _), ln in zip(SECTIONS, LENGTHS.unpack_from(data, HEADER.size)):
            if tc is not None:
                a = array.array(tc)
                a.frombytes(data[off:off + ln])
                self.cols[name] = a
            else:
                self.heaps[name] = data[off:off + ln]
            off += ln
        ends = self.cols["name_end"]
        names = self.heaps["names"]
        self.names = [names[(ends[i - 1] if i else 0):ends[i]] for i in range(len(ends))]

    def serialize(self) -> bytes:
        ends = array.array("I")
        heap = bytearray()
        for nm in self.names:
            heap += nm
            ends.append(len(heap))
        self.cols["name_end"] = ends
        self.heaps["names"] = bytes(heap)
        bodies = [self.cols[name].tobytes() if tc is not None else self.heaps[name]
                  for name, tc, _ in SECTIONS]
        return (HEADER.pack(indexmod.MAGIC, self.version, self.chunk_size, *self.counts)
                + LENGTHS.pack(*(len(b) for b in bodies)) + b"".join(bodies))


def _hostile_name(fdp: atheris.FuzzedDataProvider, p: Parts, i: int) -> bytes:
    n = len(p.names)
    choice = fdp.ConsumeIntInRange(0, 11)
    if choice == 0:
        return b".."
    if choice == 1:
        return b"."
    if choice == 2:
        return b""
    if choice == 3:
        return b"../" * fdp.ConsumeIntInRange(1, 4) + b"pwned"
    if choice == 4:
        return (BOX + "/pwned").encode()
    if choice == 5:
        return (BOX + "/canary").encode()
    if choice == 6:
        return p.names[fdp.ConsumeIntInRange(0, n - 1)]  # often a sibling's: a duplicate
    if choice == 7:
        return p.names[i - 1] if i > 1 else b"x"
    if choice == 8:
        return p.names[fdp.ConsumeIntInRange(0, n - 1)] + b"/" + b"pwned"
    if choice == 9:
        return b"canary-dir/pwned"
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))


def _mutate(fdp: atheris.FuzzedDataProvider) -> bytes:
    p = Parts(BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)])
    n = len(p.names)
    for _ in range(fdp.ConsumeIntInRange(1, 5)):
        op = fdp.ConsumeIntInRange(0, 7)
        i = fdp.ConsumeIntInRange(1, n - 1) if n > 1 else 0
        if op in (0, 1, 2):  # a hostile name
            p.names[i] = _hostile_name(fdp, p, i)
        elif op == 3:  # an entry turned into a symlink aimed out of the tree
            target = (BOX + "/canary-dir", BOX + "/canary", "..", "../..", "/", "canary-dir")[
                fdp.ConsumeIntInRange(0, 5)].encode()
            links = p.heaps["links"]
            p.cols["mode"][i] = statmod.S_IFLNK | 0o777
            p.cols["first"][i] = len(links)
            p.cols["size"][i] = len(target)
            p.cols["count"][i] = 0
            p.heaps["links"] = links + target
        elif op == 4:  # two entries swap names (breaks order, can duplicate within a dir)
            j = fdp.ConsumeIntInRange(1, n - 1) if n > 1 else 0
            p.names[i], p.names[j] = p.names[j], p.names[i]
        elif op == 5:  # a column element set to a boundary value
            col = ("parent", "first", "count", "mode", "nlink", "ino")[fdp.ConsumeIntInRange(0, 5)]
            vals = (0, 1, i, i - 1, i + 1, n - 1, n, statmod.S_IFDIR | 0o755, statmod.S_IFREG | 0o644,
                    statmod.S_IFLNK | 0o777, statmod.S_IFIFO | 0o644, 0xFFFFFFFF)
            p.cols[col][i] = vals[fdp.ConsumeIntInRange(0, len(vals) - 1)] & 0xFFFFFFFF
        elif op == 6:  # a name that differs from a sibling's only by its last byte
            nm = bytearray(p.names[i] or b"x")
            nm[-1] = fdp.ConsumeIntInRange(0, 255)
            p.names[i] = bytes(nm)
        else:  # the same inode for two entries (a hard link whose first name is hostile)
            j = fdp.ConsumeIntInRange(1, n - 1) if n > 1 else 0
            p.cols["ino"][i] = p.cols["ino"][j]
            p.cols["nlink"][i] = p.cols["nlink"][j] = 2
    return p.serialize()


def _clean_out() -> None:
    if os.path.lexists(OUT):
        if os.path.isdir(OUT) and not os.path.islink(OUT):
            shutil.rmtree(OUT)
        else:
            os.unlink(OUT)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    bypass = bool(data[0] & 1)
    fdp = atheris.FuzzedDataProvider(data[1:])
    body = _mutate(fdp)
    indexmod.check_names = (lambda *a: None) if bypass else REAL_CHECK
    try:
        try:
            ix = indexmod.Index.parse(body)
        except casfs.CorruptIndex:
            return
    finally:
        indexmod.check_names = REAL_CHECK
    image = Image(STORE, "f" * 64, ix, name="fuzzed")
    try:
        casfs.export(image, OUT, progress=False)
    except (CasfsError, OSError):
        if os.path.lexists(OUT):
            raise AssertionError("a failed export left its destination behind")
    finally:
        got = _listing(TOP)
        _clean_out()
    if got != EXPECTED:
        extra = sorted(set(got) ^ set(EXPECTED)) or sorted(k for k in got if got[k] != EXPECTED[k])
        raise AssertionError(f"export wrote outside its destination: {extra[:5]}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
