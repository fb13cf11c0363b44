"""The cache server against slow clients (issue 17, defect 7: 1,030 connections sending one byte
every 50 s held every slot; /health was refused for minutes).

A real `casfs cache-server` process, attacked by real sockets from several loopback addresses
(127.0.0.2-5: separate clients to the server) that trickle request heads one byte at a time,
while a well-behaved client on 127.0.0.1 asks for /health. Scaled down (100 slots, a 2 s header
deadline) so that the attack takes seconds, not minutes; the same rules hold at the defaults.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

import casfs
from conftest import write_tree

SLOTS, PER_CLIENT, HEADER_TIMEOUT = 100, 32, 2.0
ATTACKERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


@pytest.fixture
def server(tmp_path):
    write_tree(tmp_path / "t", {"f": b"x" * 1000})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "t"), tag="t", progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", str(tmp_path / "store"), "--memory", "16M",
                             "--max-connections", str(SLOTS), "--max-per-client", str(PER_CLIENT),
                             "--header-timeout", str(HEADER_TIMEOUT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
    assert m, line + proc.stderr.read()
    yield int(m.group(1))
    proc.kill()
    proc.wait()


def _slow_socket(src: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


def _health(port: int, timeout: float = 1.5) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = c.recv(4096)
    m = re.match(rb"HTTP/1\.1 (\d+)", data)
    return int(m.group(1)) if m else 0


def _read_status(s: socket.socket) -> bytes | None:
    """What the server sent (b"" for a close, None while it is silent)."""
    try:
        return s.recv(4096)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def test_slow_request_heads_cannot_hold_the_slots_and_health_keeps_answering(server):
    port = server
    socks = [_slow_socket(ATTACKERS[i % len(ATTACKERS)], port) for i in range(120)]  # more than the slots
    born = {s: time.monotonic() for s in socks}
    ended: dict[socket.socket, tuple[float, bytes]] = {}
    health: list[int] = []
    payload = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    sent = 0
    t_end = time.monotonic() + 3 * HEADER_TIMEOUT
    next_health = time.monotonic()
    try:
        while time.monotonic() < t_end:
            for s in socks:  # one more byte from every attacker still connected
                if s in ended:
                    continue
                got = _read_status(s)
                if got is not None:
                    ended[s] = (time.monotonic() - born[s], got)
                    continue
                try:
                    s.send(payload[sent % len(payload):sent % len(payload) + 1])
                except OSError:
                    ended[s] = (time.monotonic() - born[s], b"")
            sent += 1
            if time.monotonic() >= next_health:
                health.append(_health(port))
                next_health = time.monotonic() + 0.5
            time.sleep(0.25)
    finally:
        for s in socks:
            s.close()
    assert health and all(code == 200 for code in health), health  # never refused, never timed out
    assert len(ended) == len(socks)  # every trickling connection was cut ...
    late = [t for t, _ in ended.values() if t > HEADER_TIMEOUT + 2.0]
    assert not late, late  # ... within the header deadline, although it kept sending bytes
    answers = [got for _, got in ended.values()]
    assert any(a.startswith(b"HTTP/1.1 408") for a in answers)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b""
        while chunk := c.recv(65536):
            text += chunk
    for reason in ("evicted", "header_timeout"):
        m = re.search(rb'casfs_cache_connections_dropped_total\{reason="%s"\} (\d+)' % reason.encode(), text)
        assert m and int(m.group(1)) > 0, reason


def test_one_client_address_cannot_take_more_than_its_share(server):
    port = server
    socks = [_slow_socket("127.0.0.2", port) for _ in range(PER_CLIENT)]
    try:
        time.sleep(0.3)
        extra = _slow_socket("127.0.0.2", port)
        extra.setblocking(True)
        extra.settimeout(3)
        reply = extra.recv(4096)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections from 127.0.0.2" in reply
        assert _health(port) == 200  # another client still gets in
    finally:
        for s in socks:
            s.close()


def test_connections_that_never_send_a_byte_are_closed_after_the_header_deadline(server):
    port = server
    s = _slow_socket("127.0.0.3", port)
    s.setblocking(True)
    s.settimeout(HEADER_TIMEOUT + 5)
    t = time.monotonic()
    try:
        assert s.recv(4096) == b""  # closed quietly: nothing was asked
    finally:
        s.close()
    assert time.monotonic() - t < HEADER_TIMEOUT + 2
