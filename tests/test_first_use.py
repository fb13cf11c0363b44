"""First use, as a new user meets casfs: ``cat`` through symlinks, mount points that are missing
or not empty, sizes that agree everywhere, store and mount statistics, and Prometheus counters
that exist before their first event. Real CLI subprocesses, a real FUSE mount, a real cache
server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

import casfs
from casfs.errors import PathNotFound
from casfs.sizes import format_size

from conftest import write_tree

CASFS = [sys.executable, "-m", "casfs.cli.main"]


def run(args, env, check=True, text=True):
    p = subprocess.run(CASFS + args, env=env, capture_output=True, text=text, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"casfs {args} failed ({p.returncode}): {p.stderr}")
    return p


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["CASFS_HOME"] = str(tmp_path / "home")
    e.pop("CASFS_STORE", None)
    return e


@pytest.fixture
def linked(tmp_path, env):
    """An image whose files are reached through relative, absolute, chained, directory and
    escaping symlinks, plus a loop."""
    src = tmp_path / "src"
    write_tree(src, {"etc/real.conf": b"real\n", "usr/lib/libx.so.1.2": b"ELF", "etc/other": b"other\n"})
    os.symlink("real.conf", src / "etc" / "rel")             # relative
    os.symlink("/etc/real.conf", src / "etc" / "abs")        # absolute: from the image's root
    os.symlink("rel", src / "etc" / "chain")                 # a link to a link
    os.symlink("libx.so.1.2", src / "usr" / "lib" / "libx.so.1")
    os.symlink("usr/lib", src / "lib")                       # a directory link, then a file link
    os.symlink("../../../../../etc/other", src / "etc" / "up")  # .. above the root stays at the root
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    os.symlink("/etc", src / "etcdir")
    run(["build", str(src), "--tag", "l"], env)
    return src


@pytest.mark.parametrize("path,want", [
    ("etc/rel", b"real\n"), ("etc/abs", b"real\n"), ("etc/chain", b"real\n"), ("lib/libx.so.1", b"ELF"),
    ("/etc/up", b"other\n"), ("etcdir/abs", b"real\n"), ("etcdir/../etc/real.conf", b"real\n"),
])
def test_cat_follows_symlinks_inside_the_image_as_cat_does(linked, env, path, want):
    assert run(["cat", "l", path], env, text=False).stdout == want


def test_cat_refuses_a_symlink_loop_with_one_line(linked, env):
    p = run(["cat", "l", "loop1"], env, check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("casfs: error: ")
    assert "too many levels of symbolic links" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_resolve_does_not_follow_the_last_link_when_asked(linked, env):
    with casfs.open_store(str(linked.parent / "home" / "store")) as s:
        image = s.open_image("l")
        i = image.resolve("lib/libx.so.1", follow_last=False)
        assert image.index.readlink(i) == b"libx.so.1.2"
        with pytest.raises(PathNotFound, match="is not a directory"):
            image.resolve("etc/rel/x")  # (real.conf is not a directory)
        with pytest.raises(PathNotFound, match="does not exist"):
            image.resolve("etc/nope")


def test_a_mount_point_that_is_missing_or_not_empty_is_refused_with_the_reason(linked, env, tmp_path):
    missing = tmp_path / "no-such-dir"
    p = run(["mount", "l", str(missing)], env, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"casfs: error: {missing}: mount point does not exist "
                                f"(create it: mkdir -p {missing})")
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious.txt").write_text("x")
    p = run(["mount", "l", str(full)], env, check=False)
    assert p.returncode == 1 and "mount point is not empty (it holds 'precious.txt'" in p.stderr
    assert "mounting would hide its files" in p.stderr
    (tmp_path / "afile").write_text("x")
    p = run(["mount", "l", str(tmp_path / "afile")], env, check=False)
    assert p.returncode == 1 and "mount point is not a directory" in p.stderr


def test_sizes_agree_between_the_build_summary_images_and_the_progress_bar(tmp_path, env):
    """Hard links count once; every size is 1024-based."""
    src = tmp_path / "src"
    write_tree(src, {"big": os.urandom(3 << 20), "small": os.urandom(1000)})
    for k in range(3):
        os.link(src / "big", src / f"big-link{k}")
    build = run(["build", str(src), "--tag", "h"], env).stdout
    want = format_size((3 << 20) + 1000)
    assert want == "3.0 MiB"
    assert f"{want} in" in build
    row = [line for line in run(["images"], env).stdout.splitlines() if line.startswith("h ")][0]
    assert f" {want} " in row
    with casfs.open_store(str(tmp_path / "home" / "store")) as s:
        image = s.open_image("h")
        assert image.logical_bytes() == (3 << 20) + 1000
    from casfs.progress import byte_bar

    bar, task = byte_bar("x", image.logical_bytes())
    try:
        bar.advance(task, 1 << 20)
        shown = " ".join(str(c.render(bar.tasks[0])) for c in bar.columns[2:])
    finally:
        bar.stop()
    assert "MiB" in shown and " MB" not in shown


def test_stats_shows_logical_and_stored_bytes_and_the_dedup_ratio_per_image(tmp_path, env):
    blob = os.urandom(200_000)
    write_tree(tmp_path / "src", {"a": blob, "b": blob, "c": blob, "text": b"hello " * 50_000})
    run(["build", str(tmp_path / "src"), "--tag", "dup"], env)
    out = run(["stats"], env).stdout
    row = [line for line in out.splitlines() if line.startswith("dup ")][0].split()
    # TAG ID LOGICAL(2) UNIQUE(2) STORED(2) DEDUP COMPRESS
    logical, unique, stored = (" ".join(row[k:k + 2]) for k in (2, 4, 6))
    assert logical == format_size(3 * 200_000 + 300_000)
    assert unique == format_size(200_000 + 300_000)
    assert row[8] == f"{900_000 / 500_000:.2f}x"
    assert float(row[9].rstrip("x")) > 1.5  # the text compresses
    assert "DEDUP = LOGICAL/UNIQUE" in out
    total = [line for line in out.splitlines() if line.startswith("all tagged images")][0]
    assert format_size(3 * 200_000 + 300_000) in total


@pytest.mark.fuse
def test_stats_of_a_running_mount_show_bytes_read_and_each_tiers_hit_rate(tmp_path, env):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("real FUSE mounts need /dev/fuse and root")
    pytest.importorskip("pyfuse3")
    data = os.urandom(300_000)
    write_tree(tmp_path / "src", {"f": data})
    run(["build", str(tmp_path / "src"), "--tag", "m"], env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "m", str(mnt)], env)
    try:
        assert (mnt / "f").read_bytes() == data
        out = run(["stats", "--mount", str(mnt)], env).stdout
        assert re.search(r"reads: \d+ \(29\d\.\d KiB read by programs\)", out), out
        tiers = {line.split()[0]: line.split() for line in out.splitlines()[4:] if line.startswith("  ")}
        assert "memory" in tiers and "blob" in tiers, out
        assert int(tiers["blob"][1]) >= 1 and tiers["blob"][3].endswith("%")
        js = run(["stats", "--mount", str(mnt), "--json"], env).stdout
        assert '"read_bytes": 300000' in js
    finally:
        run(["umount", str(mnt)], env)
    p = run(["stats", "--mount", str(mnt)], env, check=False)
    assert p.returncode == 1 and "no casfs mount" in p.stderr


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_the_cache_servers_counters_are_exported_from_zero_before_any_request(tmp_path):
    from casfs.cacheserver import CacheServer
    from casfs.objects.local import LocalObjectStore

    srv = CacheServer(LocalObjectStore(str(tmp_path / "s")), memory_bytes=1 << 20).start()
    try:
        got = _scrape(srv.url.rstrip("/") + "/metrics")
    finally:
        srv.close()
    for name in ("casfs_cache_misses_total", "casfs_cache_fill_errors_total", "casfs_cache_bytes_sent_total",
                 "casfs_cache_blob_bytes_total", 'casfs_cache_hits_total{tier="memory"}',
                 'casfs_cache_hits_total{tier="ssd"}', 'casfs_cache_verify_failures_total{source="blob"}',
                 "casfs_cache_request_seconds_count", 'casfs_cache_request_seconds_bucket{le="+Inf"}',
                 "casfs_cache_fill_seconds_count"):
        assert got.get(name) == 0, name


def test_serves_counters_are_exported_from_zero_before_any_request():
    from serve.metrics import ServeMetrics

    text = ServeMetrics().render()
    for line in ('casfs_serve_requests_total{endpoint="/v1/completions",status="200"} 0',
                 'casfs_serve_requests_total{endpoint="/v1/chat/completions",status="200"} 0',
                 'casfs_serve_client_disconnects_total{endpoint="/v1/completions"} 0',
                 'casfs_serve_request_seconds_count{endpoint="/v1/completions"} 0',
                 'casfs_serve_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"} 0',
                 "casfs_serve_prompt_tokens_total 0", "casfs_serve_generation_tokens_total 0"):
        assert line in text.splitlines(), line
    assert not any(line.startswith("casfs_serve_boot_seconds ") for line in text.splitlines())
    # (a gauge is exported once measured)
