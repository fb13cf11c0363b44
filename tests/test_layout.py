"""casfs.layout: the one place a chunk, pack, index or tag becomes an object key, and a key a path."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casfs import layout
from casfs.index import ChunkRef

HEX = st.binary(min_size=32, max_size=32)


@given(HEX, HEX)
def test_a_packed_chunk_lives_in_its_pack_and_a_loose_one_in_its_own_object(digest, pack):
    assert layout.object_key(ChunkRef(digest, 10, 20)) == f"chunks/{digest.hex()}"
    assert layout.object_key(ChunkRef(digest, 10, 20, pack, 5)) == f"packs/{pack.hex()}"


@given(HEX)
def test_both_layouts_round_trip_through_the_url_parser(digest):
    for key in (layout.chunk_key(digest), layout.pack_key(digest), layout.index_key(digest.hex())):
        fan = layout.relpath(key)
        assert fan == f"{key.split('/')[0]}/{digest.hex()[:2]}/{digest.hex()}"
        assert layout.relpath(key, layout.FLAT) == key
        assert layout.parse_object_path("/" + fan) == key
        assert layout.parse_object_path("/" + key) == key


def test_paths_that_name_no_object_or_the_wrong_fanout_are_refused():
    h = "ab" * 32
    assert layout.parse_object_path(f"/tags/{h}") is None
    assert layout.parse_object_path(f"/chunks/{h[:60]}") is None
    assert layout.parse_object_path("/health") is None
    with pytest.raises(ValueError, match="fan-out"):
        layout.parse_object_path(f"/chunks/cd/{h}")


@pytest.mark.parametrize("bad", ["../x", "chunks/../x", "chunks/", "Chunks/ab", "chunks/a/b", "/chunks/ab", "chunks"])
def test_keys_that_could_escape_a_store_are_refused(bad):
    with pytest.raises(ValueError):
        layout.check_key(bad)
    with pytest.raises(ValueError):
        layout.relpath(bad)


def test_tags_profiles_and_kinds():
    assert layout.tag_key("latest") == "tags/latest"
    assert layout.profile_key("ab" * 32) == "profiles/" + "ab" * 32
    assert layout.split_key("tags/latest") == ("tags", "latest")
    assert layout.name_of("tags/latest") == "latest"
    assert layout.kind_prefix(layout.TAGS) == "tags/"
    assert layout.fanout_name("abcdef") == "ab/abcdef"
    assert layout.cache_chunks_dir("/var/cache/casfs") == "/var/cache/casfs/chunks"
    with pytest.raises(ValueError, match="layout"):
        layout.relpath("tags/x", "deep")
