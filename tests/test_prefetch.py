"""Prefetch: readahead windows (casfs.readahead), safetensors headers (casfs.safetensors_header),
startup profiles (casfs.profiles); no FUSE needed."""

from __future__ import annotations

import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import casfs
from casfs import chunk as chunkmod
from casfs.errors import CorruptChunk
from casfs.profiles import (Profile, ProfileItem, ProfileRecorder, ProfileReplayer, check_profile,
                            decode_profile, encode_profile, load_profile, profile_key, save_profile)
from casfs.readahead import Readahead
from casfs.safetensors_header import safetensors_header_size, safetensors_region

MiB = 1 << 20


def _read_all(ra: Readahead, size: int, step: int) -> list[int]:
    issued: list[int] = []
    for off in range(0, size, step):
        issued.extend(ra.on_read(off, min(step, size - off)))
    return issued


def test_a_sequential_reader_gets_a_window_that_grows_to_its_limit():
    ra = Readahead(4 * MiB, 1024 * MiB, max_ahead_bytes=64 * MiB)
    assert ra.max_window == 16
    assert list(ra.on_read(0, MiB)) == []  # one read says nothing yet
    windows = []
    for k in range(1, 40):
        ra.on_read(k * MiB, MiB)
        windows.append(ra.window)
    assert windows[:5] == [1, 2, 4, 8, 16] and set(windows[5:]) == {16}


def test_each_chunk_is_issued_once_and_the_window_stays_ahead_of_the_reader():
    size = 256 * MiB
    ra = Readahead(4 * MiB, size, max_ahead_bytes=64 * MiB)
    seen: list[int] = []
    for off in range(0, size, MiB):
        got = list(ra.on_read(off, MiB))
        seen.extend(got)
        if got:
            assert got[-1] <= (off + MiB - 1) // (4 * MiB) + 16  # never more than 16 chunks ahead
    assert len(seen) == len(set(seen))
    assert set(seen) == set(range(1, 64))  # everything after the first chunk, nothing past the end


def test_a_random_jump_collapses_the_window():
    ra = Readahead(MiB, 512 * MiB)
    for k in range(6):
        ra.on_read(k * MiB, MiB)
    assert ra.window > 1
    assert list(ra.on_read(300 * MiB, 4096)) == []
    assert ra.window == 0 and ra.resets == 1
    assert list(ra.on_read(300 * MiB + 4096, 4096)) == [301]  # sequential again from there


def test_random_reads_issue_nothing():
    rnd = random.Random(1)
    ra = Readahead(MiB, 4096 * MiB)
    issued = [c for _ in range(200) for c in ra.on_read(rnd.randrange(0, 4096) * MiB, 4096)]
    assert len(issued) < 10  # only accidental neighbours


def test_small_chunks_cap_the_window_in_chunks():
    ra = Readahead(64 << 10, 64 * MiB, max_ahead_bytes=64 * MiB, max_chunks=64)
    assert ra.max_window == 64


def test_a_hinted_region_streams_ahead_regardless_of_jumps():
    cs = MiB
    ra = Readahead(cs, 100 * MiB, max_ahead_bytes=8 * MiB)
    first = list(ra.hint_region(10 * MiB + 5, 60 * MiB))
    assert first == list(range(10, 18))  # the window's worth, from the region's start
    assert list(ra.on_read(40 * MiB, 4096)) == list(range(41, 49))  # a jump inside: keep streaming
    assert list(ra.on_read(58 * MiB, 4096)) == [59]  # never past the region's end
    assert list(ra.on_read(59 * MiB, MiB)) == []


@given(st.lists(st.tuples(st.integers(0, 300 * MiB), st.integers(1, 4 * MiB)), max_size=200),
       st.sampled_from([64 << 10, MiB, 4 * MiB]))
@settings(max_examples=150, deadline=None)
def test_issued_chunks_always_exist_in_the_file(reads, cs):
    size = 200 * MiB + 123
    ra = Readahead(cs, size)
    n = -(-size // cs)
    for off, ln in reads:
        for c in ra.on_read(off, ln):
            assert 0 <= c < n


def _safetensors(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def test_the_safetensors_data_region_comes_from_its_header():
    head = _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [8], "data_offsets": [16, 48]},
                         "__metadata__": {"format": "pt"}})
    start = len(head)
    assert safetensors_header_size(head[:8]) == start
    assert safetensors_region(head, start + 48) == (start, start + 48)
    assert safetensors_region(head, start + 20) == (start, start + 20)  # clipped to the file


@pytest.mark.parametrize("bad", [
    b"",
    b"\x01\x00\x00\x00\x00\x00\x00\x00{",  # too short a header
    struct.pack("<Q", 1 << 40) + b"{}",  # absurd length
    struct.pack("<Q", 5) + b"nope!",  # not JSON
    struct.pack("<Q", 2) + b"[]",  # not an object
    _safetensors({"a": {"data_offsets": "x"}}),
    _safetensors({"a": {"data_offsets": [0, 8]}})[:-1],  # truncated
    _safetensors({}),  # no tensors
])
def test_malformed_safetensors_headers_mean_no_prefetch(bad):
    assert safetensors_region(bad, 1 << 30) is None


def _build(tmp_path, files: dict[str, bytes], chunk_size: int = 64 << 10):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", chunk_size=chunk_size, progress=False)
    return store, store.open_image("t")


def test_a_profile_records_first_touches_in_order_and_round_trips(tmp_path):
    rnd = random.Random(2)
    store, image = _build(tmp_path, {"a.bin": rnd.randbytes(300_000), "b.py": b"x = 1\n"})
    a, b = image.lookup("a.bin"), image.lookup("b.py")
    rec = ProfileRecorder(image)
    rec.touch(b, 0, 0)
    rec.touch(a, 2, 3)
    rec.touch(a, 0, 2)  # chunks 0-2: chunk 2 is kept once, at its first touch
    rec.touch(b, 0, 0)
    prof = rec.stop()
    rec.touch(a, 4, 4)  # after stop: ignored
    assert [(it.entry, it.chunk) for it in prof.items] == [(b, 0), (a, 2), (a, 3), (a, 0), (a, 1)]
    key = save_profile(store, prof)
    assert key == profile_key(image.id) == f"profiles/{image.id}"
    back = load_profile(store, image.id)
    assert back == prof
    assert back.raw_bytes == image.chunk_refs(b)[0].raw_len + sum(r.raw_len for r in image.chunk_refs(a)[:4])
    assert check_profile(back, image) == back.items


def test_a_missing_profile_loads_as_none(store):
    assert load_profile(store, "ab" * 32) is None


def test_a_corrupt_stored_profile_is_rejected(tmp_path):
    store, image = _build(tmp_path, {"a.bin": b"a" * 1000})
    prof = Profile(image.id, image.chunk_size, [ProfileItem(0, 0, image.chunk_refs(1)[0])])
    data = bytearray(encode_profile(prof))
    data[-3] ^= 0xFF
    _, frame = chunkmod.encode(bytes(data))
    frame = bytearray(frame)
    frame[-1] ^= 0x01  # the frame no longer matches its digest
    store.objects.put(profile_key(image.id), bytes(frame))
    with pytest.raises(CorruptChunk):
        load_profile(store, image.id)


@pytest.mark.parametrize("cut", [0, 10, 52, 60])
def test_truncated_profile_bytes_are_rejected(cut):
    prof = Profile("cd" * 32, 4096, [ProfileItem(1, 0, casfs.ChunkRef(b"\x01" * 32, 10, 12))])
    with pytest.raises(CorruptChunk):
        decode_profile(encode_profile(prof)[:cut] if cut else b"junk")


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_decoding_arbitrary_bytes_never_crashes(data):
    try:
        decode_profile(data)
    except CorruptChunk:
        pass


def test_profile_items_that_no_longer_match_the_image_are_dropped(tmp_path):
    store, image = _build(tmp_path, {"a.bin": b"a" * 1000})
    good = ProfileItem(1, 0, image.chunk_refs(1)[0])
    stale = ProfileItem(1, 0, casfs.ChunkRef(b"\x02" * 32, 1000, 40))
    out_of_range = ProfileItem(99, 0, good.ref)
    prof = Profile(image.id, image.chunk_size, [stale, good, out_of_range])
    assert check_profile(prof, image) == [good]


def test_replaying_a_profile_fills_the_memory_tier_in_order(tmp_path):
    rnd = random.Random(4)
    store, image = _build(tmp_path, {"a.bin": rnd.randbytes(1_000_000), "b.bin": rnd.randbytes(200_000)})
    refs = image.chunk_refs(image.lookup("b.bin")) + image.chunk_refs(image.lookup("a.bin"))[:5]
    assert not any(store.memory.contains(r) for r in refs)
    rep = ProfileReplayer(store, refs, image.index.pack_members, concurrency=2).start()
    assert rep.wait(60)
    assert rep.as_dict() == {"total": len(refs), "fetched": len(refs), "already_cached": 0, "failed": 0,
                             "done": True}
    assert all(store.memory.contains(r) for r in refs)
    again = ProfileReplayer(store, refs, image.index.pack_members).start()
    assert again.wait(60) and again.cached == len(refs) and again.fetched == 0


def test_replay_counts_chunks_no_tier_has_as_failed(tmp_path):
    store, image = _build(tmp_path, {"a.bin": b"a" * 1000})
    ghost = casfs.ChunkRef(b"\x03" * 32, 1000, 40)
    rep = ProfileReplayer(store, [ghost]).start()
    assert rep.wait(60) and rep.failed == 1 and rep.fetched == 0


def test_replay_keeps_one_fetch_in_flight_while_foreground_reads_wait(tmp_path):
    rnd = random.Random(6)
    store, image = _build(tmp_path, {"a.bin": rnd.randbytes(2_000_000)})
    refs = image.chunk_refs(image.lookup("a.bin"))
    peak = []
    rep: ProfileReplayer

    def busy() -> bool:
        peak.append(rep._inflight)  # noqa: SLF001 - observing the gate it is asked about
        return True

    rep = ProfileReplayer(store, refs, image.index.pack_members, concurrency=8, foreground_busy=busy)
    rep.start()
    assert rep.wait(60) and rep.fetched == len(refs)
    assert max(peak) <= 1
