"""casfs.httpclient: the pool, the one resend on a stale keep-alive connection, Content-Range
parsing and the backoff, shared by the HTTP store, the azcache tier and the S3 store. The
server is a real stdlib HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading

import pytest

from casfs.httpclient import Backoff, ConnectionPool, Unframed, exchange, parse_content_range


def test_content_range_is_parsed_or_refused():
    cr = parse_content_range(" bytes 10-19/100 ")
    assert (cr.first, cr.last, cr.total, cr.length) == (10, 19, 100, 10)
    assert parse_content_range("bytes 0-0/*").total is None
    for bad in (None, "", "bytes */100", "bytes 5-4/10", "items 0-1/2", "bytes 0-1/2 junk"):
        assert parse_content_range(bad) is None


def test_backoff_is_jittered_capped_and_honours_a_short_retry_after():
    b = Backoff(0.1, 1.0)
    for retry in range(1, 12):
        assert 0 <= b.delay(retry) <= min(1.0, 0.1 * 2 ** (retry - 1))
    assert b.delay(1, "1") == 1.0  # at least Retry-After
    assert b.delay(1, "30") == 1.0  # capped
    assert b.delay(1, "soon") <= 0.1  # not a number of seconds: ignored


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    framed = True

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.server.requests += 1  # type: ignore[attr-defined]  # before answering: the client may check at once
        body = b"hello"
        self.send_response(200)
        if type(self).framed:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests = 0  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_kept_alive_connection_is_reused_and_a_stale_one_resent_once_at_once(server):
    pool = ConnectionPool("http", "127.0.0.1", server.server_address[1], maxsize=2, timeout=5)
    assert exchange(pool, "GET", "/a", {}).body == b"hello"
    conn, reused = pool.acquire()
    assert reused  # the first exchange's connection came back to the pool
    conn.sock.shutdown(2)  # it dies while idle (as when a keep-alive timeout closes it)
    pool._idle.append(conn)
    assert exchange(pool, "GET", "/b", {}).body == b"hello"
    assert server.requests == 2
    pool.close()


def test_an_unframed_answer_is_an_error_when_framing_is_required(server, monkeypatch):
    monkeypatch.setattr(_Handler, "framed", False)
    pool = ConnectionPool("http", "127.0.0.1", server.server_address[1], timeout=5)
    assert exchange(pool, "GET", "/a", {}).body == b"hello"  # read to the close: accepted
    with pytest.raises(Unframed, match="without Content-Length"):
        exchange(pool, "GET", "/a", {}, framed=True)
    assert pool._idle == []  # closed connections are never pooled
