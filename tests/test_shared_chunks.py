"""casfs.SharedChunks: one sealed shared-memory copy of verified chunks, mapped by several
processes and lent to their pinned tiers (issue 12). Real memfds, real child processes, real
stores on disk; the GPU registration is covered in tests/test_gpu_replica.py."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import random
import subprocess
import sys
import time

import pytest

import casfs
from casfs.tiers.pinned import MIN_CLASS

from conftest import write_tree

KiB, MiB = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(tmp_path, files: dict[str, bytes], chunk_size: int = 64 * KiB) -> str:
    src = tmp_path / "src"
    write_tree(src, files)
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        casfs.build(s, str(src), tag="m", chunk_size=chunk_size, progress=False, compress="never")
    return root


@pytest.fixture
def files():
    rnd = random.Random(7)
    a = rnd.randbytes(300 * KiB + 123)
    return {"a.bin": a, "b.bin": a[:128 * KiB] + rnd.randbytes(100 * KiB)}  # b shares a's first 2 chunks


def _tier() -> casfs.PinnedTier:
    return casfs.PinnedTier(MIN_CLASS, allocator=casfs.plain_memory)


def test_each_distinct_chunk_is_held_once_and_reads_back_from_a_second_mapping(tmp_path, files):
    root = _store(tmp_path, files)
    with casfs.open_store(root) as s:
        image = s.open_image("m")
        refs = [r for p in files for r in image.chunk_refs(image.lookup(p))]
        with casfs.SharedChunks.create(image, list(files)) as owner:
            assert len(owner.chunks) == len({r.digest for r in refs}) == len(refs) - 2
            assert owner.address == 0  # the owner does not keep it mapped
            spec = json.loads(json.dumps(owner.spec()))  # it travels as JSON
            with casfs.SharedChunks.attach(spec) as mine:
                tier = _tier()
                assert mine.lend_to(tier) == len(owner.chunks)
                for p, data in files.items():
                    for j, r in enumerate(image.chunk_refs(image.lookup(p))):
                        buf = bytearray(r.raw_len)
                        assert tier.read_into(r, memoryview(buf)) == r.raw_len
                        assert bytes(buf) == data[j * 64 * KiB:(j + 1) * 64 * KiB]
                assert tier.used == 0  # lent memory is not the tier's
                tier.free()
                assert len(tier) == 0


def test_the_file_is_sealed_nobody_can_write_resize_or_unseal_it(tmp_path, files):
    root = _store(tmp_path, files)
    with casfs.open_store(root) as s, casfs.SharedChunks.create(s.open_image("m"), ["a.bin"]) as owner:
        fd = os.open(owner.spec()["path"], os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fd, owner.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: not even a no-op change
        finally:
            os.close(fd)


def test_attach_refuses_a_file_without_the_seals_its_spec_claims(tmp_path, files):
    root = _store(tmp_path, files)
    with casfs.open_store(root) as s, casfs.SharedChunks.create(s.open_image("m"), ["a.bin"]) as owner:
        spec = owner.spec()
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, spec["size"])
        forged = {**spec, "path": f"/proc/{os.getpid()}/fd/{fd}"}
        with pytest.raises(casfs.CasfsError, match="not sealed"):
            casfs.SharedChunks.attach(forged)
    finally:
        os.close(fd)
    with pytest.raises(casfs.CasfsError, match="cannot open"):
        casfs.SharedChunks.attach({**spec, "path": str(tmp_path / "gone")})


def test_a_chunk_that_fails_verification_fails_the_fill_and_leaves_no_file(tmp_path, files):
    root = _store(tmp_path, files)
    for dirpath, _, names in os.walk(root):  # flip a byte in the middle of every stored object
        for n in names:
            p = os.path.join(dirpath, n)
            if ("packs" in p or "chunks" in p) and os.path.getsize(p) > 4 * KiB:
                with open(p, "r+b") as f:
                    f.seek(os.path.getsize(p) // 2)
                    b = f.read(1)
                    f.seek(-1, 1)
                    f.write(bytes([b[0] ^ 0xFF]))
    before = set(os.listdir(f"/proc/{os.getpid()}/fd"))
    with casfs.open_store(root) as s:
        with pytest.raises(casfs.CasfsError):
            casfs.SharedChunks.create(s.open_image("m"), ["a.bin"])
    leaked = [os.readlink(f"/proc/{os.getpid()}/fd/{fd}") for fd in set(os.listdir(f"/proc/{os.getpid()}/fd")) - before]
    assert not [x for x in leaked if "memfd:" in x], leaked


def test_a_cpu_load_copies_every_chunk_from_the_lent_copy(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    import snapshot

    src = tmp_path / "model"
    src.mkdir()
    want = {"w": torch.randn(300, 257), "b": torch.arange(1000, dtype=torch.int64)}
    save_file(want, str(src / "model.safetensors"))
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        casfs.build(s, str(src), tag="m", chunk_size=64 * KiB, progress=False)
        image = s.open_image("m")
        with casfs.SharedChunks.create(image, ["model.safetensors"]) as owner, \
                casfs.SharedChunks.attach(owner.spec()) as mine:
            tier = _tier()
            mine.lend_to(tier)
            stats = snapshot.LoadStats()
            got = snapshot.load_safetensors(image, "model.safetensors", pinned=tier, stats=stats)
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert stats.pinned_bytes == stats.chunk_bytes > 0  # nothing was read from the store
            tier.free()


_CHILD = """
import json, sys, time
import casfs
c = casfs.SharedChunks.attach(json.loads(sys.argv[1]))
c.populate()
print("ready", flush=True)
time.sleep(60)
"""


def test_n_processes_mapping_the_copy_each_count_one_nth_of_it_in_their_pss(tmp_path):
    rnd = random.Random(1)
    root = _store(tmp_path, {"w.bin": rnd.randbytes(24 * MiB)}, chunk_size=1 * MiB)
    from serve.shared_weights import host_memory

    with casfs.open_store(root) as s, casfs.SharedChunks.create(s.open_image("m"), ["w.bin"]) as owner:
        size = owner.size
        for n in (1, 2, 4):
            kids = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(owner.spec())], stdout=subprocess.PIPE,
                                     env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                         [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])))
                    for _ in range(n)]
            try:
                for k in kids:
                    assert k.stdout.readline().strip() == b"ready"
                time.sleep(0.1)
                mem = [host_memory(k.pid) for k in kids]
                for m in mem:
                    assert abs(m["pss_shmem"] - size / n) < 0.05 * size, (n, m, size)
                    assert m["rss"] >= size  # RSS counts the whole copy in every process
                assert abs(sum(m["pss_shmem"] for m in mem) - size) < 0.05 * size  # one copy in all
            finally:
                for k in kids:
                    k.kill()
                    k.wait()


def test_lent_chunks_are_never_evicted_nor_counted_against_the_tiers_capacity(tmp_path, files):
    from casfs.digest import digest_bytes

    root = _store(tmp_path, files)
    with casfs.open_store(root) as s:
        image = s.open_image("m")
        with casfs.SharedChunks.create(image, ["a.bin"]) as owner, casfs.SharedChunks.attach(owner.spec()) as mine:
            tier = casfs.PinnedTier(2 * MIN_CLASS, allocator=casfs.plain_memory)
            lent = image.chunk_refs(image.lookup("a.bin"))
            assert mine.lend_to(tier) == len(lent)
            rnd = random.Random(5)
            for _ in range(6):  # own chunks beyond the capacity: they evict each other, never a lent one
                data = rnd.randbytes(MIN_CLASS)
                ref = casfs.ChunkRef(digest_bytes(data), len(data), len(data))
                c = tier.fill(ref, lambda v, d=data: (v.__setitem__(slice(0, len(d)), d), len(d))[1])
                assert c is not None
                c.release()
            assert tier.evictions >= 4 and tier.used <= 2 * MIN_CLASS
            assert all(tier.contains(r) for r in lent)
            tier.free()
