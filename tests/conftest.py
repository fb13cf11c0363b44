"""Shared fixtures: a fresh local store per test, generators of real directory trees, and the
real servers the contract suites run stores against (moto's S3 server, nginx), one per module."""

from __future__ import annotations

import os

import pytest

import casfs
from tests.support import MOTO_SERVER, NGINX, aws_test_environment, missing_binary, moto_server, nginx_static

S3_BUCKET = "casfs-contract"  # the bucket ``s3_endpoint`` creates


@pytest.fixture(scope="session")
def criu():
    """A usable CRIU (snapshot.find_criu()): fail loudly when missing, skip only without root
    or on a kernel that cannot run it."""
    import snapshot

    if os.geteuid() != 0:
        pytest.skip("CRIU needs root (CAP_SYS_ADMIN and friends)")
    try:
        return snapshot.find_criu()
    except snapshot.CriuUnavailable as e:
        if e.kernel_lacks_feature:
            pytest.skip(f"this kernel cannot run CRIU: {e}")
        pytest.fail(str(e))


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


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto_server's URL (its own process), with bucket ``S3_BUCKET`` and dummy credentials in
    the environment for the module; skips when boto3 or moto is absent."""
    pytest.importorskip("boto3", reason="S3 stores need boto3 (pip install 'casfs[s3]')")
    if missing_binary(MOTO_SERVER):
        pytest.skip(f"{missing_binary(MOTO_SERVER)} (pip install 'moto[server]')")
    from casfs.objects.s3 import S3ObjectStore

    with aws_test_environment(), moto_server() as url:
        S3ObjectStore(S3_BUCKET, endpoint_url=url).create_bucket()
        yield url


@pytest.fixture(scope="module")
def web_root(tmp_path_factory):
    """(directory, URL): Debian's nginx serving the directory read-only with a JSON autoindex;
    skips without nginx."""
    if missing_binary(NGINX):
        pytest.skip(f"{missing_binary(NGINX)} (apt-get install nginx-light)")
    root = tmp_path_factory.mktemp("web")
    with nginx_static(str(root)) as url:
        yield str(root), url
