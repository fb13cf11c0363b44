"""snapshot.cpu end to end: real CRIU (>= 4.2, built by scripts/build_criu.sh), real processes,
a real casfs store. Nothing is mocked.

CRIU needs root. Without a usable CRIU these tests FAIL (the build is part of `make setup`);
they skip only when the kernel lacks what CRIU needs (``criu check`` fails) or, for lazy
restores, userfaultfd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import casfs
import snapshot
from snapshot import cpu, criu as criumod

TORCH_PROGRAM = r'''
import json, os, sys, time
import numpy as np
import torch
import snapshot

out_path, stop_path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
noise = torch.randn(4, 64)               # state drawn once, before the snapshot
counter = 41
hooks = []
snapshot.after_restore(lambda: hooks.append("ran"))

def nspid():
    for line in open("/proc/self/status"):
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]

def report(phase, restored):
    with torch.no_grad():
        out = model(noise).numpy()
    rec = {"phase": phase, "restored": restored, "counter": counter, "hooks": len(hooks),
           "out": out.tolist(), "np_sum": float(np.asarray(out, dtype=np.float64).sum()),
           "pid": nspid()}
    with open(out_path, "a") as f:
        f.write(json.dumps(rec) + "\n")

report("before", False)
restored = snapshot.ready()
counter += 1
report("after", restored)
while not os.path.exists(stop_path):
    time.sleep(0.02)
sys.exit(7)
'''

TINY_PROGRAM = r'''
import os, sys, snapshot
mode = sys.argv[1]
data = sys.argv[2] if len(sys.argv) > 2 else None
f = open(data, "w") if mode == "write" else None   # breaks the O_APPEND rule on purpose
if f:
    f.write("state\n"); f.flush()
state = {"n": 10}
snapshot.after_restore(lambda: state.__setitem__("hooks", state.get("hooks", 0) + 1))
restored = snapshot.ready()
state["n"] += 1
if f:
    f.write("more after the snapshot\n"); f.flush()
print("tiny", restored, state["n"], state.get("hooks", 0), flush=True)
sys.exit(5)
'''


@pytest.fixture
def lazy_ok(criu):
    if not criu.features.get("uffd-noncoop"):
        pytest.skip("this kernel lacks userfaultfd non-cooperative events (lazy restore)")


def _torch_snapshot(tmp_path_factory, layout: str):
    root = tmp_path_factory.mktemp(f"torchsnap-{layout}")
    prog = root / "prog.py"
    prog.write_text(TORCH_PROGRAM)
    out, stop = root / "out.jsonl", root / "stop"
    store = casfs.open_store(str(root / "store"))
    proc = cpu.spawn([sys.executable, str(prog), str(out), str(stop)], stdout=str(root / "stdout.log"))
    try:
        ref = cpu.checkpoint(proc, store, "torch-app", ready_timeout=240, layout=layout)
    except BaseException:
        proc.kill()
        raise
    proc.wait(10)  # the dump killed it; reap the launcher
    before = [r for r in _records(out) if r["phase"] == "before"]
    assert len(before) == 1
    live: list = []
    yield {"root": root, "store": store, "ref": ref, "out": out, "stop": stop, "before": before[0],
           "cache": str(root / "cache"), "live": live}
    for p in live:
        p.kill()
    store.close()


@pytest.fixture(scope="module")
def torch_snap(criu, tmp_path_factory):
    """One torch+numpy process, snapshotted once into a casfs store (shared by the tests), its
    pages stored by address window (the default layout)."""
    yield from _torch_snapshot(tmp_path_factory, "windows")


@pytest.fixture(scope="module")
def torch_snap_criu(criu, tmp_path_factory):
    """The same program snapshotted with CRIU's own pages files (layout="criu")."""
    yield from _torch_snapshot(tmp_path_factory, "criu")


def _records(path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]
    except OSError:
        return []


def _wait_record(path, pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in _records(path):
            if r["phase"] == "after" and r["pid"][0] == pid:
                return r
        time.sleep(0.02)
    raise AssertionError(f"restored process {pid} wrote no record to {path}")


def _assert_same_state(rec: dict, before: dict) -> None:
    assert rec["restored"] is True
    assert rec["counter"] == before["counter"] + 1 == 42
    assert rec["out"] == before["out"]            # identical model output, bit for bit
    assert rec["np_sum"] == before["np_sum"]
    assert rec["hooks"] == 1                       # the after_restore hook ran once
    assert rec["pid"][1] == 2                      # its own namespace, under tini (PID 1)


def _restore_and_check(snap, **kw) -> None:
    snap["stop"].touch()
    live = cpu.restore("torch-app", snap["store"], cache_dir=snap["cache"], **kw)
    snap["live"].append(live)
    rec = _wait_record(snap["out"], live.ready_pid)  # the program (live.pid is the namespace's init)
    _assert_same_state(rec, snap["before"])
    assert live.wait(60) == 7                      # the tree's own exit status comes back
    assert live.lazy_done(60)


def test_a_torch_process_restores_eagerly_with_identical_state(torch_snap):
    _restore_and_check(torch_snap)


def test_a_torch_process_restores_lazily_with_identical_state(torch_snap, lazy_ok):
    _restore_and_check(torch_snap, lazy=True)


def test_a_lazy_restore_reads_pages_through_a_casfs_mount(torch_snap_criu, lazy_ok):
    _restore_and_check(torch_snap_criu, lazy=True, source="mount")


def test_a_snapshot_in_crius_own_layout_restores_from_the_store_too(torch_snap_criu, lazy_ok):
    _restore_and_check(torch_snap_criu, source="store")


def test_a_window_layout_snapshot_is_smaller_to_store_again_and_refuses_a_mount_clearly(torch_snap, lazy_ok):
    meta = torch_snap["ref"].meta
    assert meta["layout"]["kind"] == "windows" and meta["layout"]["window"] == cpu.SNAPSHOT_CHUNK_SIZE
    assert meta["layout"]["lazy_pages"] > meta["layout"]["eager_pages"] > 0
    with pytest.raises(ValueError, match="source='store'"):
        cpu.restore("torch-app", torch_snap["store"], lazy=True, source="mount")


def test_a_torch_process_restores_from_the_store_without_unpacking(torch_snap, lazy_ok, tmp_path):
    """source="store": no export is written; CRIU gets its metadata images and a few eager pages
    in the restore's work dir, and every other page comes from the page server (store reads)."""
    snap = torch_snap
    cache = tmp_path / "never-written"
    snap["stop"].touch()
    live = cpu.restore("torch-app", snap["store"], source="store", cache_dir=str(cache), profile=False)
    snap["live"].append(live)
    _assert_same_state(_wait_record(snap["out"], live.ready_pid), snap["before"])
    assert live.wait(60) == 7
    assert live.lazy_done(60)
    served = live.pages()
    assert served["error"] is None and served["done"]
    # every lazy page went through the page server, save those of memory the process unmapped
    # or never needed before it exited (the daemon stops serving an exited process)
    assert live.timings["lazy_pages"] > 10 * live.timings["eager_pages"] > 0
    assert 0.9 * live.timings["lazy_pages"] < served["pages"] <= live.timings["lazy_pages"]
    assert not cache.exists()                     # nothing was exported


def test_an_auto_restore_reads_the_hosts_export_when_it_has_one_and_the_store_otherwise(torch_snap, lazy_ok, tmp_path):
    """source="auto" (casfs serve's default): an eager restore from an export already on the
    host was the faster one (docs/benchmarks.md), so it is taken whenever the export is there."""
    snap = dict(torch_snap, cache=str(tmp_path / "exports"))
    _restore_and_check(snap, source="auto", profile=False)  # the profile test records the first
    first = snap["live"][-1]
    assert (first.timings["source"], first.timings["lazy"]) == ("store", True)
    assert not os.path.exists(snap["cache"])       # the store restore exported nothing
    _restore_and_check(snap, source="auto", lazy=False)  # eager: only the export can, so it is made
    made = snap["live"][-1]
    assert (made.timings["source"], made.timings["lazy"], made.timings["cached"]) == ("export", False, False)
    _restore_and_check(snap, source="auto", profile=False)
    last = snap["live"][-1]
    assert (last.timings["source"], last.timings["lazy"]) == ("export", False) and last.timings["cached"]


def test_the_first_restore_from_the_store_records_a_startup_profile_that_later_ones_replay(torch_snap, lazy_ok):
    snap = torch_snap
    image = snap["store"].open_image("torch-app")
    snap["stop"].touch()
    first = cpu.restore("torch-app", snap["store"], source="store")
    snap["live"].append(first)
    assert first.wait(60) == 7 and first.lazy_done(60)
    first.close()                                  # the profile is saved once the pages are all sent
    prof = casfs.load_profile(snap["store"], image.id)
    assert prof is not None and prof.chunk_size == 4096     # pages, in the order they faulted
    # one item per page touched: a page the program and its init share is faulted by each
    assert 0 < len(prof.items) <= first.pages()["faults"] <= first.timings["lazy_pages"]
    second = cpu.restore("torch-app", snap["store"], source="store")
    snap["live"].append(second)
    _assert_same_state(_wait_record(snap["out"], second.ready_pid), snap["before"])
    assert second.timings["profile_pages"] == len(prof.items)
    assert second.timings["hot_pages"] == len(prof.items)   # restored by CRIU, not faulted in
    assert second.timings["hot_image"]                      # their bytes from one small image
    hot = snap["store"].open_image(f"snapshot-hot.{image.id}")
    assert hot.stat("pages").size == len(prof.items) * 4096
    assert second.wait(60) == 7 and second.lazy_done(60)
    assert second.pages()["faults"] < first.pages()["faults"]


def test_a_corrupt_page_in_the_store_kills_the_restored_process_instead_of_running_it_wrong(tiny, lazy_ok):
    """Chunks holding only lazily served pages are damaged in the blob store: the page server's
    verified read fails, and the restored tree is killed before it runs on wrong memory (a uffd
    whose daemon gives up would hand it zero pages)."""
    out = tiny["tmp"] / "out.log"
    proc = cpu.spawn([sys.executable, tiny["prog"], "plain"], stdout=str(out))
    tiny["procs"].append(proc)
    cpu.checkpoint(proc, tiny["store"], "to-damage", chunk_size=64 << 10)
    proc.wait(10)
    image = tiny["store"].open_image("to-damage")
    damaged: set = set()
    for name in image.listdir("casfs-pages"):     # lazily served pages only (the window files)
        for ref in image.chunk_refs(image.lookup(f"casfs-pages/{name}")):
            path = os.path.join(str(tiny["tmp"] / "store"), casfs_layout_path(ref))
            if (path, ref.pack_off) in damaged:    # equal windows are one chunk: flip it once
                continue
            with open(path, "r+b") as f:
                f.seek(ref.pack_off + ref.stored_len - 8)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0xFF]))
            damaged.add((path, ref.pack_off))
    assert damaged
    fresh = casfs.open_store(str(tiny["tmp"] / "store"))   # nothing of it in memory
    try:
        live = cpu.restore("to-damage", fresh, source="store")
    except snapshot.CriuError as e:
        live = None                                # failed during CRIU's own restore: also fine
        assert "could not be read from the store" in str(e)
        shutil.rmtree(os.path.dirname(e.log))     # a failed restore keeps its logs for the user
    if live is not None:
        tiny["procs"].append(live)
        assert live.wait(60) != 5                  # killed, not run to its normal exit
        assert live.lazy_done(60)
        assert "could not be read from the store" in live.pages()["error"]
    fresh.close()
    assert "tiny True" not in (out.read_text() if out.exists() else "")


def casfs_layout_path(ref) -> str:
    from casfs.layout import object_key, relpath

    return relpath(object_key(ref))


def test_two_concurrent_restores_of_one_snapshot_both_run(torch_snap):
    snap = torch_snap
    if snap["stop"].exists():
        snap["stop"].unlink()
    got: list = []
    errors: list = []

    def one() -> None:
        try:
            got.append(cpu.restore("torch-app", snap["store"], cache_dir=snap["cache"]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap["live"].extend(got)
    assert not errors, errors
    assert len({p.pid for p in got}) == 2
    for p in got:
        _assert_same_state(_wait_record(snap["out"], p.ready_pid), snap["before"])
    assert all(p.poll() is None for p in got)      # both still running, side by side
    snap["stop"].touch()
    assert [p.wait(60) for p in got] == [7, 7]


def test_a_snapshot_whose_key_does_not_match_is_refused(torch_snap, tmp_path, criu):
    snap = torch_snap
    image = snap["store"].open_image("torch-app")
    tree = tmp_path / "altered"
    casfs.export(image, str(tree))
    meta_path = tree / cpu.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["key"]["host"]["cpu_flags"].append("casfs_flag_this_cpu_lacks")
    meta["key"]["runtime"]["libraries"]["torch"]["dist"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    casfs.build(snap["store"], str(tree), tag="torch-altered", progress=False)
    with pytest.raises(snapshot.IncompatibleHost) as e:
        cpu.restore("torch-altered", snap["store"], cache_dir=snap["cache"])
    msg = str(e.value)
    assert "casfs_flag_this_cpu_lacks" in msg
    assert "torch 0.0.1 is not installed" in msg
    # the unaltered snapshot still passes the same check
    assert cpu.restore_problems(cpu.read_meta(image)["key"], criu) == []


@pytest.fixture
def tiny(criu, tmp_path):
    prog = tmp_path / "tiny.py"
    prog.write_text(TINY_PROGRAM)
    store = casfs.open_store(str(tmp_path / "store"))
    procs: list = []
    yield {"prog": str(prog), "store": store, "tmp": tmp_path, "procs": procs,
           "cache": str(tmp_path / "cache")}
    for p in procs:
        p.kill()
    store.close()


def test_a_file_opened_for_writing_without_append_is_refused_with_the_fix(tiny):
    data = tiny["tmp"] / "data.txt"
    proc = cpu.spawn([sys.executable, tiny["prog"], "write", str(data)])
    tiny["procs"].append(proc)
    with pytest.raises(snapshot.RuleViolation) as e:
        cpu.checkpoint(proc, tiny["store"], "bad")
    msg = str(e.value)
    assert str(data) in msg and "without O_APPEND" in msg and "open(path, 'a')" in msg
    assert proc.poll() is None                     # nothing was dumped; it still waits


def test_a_restore_that_trips_the_append_rule_explains_crius_failure(tiny):
    """Dumped anyway (strict=False): the first restore writes to the file, so the second one
    fails inside CRIU, and the error explains CRIU's log line with the fix."""
    data = tiny["tmp"] / "data.txt"
    out = tiny["tmp"] / "out.log"
    proc = cpu.spawn([sys.executable, tiny["prog"], "write", str(data)], stdout=str(out))
    tiny["procs"].append(proc)
    cpu.checkpoint(proc, tiny["store"], "bad", strict=False)
    first = cpu.restore("bad", tiny["store"], cache_dir=tiny["cache"])
    tiny["procs"].append(first)
    assert first.wait(60) == 5
    assert "tiny True 11 1" in out.read_text()
    with pytest.raises(snapshot.CriuError) as e:
        cpu.restore("bad", tiny["store"], cache_dir=tiny["cache"])
    shutil.rmtree(os.path.dirname(e.value.log))    # a failed restore keeps its logs for the user
    msg = str(e.value)
    assert str(data) in msg and "without O_APPEND" in msg and "size" in msg


def test_restore_or_start_starts_cold_and_snapshots_then_restores(tiny):
    out = tiny["tmp"] / "out.log"
    cmd = [sys.executable, tiny["prog"], "plain"]
    first = cpu.restore_or_start(tiny["store"], "tiny-app", cmd, stdout=str(out), cache_dir=tiny["cache"])
    tiny["procs"].append(first.process)
    assert not first.restored and "tiny-app" in (first.reason or "")
    assert first.snapshot is not None
    assert first.process.wait(60) == 5             # kept running after the dump, then exited
    second = cpu.restore_or_start(tiny["store"], "tiny-app", cmd, stdout=str(out), cache_dir=tiny["cache"])
    tiny["procs"].append(second.process)
    assert second.restored and second.reason is None
    assert second.process.wait(60) == 5
    assert out.read_text().splitlines()[-2:] == ["tiny False 11 1", "tiny True 11 1"]


def test_ready_without_a_supervisor_runs_the_hooks_and_returns_false(tmp_path):
    prog = tmp_path / "tiny.py"
    prog.write_text(TINY_PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "CASFS_SNAPSHOT_READY"}
    r = subprocess.run([sys.executable, str(prog), "plain"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 5 and r.stdout.strip() == "tiny False 11 1"


def test_the_snapshot_cli_creates_lists_restores_and_removes(tiny, capsys, monkeypatch):
    from casfs.cli.main import main

    monkeypatch.setenv("CASFS_SNAPSHOT_CACHE", tiny["cache"])
    store_url = str(tiny["tmp"] / "store")
    out = tiny["tmp"] / "cli.log"
    assert main(["--store", store_url, "snapshot", "create", "-t", "cli-app", "-o", str(out),
                 "--", sys.executable, tiny["prog"], "plain"]) == 0
    assert main(["--store", store_url, "snapshot", "ls"]) == 0
    listing = capsys.readouterr().out
    assert "cli-app" in listing and os.path.basename(sys.executable) in listing
    assert main(["--store", store_url, "snapshot", "restore", "cli-app"]) == 5
    assert "tiny True 11 1" in out.read_text()
    image_id = casfs.open_store(store_url).resolve("cli-app")
    assert os.path.isdir(os.path.join(tiny["cache"], image_id))
    capsys.readouterr()
    assert main(["--store", store_url, "snapshot", "restore", "cli-app", "--source", "auto"]) == 5
    assert "restored cli-app from the host's export:" in capsys.readouterr().out
    assert out.read_text().count("tiny True 11 1") == 2
    assert main(["--store", store_url, "snapshot", "rm", "cli-app"]) == 0
    assert not os.path.exists(os.path.join(tiny["cache"], image_id))   # its export went too
    capsys.readouterr()
    main(["--store", store_url, "snapshot", "ls"])
    assert "cli-app" not in capsys.readouterr().out


def test_a_missing_criu_is_reported_with_how_to_build_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CASFS_CRIU", str(tmp_path / "no-criu"))
    monkeypatch.setenv("CASFS_CRIU_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(snapshot.CriuUnavailable) as e:
        criumod.find_criu(refresh=True)
    assert "scripts/build_criu.sh" in str(e.value) and not e.value.kernel_lacks_feature


def test_an_old_criu_is_passed_over_with_the_reason(monkeypatch, tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CASFS_CRIU", str(fake))
    monkeypatch.setenv("CASFS_CRIU_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(snapshot.CriuUnavailable) as e:
        criumod.find_criu(refresh=True)
    assert "3.17.1 is older than 4.2" in str(e.value)


@pytest.mark.parametrize("line, expect", [
    ("(00.012) Error (criu/files-reg.c:2261): File /tmp/x/data.txt has bad size 40 (expect 6)",
     "file /tmp/x/data.txt was open for writing without O_APPEND"),
    ("(00.1) Error (criu/files.c:1): Unknown shit 600 (anon_inode:[io_uring])", "io_uring"),
    ("Error (criu/sk-inet.c:1): inet: Connected TCP socket, consider using --tcp-established option.",
     "--tcp-established"),
    ("(00.2) Error (criu/cr-restore.c:1): Can't fork for 42: File exists", "own PID namespace"),
])
def test_known_criu_failures_are_explained_with_their_fix(line, expect):
    noise = "(00.0) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted"
    reasons = criumod.explain_log(noise + "\n" + line)
    assert reasons and expect in reasons[0]


def test_unknown_criu_failures_keep_crius_own_words():
    reasons = criumod.explain_log("(00.3) Error (criu/mem.c:9): something new went wrong\n")
    assert reasons == ["something new went wrong [criu/mem.c:9]"]
