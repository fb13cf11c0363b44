"""casfs's public surface is exactly what casfs/__init__.py exports."""

import casfs

EXPECTED = {
    "BuildError", "BuildResult", "CasfsError", "ChunkRef", "ChunkUnavailable", "CorruptChunk",
    "CorruptIndex", "DEFAULT_CHUNK_SIZE", "CODE_CHUNK_SIZE", "WEIGHT_CHUNK_SIZE", "chunk_size_for",
    "PinnedChunk", "PinnedTier", "SharedChunks", "cuda_pinned", "plain_memory", "Image", "ImageNotFound", "NotAFile", "PathNotFound",
    "Stat", "Store", "StoreError", "atomic_directory", "atomic_open", "atomic_write", "build", "default_store_url", "fsync_dir", "mount", "open_source", "open_store",
    "unmount",
    # the face snapshot/ and serve/ use (issue 11)
    "ExportResult", "MountError", "MountInfo", "MountOptions", "TierStats", "export", "format_size", "home_dir",
    "is_mounted", "parse_listen", "runtime_dir", "tier_stats",
    "InvalidSafetensors", "SAFETENSORS_DTYPES", "SafetensorsHeader", "TensorInfo",
    "parse_safetensors_header", "parse_safetensors_index", "safetensors_header_length",
    "Counter", "Gauge", "Histogram", "METRICS_CONTENT_TYPE", "MetricRegistry",
    # issue 17: helpers die with their supervisor (casfs.lifeline)
    "Lifeline", "sweep_leftovers",
    # startup profiles, recorded and replayed by snapshot's restores from the store (issue 19)
    "Profile", "ProfileItem", "load_profile", "save_profile",
}


def test_the_exported_names_are_exactly_the_public_api():
    assert set(casfs.__all__) == EXPECTED
    for name in casfs.__all__:
        assert getattr(casfs, name) is not None


def test_every_exported_function_and_class_has_a_docstring():
    for name in casfs.__all__:
        obj = getattr(casfs, name)
        if callable(obj):
            assert obj.__doc__, name
