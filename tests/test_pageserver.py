"""The page server (snapshot.pageserver) on its protocol: answers from verified store reads,
failures, and a daemon that hangs up.

The daemon's side is this test, speaking CRIU's page-server protocol on the socket pair (the
real ``criu lazy-pages`` drives it in tests/test_snapshot_cpu.py); it lets a test choose the
moment the daemon hangs up, which a real restore leaves to a race.
"""

from __future__ import annotations

import os
import struct

import pytest

import casfs
from snapshot import pageserver
from snapshot.pageserver import (PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE, PS_IOV_GET, PageServer,
                                 ProcessPages)

PAGE = 4096
VADDR = 0x7F0000000000
_IOV = struct.Struct("<I4xQQQ")


@pytest.fixture
def pages_image(tmp_path):
    """A casfs image holding one process's 4 MiB pages file (random bytes), and those bytes."""
    data = os.urandom(4 << 20)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(data)
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="snap", chunk_size=1 << 20, progress=False)
    image = store.open_image("snap")
    procs = {1: ProcessPages(image.lookup("pages-1.img"), [VADDR], [VADDR + len(data)], [0])}
    yield image, procs, data
    store.close()


def _serve(image, procs, **kw):
    ours, theirs = pageserver.socket_pair()
    errors: list[str] = []
    server = PageServer(image, procs, ours, on_error=errors.append, **kw).start()
    return server, theirs, errors


def _recv_exactly(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, "the page server closed the connection"
        out += got
    return bytes(out)


def test_a_fault_is_answered_with_the_stored_pages_and_recorded_in_order(pages_image):
    image, procs, data = pages_image
    server, daemon, errors = _serve(image, procs)
    for page in (5, 2, 5):
        daemon.sendall(_IOV.pack(PS_IOV_GET, 1, VADDR + page * PAGE, 1))
        cmd, nr, vaddr, pid = _IOV.unpack(_recv_exactly(daemon, _IOV.size))
        assert (cmd & 0xFFFF, nr, vaddr, pid) == (PS_IOV_ADD_F, 1, VADDR + page * PAGE, 1)
        assert _recv_exactly(daemon, PAGE) == data[page * PAGE:(page + 1) * PAGE]
    daemon.sendall(_IOV.pack(PS_IOV_CLOSE, 0, 0, 0))
    assert _recv_exactly(daemon, 4) == b"\0\0\0\0"
    assert server.wait(10)
    entry = procs[1].entry
    assert server.touched == [(entry, 5), (entry, 2)]   # first touches, in order
    assert server.error is None and errors == [] and server.stats()["faults"] == 3


def _hang_up_mid_answer(image, procs, goodbye: bool, tree_exited=None):
    """A fault, then a 4 MiB background request; the daemon reads the first bytes of that
    answer, (says goodbye and) hangs up."""
    server, daemon, errors = _serve(image, procs, boot_window=0.0, tree_exited=tree_exited)
    daemon.sendall(_IOV.pack(PS_IOV_GET, 1, VADDR, 1))                 # a fault, recorded
    _recv_exactly(daemon, _IOV.size + PAGE)
    daemon.sendall(_IOV.pack(PS_IOV_GET, 1024, VADDR, 1))              # 4 MiB in the background
    _recv_exactly(daemon, _IOV.size)                                    # it started sending...
    if goodbye:
        daemon.sendall(_IOV.pack(PS_IOV_FORCE_CLOSE, 0, 0, 0))
        daemon.recv(4)                                                   # page bytes, taken for the status
    daemon.close()                                                       # ...and the daemon left
    assert server.wait(10)
    return server, errors


def test_a_daemon_that_says_goodbye_while_pages_go_out_is_not_a_failure(pages_image):
    """criu lazy-pages, when the restored tree exits before the background transfer is over,
    sends FORCE_CLOSE without reading the answer in flight and exits: found in CI, where the
    page server called that a failure, killed the (finished) tree and dropped the startup
    profile the restore had recorded."""
    image, procs, _ = pages_image
    server, errors = _hang_up_mid_answer(image, procs, goodbye=True)
    assert server.error is None and errors == []
    assert server.touched == [(procs[1].entry, 0)]


def test_a_daemon_that_dies_under_a_running_tree_fails_the_restore(pages_image):
    """No goodbye and the tree still runs: its later faults would be served zero-filled pages by
    the kernel; the restore's on_error kills it."""
    image, procs, _ = pages_image
    server, errors = _hang_up_mid_answer(image, procs, goodbye=False, tree_exited=lambda: False)
    assert len(errors) == 1 and "without a goodbye" in errors[0] and server.error == errors[0]


def test_a_daemon_that_dies_after_the_tree_exited_is_not_a_failure(pages_image):
    """criu lazy-pages 4.2.1 aborts (BUG_ON in page_server_async_read) when an answer arrives
    for a process that has exited: seen in the real restore test after its short program ended."""
    image, procs, _ = pages_image
    server, errors = _hang_up_mid_answer(image, procs, goodbye=False, tree_exited=lambda: True)
    assert server.error is None and errors == []


def test_a_request_for_pages_the_snapshot_does_not_hold_fails_the_restore_first(pages_image):
    image, procs, _ = pages_image
    server, daemon, errors = _serve(image, procs)
    daemon.sendall(_IOV.pack(PS_IOV_GET, 1, VADDR + (8 << 20), 1))
    assert server.wait(10)
    assert len(errors) == 1 and "does not hold" in errors[0] and server.error == errors[0]
    assert daemon.recv(64) == b""                                        # then it hung up
