"""casfs in containerd, all real processes: Debian's docker-registry and containerd 1.6 (own
root, state and sockets per module), ``casfs snapshotter`` as its proxy plugin, ``ctr`` as the
client and runc as the runtime. Images are busybox roots (busybox-static) built with casfs and
published with ``casfs push``; a plain OCI image (an ordinary tar.gz layer) shows that
ordinary layers still work through the casfs snapshotter."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

import casfs
from casfs.objects.oci import OciObjectStore
from casfs.oci.publish import LABEL_IMAGE, LABEL_STORE
from casfs.oci.registry import Registry, sha256_digest
from tests.support import missing_binary
from tests.support.containerd import CONTAINERD, CTR, containerd_server, snapshotter_process, start_snapshotter
from tests.support.registry import REGISTRY, registry_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSYBOX = "/usr/bin/busybox"
_missing = [m for m in (missing_binary(CONTAINERD), missing_binary(CTR), missing_binary(REGISTRY),
                        missing_binary("/usr/sbin/runc"), missing_binary(BUSYBOX)) if m]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason="; ".join(_missing) + " (scripts/setup.sh installs them)"),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.fuse,
]
APPLETS = ["sh", "echo", "cat", "ls", "sleep", "true", "false", "head", "wc", "sha256sum", "touch", "test"]


def busybox_root(path: str, extra: dict[str, bytes] | None = None) -> str:
    """A minimal root: /bin/busybox (static) and its applets as symlinks, plus ``extra`` files."""
    os.makedirs(os.path.join(path, "bin"))
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    for a in APPLETS:
        os.symlink("busybox", os.path.join(path, "bin", a))
    for rel, data in (extra or {}).items():
        p = os.path.join(path, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return path


def push(store_dir: str, name: str, dest: str, *args: str) -> str:
    """``casfs --store STORE push NAME DEST ARGS``; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", store_dir, "push", name, dest,
                        "--no-progress", *args], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def push_plain_image(registry, repo: str, tag: str, root: str) -> str:
    """An ordinary OCI image (one tar.gz layer of ``root``) pushed with casfs's registry
    client; returns its reference."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)
    layer = gzip.compress(raw.getvalue(), mtime=0)
    reg = Registry(registry.host, repo)
    ld = reg.push_blob(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw.getvalue())]}}).encode()
    cd = reg.push_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                                      "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": ld, "size": len(layer)}]}).encode()
    reg.put_manifest(tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return f"{registry.host}/{repo}:{tag}"


@pytest.fixture(scope="module")
def registry():
    with registry_server() as r:
        yield r


@pytest.fixture(scope="module")
def snapshotter():
    with snapshotter_process() as sp:
        yield sp


@pytest.fixture(scope="module")
def containerd(snapshotter):
    with containerd_server(snapshotter.socket) as cd:
        yield cd


@pytest.fixture(scope="module")
def images(tmp_path_factory, registry):
    """Two casfs images in a local store, pushed to the registry: ``bb`` (busybox and a
    greeting) and ``data`` (busybox and a 2.5 MiB random file in 1 MiB chunks, plus a small
    one). Returns {name: (reference, image id, files)}."""
    base = tmp_path_factory.mktemp("images")
    store_dir = str(base / "store")
    rng = random.Random(11)
    out = {}
    specs = {"bb": {"etc/greeting": b"hello from casfs\n"},
             "data": {"data/big": rng.randbytes(2_500_000), "data/small": b"small file\n"}}
    with casfs.open_store(store_dir) as store:
        for name, extra in specs.items():
            root = busybox_root(str(base / name), extra)
            r = casfs.build(store, root, tag=name, chunk_size=1 << 20)
            out[name] = (f"{registry.host}/casfs/{name}:v1", r.image_id, extra)
    for name in specs:
        text = push(store_dir, name, f"{registry.host}/casfs/{name}:v1", "--cmd", "/bin/sh -c 'echo default'")
        assert f"ctr image pull --snapshotter casfs {registry.host}/casfs/{name}:v1" in text
    return out


def run(cd, ref: str, cid: str, *cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return cd.ctr("run", "--rm", "--snapshotter", "casfs", ref, cid, *cmd, check=False, timeout=timeout)


def _casfs_mounts(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(root + "/")
                and "fuse.casfs" in line]


def test_ctr_runs_a_casfs_image_through_the_snapshotter_with_its_output_and_exit_code(containerd, images,
                                                                                      snapshotter):
    ref, image_id, _ = images["bb"]
    pulled = containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    assert b"done" in pulled.stdout
    p = run(containerd, ref, "run1", "/bin/sh", "-c", "cat /etc/greeting; echo to-stderr >&2; exit 7")
    assert p.returncode == 7, p.stderr
    assert p.stdout == b"hello from casfs\n" and b"to-stderr" in p.stderr
    p = run(containerd, ref, "run2")  # the image's default command
    assert p.returncode == 0 and p.stdout == b"default\n"
    snaps = containerd.ctr("snapshot", "--snapshotter", "casfs", "ls").stdout.decode()
    chain = [line.split()[0] for line in snaps.splitlines()[1:] if "Committed" in line]
    info = json.loads(containerd.ctr("snapshot", "--snapshotter", "casfs", "info", chain[0]).stdout)
    assert info["Labels"][LABEL_IMAGE] == image_id  # a lazy casfs snapshot, not an unpacked layer
    assert any(m.endswith("/casfs") for m in _casfs_mounts(snapshotter.root))


def test_each_container_writes_to_its_own_overlay_and_the_image_stays_unchanged(containerd, images):
    ref = images["bb"][0]
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    p = run(containerd, ref, "w1", "/bin/sh", "-c", "echo changed > /etc/greeting && touch /new && cat /etc/greeting")
    assert p.returncode == 0 and p.stdout == b"changed\n"
    p = run(containerd, ref, "w2", "/bin/sh", "-c", "cat /etc/greeting; test -e /new && echo leaked || echo clean")
    assert p.stdout == b"hello from casfs\nclean\n"


def test_a_plain_image_still_runs_through_the_casfs_snapshotter(containerd, registry, tmp_path):
    root = busybox_root(str(tmp_path / "plain"), {"etc/plain": b"an ordinary layer\n"})
    ref = push_plain_image(registry, "plain/busybox", "v1", root)
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    p = run(containerd, ref, "plain1", "/bin/sh", "-c", "cat /etc/plain; exit 4")
    assert p.returncode == 4 and p.stdout == b"an ordinary layer\n"


def test_a_corrupt_blob_in_the_registry_is_never_served(containerd, images, registry, snapshotter):
    ref, image_id, files = images["data"]
    objects = OciObjectStore(registry.host, "casfs/data")
    casfs.Store(objects, memory_bytes=0).open_image("v1")
    chunk = sorted(k for k in objects._map if k.startswith("chunks/"))[0]
    path = registry.blob_path(objects._map[chunk][0])
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    p = run(containerd, ref, "bad1", "/bin/sh", "-c", "cat /data/small; sha256sum /data/big")
    assert p.stdout.startswith(b"small file\n")  # the intact parts of the image read fine
    assert p.returncode != 0  # the damaged chunk is an I/O error, never data
    assert hashlib.sha256(files["data/big"]).hexdigest().encode() not in p.stdout
    assert p.stdout.count(b"\n") == 1  # no checksum of wrong bytes was printed


def test_the_snapshotter_restarts_mid_life_and_keeps_its_snapshots_and_mounts(containerd, images, snapshotter):
    ref = images["bb"][0]
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    containerd.ctr("run", "-d", "--snapshotter", "casfs", ref, "long1", "/bin/sleep", "60")
    try:
        before = containerd.ctr("snapshot", "--snapshotter", "casfs", "ls").stdout
        snapshotter.stop()
        snapshotter.proc = start_snapshotter(snapshotter.socket, snapshotter.root, snapshotter.log).proc
        deadline = time.monotonic() + 20  # containerd redials a proxy plugin with backoff (<= 3 s)
        while True:
            p = containerd.ctr("snapshot", "--snapshotter", "casfs", "ls", check=False)
            if p.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert p.returncode == 0 and p.stdout == before, p.stderr
        p = containerd.ctr("task", "exec", "--exec-id", "e1", "long1", "/bin/cat", "/etc/greeting", check=False)
        assert p.returncode == 0 and p.stdout == b"hello from casfs\n"  # the running container kept its root
        p = run(containerd, ref, "after-restart", "/bin/sh", "-c", "cat /etc/greeting")
        assert p.returncode == 0 and p.stdout == b"hello from casfs\n"
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", "long1", check=False)
        for _ in range(50):
            if containerd.ctr("task", "delete", "long1", check=False).returncode == 0:
                break
            time.sleep(0.1)
        containerd.ctr("container", "delete", "long1", check=False)


@pytest.fixture
def lone_snapshotter():
    """A snapshotter no containerd is attached to (containerd's garbage collector removes the
    backend snapshots its own metadata does not know, as the ones this test makes)."""
    with snapshotter_process() as sp:
        yield sp


def test_prepare_with_a_casfs_layers_labels_answers_already_exists_and_commits_the_image(lone_snapshotter,
                                                                                       images):
    """The path of pull-and-unpack clients (CRI, nerdctl): spoken here over gRPC by this test
    exactly as containerd's unpacker does (containerd's own ``ctr`` 1.6 takes the other path)."""
    import grpc

    from casfs.containerd.api import load

    snapshotter = lone_snapshotter
    pb, pb_grpc, _ = load()
    ref, image_id, _ = images["bb"]
    store = f"oci://{ref.rpartition('/casfs')[0]}/casfs/bb"
    chain = "sha256:" + hashlib.sha256(b"labels-path").hexdigest()
    labels = {"containerd.io/snapshot.ref": chain, LABEL_IMAGE: image_id, LABEL_STORE: store}
    with grpc.insecure_channel(f"unix:{snapshotter.socket}") as ch:
        sn = pb_grpc.SnapshotsStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            sn.Prepare(pb.PrepareSnapshotRequest(key="ns/1/extract-1 " + chain, labels=labels), timeout=60)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        info = sn.Stat(pb.StatSnapshotRequest(key=chain)).info
        assert info.kind == pb.COMMITTED and info.labels["containerd.io/snapshot.ref"] == chain
        listed = [i for r in sn.List(pb.ListSnapshotsRequest()) for i in r.info]
        assert any(i.name == chain and i.labels[LABEL_IMAGE] == image_id for i in listed)
        with pytest.raises(grpc.RpcError) as e:  # again: already there
            sn.Prepare(pb.PrepareSnapshotRequest(key="ns/2/extract-2 " + chain, labels=labels), timeout=60)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        m = sn.Prepare(pb.PrepareSnapshotRequest(key="ns/3/ctr", parent=chain)).mounts
        assert m[0].type == "overlay" and any(o.startswith("lowerdir=") and o.endswith("/casfs") for o in m[0].options)
        with pytest.raises(grpc.RpcError) as e:
            sn.Remove(pb.RemoveSnapshotRequest(key=chain))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # it has a child
        sn.Remove(pb.RemoveSnapshotRequest(key="ns/3/ctr"))
        mp = [x for x in m[0].options if x.startswith("lowerdir=")][0][len("lowerdir="):]
        assert mp in _casfs_mounts(snapshotter.root)
        sn.Remove(pb.RemoveSnapshotRequest(key=chain))
        assert mp not in _casfs_mounts(snapshotter.root) and not os.path.exists(os.path.dirname(mp))
        with pytest.raises(grpc.RpcError) as e:
            sn.Stat(pb.StatSnapshotRequest(key=chain))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_image_naming_a_casfs_image_the_store_lacks_fails_the_pull_with_the_reason(containerd, registry,
                                                                                       snapshotter):
    from casfs.oci.publish import runnable_manifest

    reg = Registry(registry.host, "casfs/missing")
    desc = runnable_manifest(reg, "0" * 64, f"oci://{registry.host}/casfs/missing")
    body = reg.get_manifest(desc["digest"], ["application/vnd.oci.image.manifest.v1+json"]).body
    reg.put_manifest("v1", body, "application/vnd.oci.image.manifest.v1+json")
    mounted = _casfs_mounts(snapshotter.root)
    p = containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs",
                       f"{registry.host}/casfs/missing:v1", check=False)
    assert p.returncode != 0
    assert b"cannot mount casfs image 000000000000" in p.stderr and b"no index" in p.stderr, p.stderr
    assert _casfs_mounts(snapshotter.root) == mounted  # nothing half-mounted
    left = containerd.ctr("snapshot", "--snapshotter", "casfs", "ls").stdout.decode()
    assert "extract" not in left  # containerd removed the half-made snapshot


def test_cleanup_removes_debris_no_snapshot_owns_and_keeps_the_rest(snapshotter, containerd, images):
    import grpc

    from casfs.containerd.api import load

    pb, pb_grpc, _ = load()
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", images["bb"][0])
    base = os.path.join(snapshotter.root, "snapshots")
    owned = sorted(os.listdir(base))
    debris = os.path.join(base, "99999", "fs")
    os.makedirs(debris)
    with grpc.insecure_channel(f"unix:{snapshotter.socket}") as ch:
        pb_grpc.SnapshotsStub(ch).Cleanup(pb.CleanupRequest(), timeout=60)
    assert sorted(os.listdir(base)) == owned and owned
    p = run(containerd, images["bb"][0], "after-cleanup", "/bin/cat", "/etc/greeting")
    assert p.returncode == 0 and p.stdout == b"hello from casfs\n"


def test_removing_the_image_unmounts_and_frees_its_snapshots(containerd, images, snapshotter):
    ref = images["data"][0]
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "casfs", ref)
    mounted = set(_casfs_mounts(snapshotter.root))
    assert mounted
    containerd.ctr("image", "rm", "--sync", ref)
    for image in ("bb", "plain/busybox"):
        containerd.ctr("image", "rm", "--sync", f"{images['bb'][0].partition('/')[0]}/"
                       f"{'casfs/bb' if image == 'bb' else image}:v1", check=False)
    deadline = time.monotonic() + 30
    while _casfs_mounts(snapshotter.root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _casfs_mounts(snapshotter.root) == []
    left = containerd.ctr("snapshot", "--snapshotter", "casfs", "ls").stdout.decode().splitlines()[1:]
    assert left == []
    assert os.listdir(os.path.join(snapshotter.root, "snapshots")) == []


def _snapshotter_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "casfs.cli.main", "snapshotter", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_the_snapshotter_never_replaces_a_file_or_a_live_socket_nor_shares_its_root(snapshotter, tmp_path):
    """A mistyped --socket used to delete whatever was there (a user's file) and a second
    snapshotter took over the first one's live socket; now both are refused in one line, and
    only a stale socket (its snapshotter killed) is replaced."""
    import socket as socketmod

    from tests.support.containerd import start_snapshotter

    victim = tmp_path / "notes.txt"
    victim.write_text("keep me\n")
    r = _snapshotter_cli("--socket", str(victim), "--root", str(tmp_path / "root1"))
    assert r.returncode == 1 and "is not a socket; refusing to replace it" in r.stderr, r.stderr
    assert victim.read_text() == "keep me\n"
    r = _snapshotter_cli("--socket", snapshotter.socket, "--root", str(tmp_path / "root2"))
    assert r.returncode == 1 and "another process is serving on --socket" in r.stderr, r.stderr
    r = _snapshotter_cli("--socket", str(tmp_path / "other.sock"), "--root", snapshotter.root)
    assert r.returncode == 1 and "is in use by another casfs snapshotter" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    probe = socketmod.socket(socketmod.AF_UNIX)
    probe.connect(snapshotter.socket)  # the first one still serves
    probe.close()
    stale = str(tmp_path / "stale.sock")
    dead = socketmod.socket(socketmod.AF_UNIX)
    dead.bind(stale)  # a socket file nobody listens on
    dead.close()
    sp = start_snapshotter(stale, str(tmp_path / "root3"), str(tmp_path / "log"))
    try:
        assert sp.proc.poll() is None
    finally:
        sp.stop()
    assert not os.path.exists(stale)
