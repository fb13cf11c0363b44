"""casfs.objects' scheme table: every URL form opens its store; new schemes register."""

import pytest

from casfs.errors import StoreError
from casfs.objects import known_schemes, open_objects, register_scheme
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore


def test_paths_and_file_urls_open_local_stores(tmp_path):
    assert isinstance(open_objects(str(tmp_path / "a")), LocalObjectStore)
    s = open_objects(f"file://{tmp_path}/b")
    assert isinstance(s, LocalObjectStore) and s.root == str(tmp_path / "b")
    with pytest.raises(StoreError, match="file:///abs/path"):
        open_objects("file://host/x")


def test_http_urls_open_read_only_stores_and_s3_urls_need_a_bucket():
    s = open_objects("https://example.com/casfs")
    assert isinstance(s, HttpObjectStore) and s.read_only and s.url == "https://example.com/casfs/"
    with pytest.raises(StoreError, match="needs a bucket"):
        open_objects("s3:///prefix")


def test_an_unknown_scheme_names_the_known_ones():
    with pytest.raises(StoreError, match=r"unknown store scheme 'gopher'.*s3://"):
        open_objects("gopher://x/y")


def test_a_registered_scheme_opens_through_its_opener_and_names_what_to_install(tmp_path):
    register_scheme("casfs-test-mem", lambda url, parts: LocalObjectStore(str(tmp_path / parts.netloc)))
    try:
        assert "casfs-test-mem" in known_schemes()
        s = open_objects("casfs-test-mem://here")
        assert s.root == str(tmp_path / "here")
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("casfs-test-mem", lambda url, parts: None)
        register_scheme("casfs-test-mem", "casfs_no_such_module:open", needs="install casfs-nothing",
                        replace=True)
        with pytest.raises(StoreError, match="install casfs-nothing"):
            open_objects("casfs-test-mem://here")
    finally:
        from casfs import objects

        objects._SCHEMES.pop("casfs-test-mem", None)
