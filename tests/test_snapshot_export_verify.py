"""A host's unpacked snapshot (the per-host export CRIU restores from) is checked before every
restore (issue 17, defect 3: a byte flipped in pages-*.img was restored into the process).

Real CRIU, a real process whose memory holds a known pattern, a real casfs store: the byte is
flipped in the export's pages file exactly where the pattern lies, and the restored process
reports what its memory holds.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import pytest

import casfs
import snapshot
from snapshot import cpu
from snapshot import verify

MARKER = b"casfs-verify-marker:"
PROGRAM = r'''
import sys, snapshot
marker = %r
data = bytearray(marker * 200000)         # ~4 MB of a known pattern, in the snapshot's pages
restored = snapshot.ready()
print("count", restored, data.count(marker), flush=True)
sys.exit(3)
''' % MARKER


@pytest.fixture(scope="module")
def snap(tmp_path_factory, criu):
    root = tmp_path_factory.mktemp("verify")
    prog = root / "prog.py"
    prog.write_text(PROGRAM)
    store = casfs.open_store(str(root / "store"))
    out = root / "out.log"
    proc = cpu.spawn([sys.executable, str(prog)], stdout=str(out))
    ref = cpu.checkpoint(proc, store, "marker-app")
    proc.wait(10)
    yield {"root": root, "store": store, "out": out, "ref": ref}
    store.close()


def _restore(snap, cache, **env) -> str:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        live = cpu.restore("marker-app", snap["store"], cache_dir=str(cache))
        assert live.wait(60) == 3
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return snap["out"].read_text().splitlines()[-1]


def _flip_in_pattern(export: str, keep_mtime: bool = False) -> str:
    """Flip one byte of the pattern in the export's pages file; returns the file."""
    for path in sorted(glob.glob(os.path.join(export, "pages-*.img"))):
        with open(path, "r+b") as f:
            data = f.read()
            at = data.find(MARKER * 4)
            if at < 0:
                continue
            st = os.stat(path)
            f.seek(at + 5)
            f.write(bytes([data[at + 5] ^ 0x01]))
        if keep_mtime:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return path
    raise AssertionError("the pattern is in no pages file")


def test_a_flipped_byte_in_the_hosts_export_is_caught_and_the_snapshot_exported_again(snap, tmp_path, caplog):
    cache = tmp_path / "cache"
    expected = "count True 200000"
    assert _restore(snap, cache) == expected  # first restore: exported and stamped
    export = str(cache / snap["ref"].image_id)
    bad = _flip_in_pattern(export, keep_mtime=True)  # even with its mtime put back
    with caplog.at_level(logging.WARNING, logger="snapshot.exports"):
        assert _restore(snap, cache) == expected
    assert any(os.path.basename(bad) in r.getMessage() and "exporting it again" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    image = snap["store"].open_image("marker-app")
    assert verify.check(image, export, full=True) == []  # the new export is whole


def test_full_verification_catches_what_the_stamps_cannot_see(snap, tmp_path):
    """A change the stamps do not show (here: stamps rewritten after the flip, as a change below
    the filesystem would leave them) passes the default check; CASFS_SNAPSHOT_VERIFY=full hashes
    every file and catches it."""
    cache = tmp_path / "cache"
    assert _restore(snap, cache) == "count True 200000"
    export = str(cache / snap["ref"].image_id)
    _flip_in_pattern(export)
    image = snap["store"].open_image("marker-app")
    doc = json.load(open(verify.stamps_path(export)))
    for rel in doc["files"]:
        st = os.lstat(os.path.join(export, rel))
        doc["files"][rel] = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    with open(verify.stamps_path(export), "w") as f:
        json.dump(doc, f)
    assert verify.check(image, export, full=False) == []
    problems = verify.check(image, export, full=True)
    assert len(problems) == 1 and "pages-" in problems[0] and "differ" in problems[0]
    assert _restore(snap, cache, CASFS_SNAPSHOT_VERIFY="full") == "count True 200000"


def test_an_export_without_stamps_is_hashed_once_and_then_stamped(snap, tmp_path):
    cache = tmp_path / "cache"
    assert _restore(snap, cache) == "count True 200000"
    export = str(cache / snap["ref"].image_id)
    os.unlink(verify.stamps_path(export))  # an export from an older casfs
    _flip_in_pattern(export)
    os.unlink(verify.stamps_path(export)) if os.path.exists(verify.stamps_path(export)) else None
    assert _restore(snap, cache) == "count True 200000"
    assert os.path.exists(verify.stamps_path(export))
