"""What a snapshot's metadata may ask a restore to write on the host: /dev/shm segments
directly under /dev/shm and CRIU link_remap files, nothing else (the metadata comes from the
image, which must not choose where its bytes land). Unit tests of ``_prepare_host`` on real
files; no CRIU needed."""

from __future__ import annotations

import os

import pytest

from snapshot.criu import CriuError
from snapshot.restoring import _prepare_host


@pytest.fixture
def imgdir(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    (d / "shm-0").write_bytes(b"segment")
    return d


@pytest.mark.parametrize("kind,path,stored", [
    ("shm", "{tmp}/pwned", "shm-0"),
    ("shm", "/dev/shm/../..{tmp}/pwned", "shm-0"),
    ("shm", "/dev/shm/casfs-test-sub/x", "shm-0"),
    ("link_remap", "{tmp}/pwned", "shm-0"),
    ("link_remap", "{tmp}/x/../link_remap.1", "shm-0"),
    ("link_remap", "relative/link_remap.1", "shm-0"),
    ("shm", "/dev/shm/casfs-test-ok", "../outside"),
])
def test_a_restore_refuses_metadata_that_names_a_host_path_it_does_not_put_back(kind, path, stored, imgdir,
                                                                                tmp_path):
    (tmp_path / "outside").write_bytes(b"a host file")
    path = path.format(tmp=tmp_path)
    before = sorted(os.listdir(tmp_path))
    try:
        with pytest.raises(CriuError):
            _prepare_host({kind: [{"path": path, "stored": stored, "mode": 0o600}]}, str(imgdir))
        assert sorted(os.listdir(tmp_path)) == before
        assert not os.path.exists("/dev/shm/casfs-test-ok")
    finally:
        for junk in ("/dev/shm/casfs-test-ok", "/dev/shm/casfs-test-sub/x", "/dev/shm/casfs-test-sub"):
            if os.path.isdir(junk):
                os.rmdir(junk)
            elif os.path.lexists(junk):
                os.unlink(junk)


def test_a_shm_segment_is_put_back_without_writing_through_a_planted_symlink(imgdir, tmp_path):
    name = f"casfs-test-{os.getpid()}"
    path = f"/dev/shm/{name}"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    try:
        _prepare_host({"shm": [{"path": path, "stored": "shm-0", "mode": 0o640}]}, str(imgdir))
        assert open(path, "rb").read() == b"segment"
        assert os.stat(path).st_mode & 0o777 == 0o640
        os.unlink(path)
        # the temporary name a restore uses is taken by a symlink: no write through it
        planted = f"{path}.casfs-{os.getpid()}-" + str(__import__("threading").get_ident())
        os.symlink(victim, planted)
        try:
            with pytest.raises(FileExistsError):
                _prepare_host({"shm": [{"path": path, "stored": "shm-0"}]}, str(imgdir))
        finally:
            os.unlink(planted)
        assert victim.read_bytes() == b"precious"
    finally:
        if os.path.lexists(path):
            os.unlink(path)
