"""Shared fixtures: a fresh local store per test, and generators of real directory trees."""

from __future__ import annotations

import os

import pytest

import casfs


@pytest.fixture
def store(tmp_path):
    """A fresh local-directory store (no ssd tier) under the test's tmp dir."""
    s = casfs.open_store(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture
def cached_store(tmp_path):
    """A local store with an ssd cache tier and a small memory tier."""
    s = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), memory_bytes=8 << 20)
    yield s
    s.close()


def write_tree(root, files: dict[str, bytes]) -> None:
    """Create ``files`` (relative path -> bytes) under ``root``."""
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
