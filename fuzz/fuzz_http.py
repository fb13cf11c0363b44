"""Fuzz target: the parsers of HTTP bytes a peer sends casfs: the cache server's request head
(``casfs.cacheserver.http.parse_head``) and ``Range`` header
(``casfs.cacheserver.parse_range``), and the clients' ``Content-Range``
(``casfs.httpclient.parse_content_range``, read from cache nodes, HTTP stores, S3 and
registries).

Contract under test: ``parse_head`` returns a ``Request`` (an alphabetic method, a target
starting with '/', HTTP/1.0 or 1.1, lower-case header names) or raises ``BadRequest`` with a
4xx/5xx status; ``parse_range(h, size)`` never raises and returns None, ``"unsatisfiable"`` or
``(start, end)`` with ``0 <= start < end <= size``, for any header and any object size (a
number of thousands of digits used to raise out of ``int()``); ``parse_content_range`` never
raises and returns None or a range with ``first <= last`` (and ``last < total`` is not
promised: callers check it). Nothing else may escape.

Input (first byte): even: the rest is a raw request head (its Range header, if any, is also
given to ``parse_range`` with a size taken from the next bytes), and the rest as a
Content-Range value; odd: a ``FuzzedDataProvider`` builds a request head from pieces (methods,
targets, versions, header names, range specs with huge numbers and odd separators).

Run: ``.venv/bin/python fuzz/fuzz_http.py fuzz/corpus-http -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["casfs"]):
    from casfs.cacheserver.app import parse_range
    from casfs.cacheserver.http import BadRequest, parse_head
    from casfs.httpclient import parse_content_range

METHODS = ["GET", "HEAD", "POST", "G3T", "", "get"]
TARGETS = ["/", "/chunks/ab/" + "ab" * 32, "/packs/%2e%2e/x", "x", "/health?x=1", "/%00", "/" + "a" * 300]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "http/1.1"]
NAMES = ["Range", "Host", "Authorization", "Cache-Control", "Connection", " X", "", "a b"]
NUMBERS = ["", "0", "1", "9" * 18, "9" * 19, "9" * 5000, "-1", "01", "\u0663", " 5"]


def check(head: bytes, size: int) -> None:
    try:
        req = parse_head(head)
    except BadRequest as e:
        assert 400 <= e.status < 600, e.status
        rng = None
    else:
        assert req.method.isalpha() and req.target.startswith("/"), req
        assert req.version in ("HTTP/1.0", "HTTP/1.1")
        assert all(k == k.lower() for k in req.headers)
        rng = req.headers.get("range")
    for header in filter(None, (rng, head.decode("latin-1"))):
        got = parse_range(header, size)
        assert got is None or got == "unsatisfiable" or (isinstance(got, tuple) and 0 <= got[0] < got[1] <= size), got
    cr = parse_content_range(head.decode("latin-1"))
    assert cr is None or (0 <= cr.first <= cr.last and cr.length >= 1), cr


def structured(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, int]:
    pick = lambda xs: xs[fdp.ConsumeIntInRange(0, len(xs) - 1)]  # noqa: E731
    line = f"{pick(METHODS)} {pick(TARGETS)} {pick(VERSIONS)}"
    lines = [line]
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = pick(NAMES)
        if name == "Range" or fdp.ConsumeBool():
            value = f"bytes={pick(NUMBERS)}-{pick(NUMBERS)}"
            if fdp.ConsumeBool():
                value += "," + f"{pick(NUMBERS)}-{pick(NUMBERS)}"
        else:
            value = fdp.ConsumeUnicodeNoSurrogates(30)
        lines.append(f"{name}:{value}")
    size = pick([0, 1, 100, 1 << 40, fdp.ConsumeIntInRange(0, 1 << 62)])
    return "\r\n".join(lines).encode("latin-1", "replace"), size


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        size = int.from_bytes(data[1:9].ljust(8, b"\0"), "little") >> (data[0] % 64)
        check(data[9:], size)
        return
    check(*structured(atheris.FuzzedDataProvider(data[1:])))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
