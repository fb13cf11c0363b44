"""snapshot.weights: safetensors streamed from casfs chunks, checked against safetensors itself.

Every test builds real safetensors files (``safetensors.torch.save_file``) into a real casfs
store and loads them back through the tiers; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

import casfs  # noqa: E402
from snapshot.weights import (InvalidSafetensors, LoadStats, ModuleMismatch, header_length,  # noqa: E402
                              load_into_module, load_safetensors, parse_header, read_header)

from conftest import write_tree  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch sees none)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def rand(shape, dtype, gen=None):
    """Random tensor of any dtype: random bytes reinterpreted (NaN patterns included)."""
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bytes(a, b) -> bool:
    """Bit-exact equality (NaN-safe): dtype, shape and every byte."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8),
                       b.detach().cpu().reshape(-1).view(torch.uint8))


def assert_same(loaded, ref):
    assert set(loaded) == set(ref)
    for k in ref:
        assert same_bytes(loaded[k], ref[k]), k


def build(store, files: dict[str, bytes], root, tag="m", chunk_size=4096):
    src = os.path.join(root, f"src-{tag}")
    write_tree(src, files)
    casfs.build(store, src, tag=tag, chunk_size=chunk_size)
    return store.open_image(tag)


def st_bytes(tensors, metadata=None) -> bytes:
    return st.save(tensors, metadata=metadata)


def sample_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {f"t{i}_{str(dt).split('.')[-1]}": rand((3 + i, 257 + 31 * i), dt, g) for i, dt in enumerate(DTYPES)}
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    out["big"] = rand((300, 1000), torch.float32, g)
    return out


# -- loading ---------------------------------------------------------------------------------


def test_a_file_loads_bit_exact_against_safetensors_load_file(store, tmp_path):
    tensors = sample_tensors()
    data = st_bytes(tensors, {"format": "pt"})
    image = build(store, {"model/model.safetensors": data}, tmp_path)
    (tmp_path / "plain.safetensors").write_bytes(data)
    ref = st.load_file(str(tmp_path / "plain.safetensors"))
    stats = LoadStats()
    got = load_safetensors(image, "model/model.safetensors", stats=stats)
    assert_same(got, ref)
    assert stats.tensors == len(ref) and stats.bytes == sum(t.nbytes for t in ref.values())
    assert stats.chunks == -(-len(data) // 4096)  # every chunk of the file was fetched once


def test_loaded_tensors_are_independent_writable_allocations(store, tmp_path):
    image = build(store, {"w.safetensors": st_bytes({"a": torch.ones(100), "b": torch.zeros(100)})}, tmp_path)
    got = load_safetensors(image, "w.safetensors")
    got["a"].add_(1)
    assert torch.equal(got["b"], torch.zeros(100)) and torch.equal(got["a"], torch.full((100,), 2.0))


def test_a_store_accepts_tag_slash_path(store, tmp_path):
    tensors = {"x": torch.arange(10.0)}
    build(store, {"dir/x.safetensors": st_bytes(tensors)}, tmp_path, tag="mine")
    assert_same(load_safetensors(store, "mine/dir/x.safetensors"), tensors)
    with pytest.raises(ValueError, match="tag-or-image-id"):
        load_safetensors(store, "mine")


def test_dtype_converts_floating_tensors_only(store, tmp_path):
    tensors = {"f": torch.randn(5, 5), "i": torch.arange(4, dtype=torch.int32)}
    image = build(store, {"w.safetensors": st_bytes(tensors)}, tmp_path)
    got = load_safetensors(image, "w.safetensors", dtype=torch.bfloat16)
    assert got["f"].dtype == torch.bfloat16 and torch.equal(got["f"], tensors["f"].bfloat16())
    assert got["i"].dtype == torch.int32 and torch.equal(got["i"], tensors["i"])


def test_a_sharded_set_loads_every_shard_through_its_index(store, tmp_path):
    a = {"layer0.w": torch.randn(64, 64), "layer0.b": torch.randn(64)}
    b = {"layer1.w": torch.randn(64, 64).half(), "lm_head": torch.randn(10, 64)}
    index = {"metadata": {"total_size": 0},
             "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in a},
                            **{k: "model-00002-of-00002.safetensors" for k in b}}}
    image = build(store, {"m/model-00001-of-00002.safetensors": st_bytes(a),
                          "m/model-00002-of-00002.safetensors": st_bytes(b),
                          "m/model.safetensors.index.json": json.dumps(index).encode()}, tmp_path)
    assert_same(load_safetensors(image, "m/model.safetensors.index.json"), {**a, **b})


def test_a_shard_index_naming_a_file_outside_the_image_is_rejected(store, tmp_path):
    index = {"weight_map": {"w": "../../etc/passwd"}}
    image = build(store, {"m/i.json": json.dumps(index).encode()}, tmp_path)
    with pytest.raises(InvalidSafetensors, match="unsafe shard"):
        load_safetensors(image, "m/i.json")


def test_a_shard_index_listing_a_tensor_its_shard_lacks_is_rejected(store, tmp_path):
    index = {"weight_map": {"w": "s.safetensors", "ghost": "s.safetensors"}}
    image = build(store, {"m/i.json": json.dumps(index).encode(),
                          "m/s.safetensors": st_bytes({"w": torch.ones(3)})}, tmp_path)
    with pytest.raises(InvalidSafetensors, match="ghost"):
        load_safetensors(image, "m/i.json")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=hs.lists(hs.tuples(hs.sampled_from(DTYPES),
                                hs.lists(hs.integers(0, 40), min_size=0, max_size=3)),
                      min_size=1, max_size=8),
       chunk_size=hs.sampled_from([4096, 8192, 65536]),
       seed=hs.integers(0, 2**31 - 1))
def test_any_dtypes_and_shapes_load_bit_exact(specs, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"p{i}": rand(shape, dt, g) for i, (dt, shape) in enumerate(specs)}
    root = tempfile.mkdtemp(prefix="weights-hyp-")
    try:
        with casfs.open_store(os.path.join(root, "store")) as s:
            image = build(s, {"w.safetensors": st_bytes(tensors)}, root, chunk_size=chunk_size)
            got = load_safetensors(image, "w.safetensors", concurrency=3)
            assert_same(got, tensors)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- load into a module -----------------------------------------------------------------------


def make_module():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 8))
    m.register_buffer("steps", torch.tensor(7))
    return m


def test_load_into_module_writes_parameters_in_place(store, tmp_path):
    src = make_module()
    image = build(store, {"m.safetensors": st_bytes({k: v.contiguous() for k, v in src.state_dict().items()})}, tmp_path)
    dst = make_module()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    missing, unexpected = load_into_module(dst, image, "m.safetensors")
    assert (missing, unexpected) == ([], [])
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs  # no new storage
    assert_same(dst.state_dict(), src.state_dict())


def test_load_into_module_converts_when_the_module_dtype_differs(store, tmp_path):
    src = make_module()
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in src.state_dict().items()}
    image = build(store, {"m.safetensors": st_bytes(sd)}, tmp_path)
    dst = make_module()
    load_into_module(dst, image, "m.safetensors")
    for k, v in dst.state_dict().items():
        assert v.dtype == src.state_dict()[k].dtype
        assert torch.equal(v, sd[k].to(v.dtype)), k


def test_load_into_module_refuses_missing_names_and_wrong_shapes_before_writing(store, tmp_path):
    sd = {k: v.contiguous() for k, v in make_module().state_dict().items()}
    partial = dict(sd)
    del partial["2.bias"]
    image = build(store, {"p.safetensors": st_bytes(partial),
                          "bad.safetensors": st_bytes({**sd, "0.weight": torch.zeros(3, 3)})}, tmp_path)
    dst = make_module()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ModuleMismatch, match="2.bias"):
        load_into_module(dst, image, "p.safetensors")
    with pytest.raises(ModuleMismatch, match="0.weight"):
        load_into_module(dst, image, "bad.safetensors", strict=False)
    assert_same(dst.state_dict(), before)
    missing, unexpected = load_into_module(dst, image, "p.safetensors", strict=False)
    assert missing == ["2.bias"] and unexpected == []


# -- hostile and damaged input ----------------------------------------------------------------


def raw_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("blob,match", [
    (b"\x01\x02", "too short"),
    (raw_file(GOOD, b"\0" * 16, length=10**9), "outside"),
    (raw_file(GOOD, b"\0" * 16, length=10**6), "past the end"),
    (raw_file(b"{not json", b""), "not valid JSON"),
    (raw_file(b"[1, 2]", b""), "JSON object"),
    (raw_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "duplicate"),
    (raw_file({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (raw_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (raw_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
    (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8 bytes"),
    (raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside"),
    (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    (raw_file({"a": {"dtype": "F32", "shape": [10**30, 10**30], "data_offsets": [0, 4]}}, b"\0" * 4), "needs"),
    (raw_file({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    (raw_file(b'{"a": NaN}', b""), "not valid JSON"),
])
def test_a_hostile_or_truncated_header_is_rejected_with_a_reason(blob, match):
    with pytest.raises(InvalidSafetensors, match=match):
        n = header_length(blob[:8], len(blob))
        parse_header(blob[8:8 + n], len(blob))


@settings(max_examples=200, deadline=None)
@given(hs.binary(max_size=300))
def test_random_bytes_never_parse_into_anything_but_invalid_safetensors(blob):
    try:
        n = header_length(blob[:8], len(blob))
        h = parse_header(blob[8:8 + n], len(blob))
    except InvalidSafetensors:
        return
    for t in h.tensors.values():  # whatever parses stays inside the data region
        assert 0 <= t.begin <= t.end <= h.data_len


def test_a_truncated_file_in_an_image_gives_a_clear_error(store, tmp_path):
    data = st_bytes({"w": torch.randn(1000)})
    image = build(store, {"cut.safetensors": data[:len(data) - 100], "tiny.safetensors": data[:5]}, tmp_path)
    with pytest.raises(InvalidSafetensors, match="outside the .*truncated"):
        load_safetensors(image, "cut.safetensors")
    with pytest.raises(InvalidSafetensors, match="too short"):
        read_header(image, "tiny.safetensors")


def test_a_corrupted_chunk_in_the_blob_store_is_an_error_not_data(tmp_path):
    root = tmp_path / "store"
    data = st_bytes({"w": torch.randn(20000)})
    with casfs.open_store(str(root)) as s:
        build(s, {"w.safetensors": data}, tmp_path, chunk_size=16384)
    n = 0
    for kind in ("chunks", "packs"):
        for dirpath, _, names in os.walk(root / kind):
            for name in names:
                p = os.path.join(dirpath, name)
                b = bytearray(open(p, "rb").read())
                b[-1] ^= 0xFF  # the last payload byte of the object
                open(p, "wb").write(bytes(b))
                n += 1
    assert n
    with casfs.open_store(str(root)) as s:
        with pytest.raises(casfs.ChunkUnavailable, match="corrupt"):
            load_safetensors(s.open_image("m"), "w.safetensors")


def test_a_path_that_is_not_a_file_is_reported(store, tmp_path):
    image = build(store, {"d/w.safetensors": st_bytes({"w": torch.ones(1)})}, tmp_path)
    with pytest.raises(casfs.NotAFile):
        load_safetensors(image, "d")
    with pytest.raises(casfs.PathNotFound):
        load_safetensors(image, "d/nope.safetensors")


# -- partial hits across images ---------------------------------------------------------------

MiB = 1 << 20


def blob_and_ssd(stats: LoadStats) -> tuple[int, int]:
    return stats.tiers["blob"]["hits"], stats.tiers["ssd"]["hits"]


def test_a_file_two_models_share_is_fetched_from_the_blob_tier_once(tmp_path):
    """Model B ships the same weights file as model A: after A was loaded on this host, B's
    load is served entirely by the ssd tier (a new Store on the same cache, as a new process
    would open it)."""
    g = torch.Generator().manual_seed(1)
    weights = st_bytes({f"w{i}": rand((256, 1024), torch.float32, g) for i in range(4)})
    root, cache = str(tmp_path / "store"), str(tmp_path / "cache")
    with casfs.open_store(root) as s:
        build(s, {"model.safetensors": weights, "config.json": b'{"a": 1}'}, tmp_path, tag="a", chunk_size=MiB)
        build(s, {"model.safetensors": weights, "config.json": b'{"b": 2}'}, tmp_path, tag="b", chunk_size=MiB)
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s1:
        first = LoadStats()
        load_safetensors(s1.open_image("a"), "model.safetensors", stats=first)
        s1.chunks.flush()
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s2:
        second = LoadStats()
        got = load_safetensors(s2.open_image("b"), "model.safetensors", stats=second)
    assert blob_and_ssd(first)[0] > 0
    assert blob_and_ssd(second) == (0, second.chunks)
    assert set(got) == {f"w{i}" for i in range(4)}


def test_a_fine_tuned_model_fetches_only_the_chunks_that_changed(tmp_path):
    """Same names and shapes (so the same header and chunk alignment), one tensor retrained:
    only the chunks holding that tensor's bytes come from the blob tier."""
    g = torch.Generator().manual_seed(2)
    base = {f"w{i}": rand((256, 1024), torch.float32, g) for i in range(4)}
    tuned = dict(base, w3=rand((256, 1024), torch.float32, g))
    a, b = st_bytes(base), st_bytes(tuned)
    assert len(a) == len(b)
    changed = {j for j in range(-(-len(a) // MiB)) if a[j * MiB:(j + 1) * MiB] != b[j * MiB:(j + 1) * MiB]}
    assert 0 < len(changed) < -(-len(a) // MiB)
    root, cache = str(tmp_path / "store"), str(tmp_path / "cache")
    with casfs.open_store(root) as s:
        build(s, {"model.safetensors": a}, tmp_path, tag="base", chunk_size=MiB)
        build(s, {"model.safetensors": b}, tmp_path, tag="tuned", chunk_size=MiB)
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s1:
        load_safetensors(s1.open_image("base"), "model.safetensors")
        s1.chunks.flush()
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s2:
        stats = LoadStats()
        got = load_safetensors(s2.open_image("tuned"), "model.safetensors", stats=stats)
    assert stats.tiers["blob"]["hits"] == len(changed)
    assert_same(got, tuned)


# -- GPU (skipped without one) ----------------------------------------------------------------


@needs_cuda
def test_a_cuda_load_is_bit_exact_against_load_file_on_cuda(store, tmp_path):
    tensors = sample_tensors(3)
    data = st_bytes(tensors)
    image = build(store, {"w.safetensors": data}, tmp_path, chunk_size=8192)
    (tmp_path / "w.safetensors").write_bytes(data)
    ref = st.load_file(str(tmp_path / "w.safetensors"), device="cuda:0")
    got = load_safetensors(image, "w.safetensors", device="cuda")
    assert all(t.is_cuda for t in got.values())
    assert_same(got, ref)


@needs_cuda
def test_load_into_a_cuda_module_keeps_its_addresses(store, tmp_path):
    src = make_module()
    image = build(store, {"m.safetensors": st_bytes({k: v.contiguous() for k, v in src.state_dict().items()})}, tmp_path)
    dst = make_module().cuda()
    with torch.no_grad():
        for p in dst.parameters():
            p.fill_(float("nan"))
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    load_into_module(dst, image, "m.safetensors", concurrency=4, streams=2)
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs
    assert_same(dst.state_dict(), src.state_dict())


def test_a_cpu_load_leaves_the_pinned_tier_alone(tmp_path):
    """The pinned tier feeds GPU copies only; here over plain memory (no CUDA needed)."""
    data = st_bytes(sample_tensors(5))
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        build(s, {"w.safetensors": data}, tmp_path, chunk_size=8192)
    tier = casfs.PinnedTier(8 * MiB, allocator=casfs.plain_memory)
    with casfs.Store(casfs.open_store(root).objects, memory_bytes=0, pinned=tier) as s:
        stats = LoadStats()
        got = load_safetensors(s.open_image("m"), "w.safetensors", stats=stats)
    assert len(tier) == 0 and stats.pinned_bytes == 0
    assert_same(got, st.load(data))


@needs_cuda
def test_a_second_cuda_load_copies_from_the_pinned_tier_alone(tmp_path):
    tensors = sample_tensors(6)
    data = st_bytes(tensors)
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        build(s, {"w.safetensors": data}, tmp_path, chunk_size=64 << 10)
    tier = casfs.PinnedTier(64 * MiB)
    ref = st.load(data)
    for n in range(2):
        with casfs.Store(casfs.open_store(root).objects, memory_bytes=0, pinned=tier) as s:
            stats = LoadStats()
            got = load_safetensors(s.open_image("m"), "w.safetensors", device="cuda", stats=stats)
            torch.cuda.synchronize()
            assert_same(got, ref)
            assert stats.pinned_bytes == stats.chunk_bytes > 0
            assert stats.tiers["blob"]["hits"] == (0 if n else stats.chunks)
            assert stats.tiers["pinned"]["hits"] == (stats.chunks if n else 0)


@needs_cuda
def test_a_pinned_tier_too_small_for_the_model_still_loads_it_bit_exact(tmp_path):
    data = st_bytes(sample_tensors(7))
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        build(s, {"w.safetensors": data}, tmp_path, chunk_size=64 << 10)
    tier = casfs.PinnedTier(128 << 10)  # room for two chunks while 8 workers read
    with casfs.Store(casfs.open_store(root).objects, memory_bytes=0, pinned=tier) as s:
        stats = LoadStats()
        got = load_safetensors(s.open_image("m"), "w.safetensors", device="cuda", concurrency=8, stats=stats)
        torch.cuda.synchronize()
    assert_same(got, st.load(data))
    assert 0 < stats.pinned_bytes < stats.chunk_bytes and tier.used <= tier.capacity
