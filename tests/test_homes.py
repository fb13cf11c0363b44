"""One home for each piece of knowledge, checked from the source (``ast``), like the layers'
contract in ``tests/test_layers.py``.

Issue 11 found each of these written several times; each now lives in one module, and a rule
below fails when it shows up anywhere else in ``casfs/``, ``snapshot/`` or ``serve/``:

    object keys (``chunks/…``, ``packs/…``)        casfs/layout.py
    the ``<kind>/<hh>/<hex>`` fan-out path          casfs/layout.py
    Content-Range parsing                           casfs/httpclient.py
    keep-alive HTTP connection pools                casfs/httpclient.py (serve/client.py: one
                                                    connection per request to a replica)
    ``parse_listen``                                casfs/listen.py
    safetensors header parsing                      casfs/safetensors_header.py
    the Prometheus text format                      casfs/metrics.py
    write to a temporary name, then rename          casfs/fsutil.py
    the ``$CASFS_HOME`` default                     casfs/urls.py
    retries                                         the remote object stores, never the tier
                                                    walk (casfs/tiered.py, casfs/tiers/)

and three reaches the issue named: ``serve``/``snapshot`` reaching into a Store's internals
(``image.store.chunks``, ``store.objects``), anything indexing the store's tier list
(``chunks.tiers[0]``) outside ``casfs/tiered.py``, and the tier walk probing tiers for
undeclared methods (``getattr(tier, "read_into", None)``) instead of the capabilities
``casfs.tiers.base.Tier`` declares.

The rules are deliberately plain (a string constant, a call, a slice): each has a synthetic
source below that it must catch, and an exception is listed with its reason rather than hidden
by a cleverer rule. Run on the tree before issue 11 (6e9c4b0) they report 77 findings: 29
object-key literals, 10 temp-then-rename sequences, 7 fan-out paths, 5 hand-made HTTP
connections, 3 Content-Range patterns, 3 safetensors parsers, 3 Prometheus writers, 2
``parse_listen``, the ``$CASFS_HOME`` default in snapshot, 5 retry loops under tiers/ (the walk's
own and the backends' then living there), 5 probes in the tier walk, 3 ``tiers[0]`` reaches and
``image.store.chunks`` in snapshot. What the rules cannot see (the same idea in other words) is
for review.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("casfs", "snapshot", "serve")


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree``, listed once per tree (the rules walk it many times)."""
    nodes = getattr(tree, "_all_nodes", None)
    if nodes is None:
        nodes = list(ast.walk(tree))
        tree._all_nodes = nodes  # type: ignore[attr-defined]
    return nodes


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of ``tree`` (prose may name anything)."""
    cached = getattr(tree, "_docstring_ids", None)
    if cached is not None:
        return cached
    out = set()
    for node in _walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.add(id(body[0].value))
    tree._docstring_ids = out  # type: ignore[attr-defined]
    return out


def _strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants that are not docstrings (f-string parts included)."""
    docs = _docstrings(tree)
    for node in _walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def _call_name(node: ast.Call) -> str:
    """``os.replace`` for ``os.replace(...)``, ``getattr`` for ``getattr(...)``."""
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _calls(tree: ast.AST, *names: str) -> Iterator[ast.Call]:
    for node in _walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in names or name.rsplit(".", 1)[-1] in names:
                yield node


# -- finders: line numbers where a source holds a piece of knowledge ----------------------------

_KEY_LITERAL = re.compile(r"^(chunks|packs|indexes|tags|profiles|leases)/")


def object_key_literals(tree: ast.AST) -> Iterator[int]:
    """A string that starts an object key: ``"chunks/" + hex``, ``f"packs/{h}"``."""
    for s in _strings(tree):
        if _KEY_LITERAL.match(s.value):
            yield s.lineno


def kind_names(tree: ast.AST) -> Iterator[int]:
    """The kinds spelled out (``CHUNKS = "chunks"``), from which the home builds every key."""
    for s in _strings(tree):
        if s.value in ("chunks", "packs"):
            yield s.lineno


def _is_first_two(node: ast.AST) -> bool:
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)
            and node.slice.lower is None and node.slice.step is None
            and isinstance(node.slice.upper, ast.Constant) and node.slice.upper.value == 2)


def fanout_paths(tree: ast.AST) -> Iterator[int]:
    """A name's first two characters made a directory: ``f"{kind}/{h[:2]}/{h}"``,
    ``os.path.join(root, h[:2], h)``."""
    for node in _walk(tree):
        if isinstance(node, ast.JoinedStr):
            if any(isinstance(v, ast.FormattedValue) and _is_first_two(v.value) for v in node.values):
                yield node.lineno
        elif isinstance(node, ast.Call) and _call_name(node) in ("os.path.join", "posixpath.join", "join"):
            if any(_is_first_two(a) for a in node.args):
                yield node.lineno


_CR_PATTERN = re.compile(r"bytes(\s|\\s[*+]?|\\ )\((\?P<\w+>)?\\d")


def content_range_parsers(tree: ast.AST) -> Iterator[int]:
    """A regular expression that takes a ``Content-Range: bytes a-b/n`` apart."""
    for s in _strings(tree):
        if _CR_PATTERN.search(s.value):
            yield s.lineno


def http_connections(tree: ast.AST) -> Iterator[int]:
    """An ``http.client`` connection made by hand (a pool of them is casfs.httpclient's job)."""
    for call in _calls(tree, "HTTPConnection", "HTTPSConnection"):
        yield call.lineno


def parse_listen_defs(tree: ast.AST) -> Iterator[int]:
    for node in _walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "parse_listen":
            yield node.lineno


def safetensors_parsers(tree: ast.AST) -> Iterator[int]:
    """What any safetensors header parser must know: the ``__metadata__`` key, the length limit."""
    for node in _walk(tree):
        if isinstance(node, ast.Constant) and node.value in ("__metadata__", 100_000_000) \
                and type(node.value) in (str, int):
            yield node.lineno


def prometheus_writers(tree: ast.AST) -> Iterator[int]:
    """The text exposition format written by hand: ``# HELP``/``# TYPE`` lines, ``_bucket{``."""
    for s in _strings(tree):
        if s.value.startswith(("# HELP", "# TYPE")) or "_bucket{" in s.value:
            yield s.lineno


def renames(tree: ast.AST) -> Iterator[int]:
    """``os.replace``/``os.rename``: the end of a hand-written temp-then-rename sequence."""
    for call in _calls(tree, "os.replace", "os.rename", "os.renames"):
        if _call_name(call).startswith("os."):
            yield call.lineno


def casfs_home_reads(tree: ast.AST) -> Iterator[int]:
    for s in _strings(tree):
        if s.value == "CASFS_HOME":
            yield s.lineno


_RETRY_NAMES = {"attempt", "attempts", "retry", "retries", "tries", "try_"}


def retry_loops(tree: ast.AST) -> Iterator[int]:
    """``for attempt in range(n):`` and ``while`` loops counting retries."""
    for node in _walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id in _RETRY_NAMES:
            yield node.lineno
        elif isinstance(node, ast.While) and any(isinstance(n, ast.Name) and n.id in _RETRY_NAMES
                                                 for n in ast.walk(node.test)):
            yield node.lineno


STORE_INTERNALS = {"chunks", "objects", "memory", "ssd", "blob"}


def store_internals(tree: ast.AST) -> Iterator[int]:
    """A Store's parts reached from outside casfs: ``image.store.chunks``, ``store.objects``."""
    for node in _walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in STORE_INTERNALS:
            v = node.value
            name = v.attr if isinstance(v, ast.Attribute) else v.id if isinstance(v, ast.Name) else ""
            if name == "store" or name.endswith("_store"):
                yield node.lineno


def tier_indexing(tree: ast.AST) -> Iterator[int]:
    """``something.tiers[0]``: a tier picked by its place in the store's list."""
    for node in _walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "tiers" and not isinstance(node.slice, ast.Slice) \
                and not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            yield node.lineno


def attribute_probes(tree: ast.AST) -> Iterator[int]:
    """``getattr(x, "name", ...)``/``hasattr(x, "name")``: asking an object what it can do."""
    for call in _calls(tree, "getattr", "hasattr"):
        if _call_name(call) in ("getattr", "hasattr") and len(call.args) >= 2 \
                and isinstance(call.args[1], ast.Constant):
            yield call.lineno


# -- the rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Home:
    """``find`` may match only in ``home`` (module names; a trailing '.' covers a package),
    among the modules of ``scope``. ``allowed`` lists other modules with the reason."""

    what: str
    find: Callable[[ast.AST], Iterator[int]]
    home: tuple[str, ...]
    scope: tuple[str, ...] = LAYERS
    allowed: tuple[tuple[str, str], ...] = ()
    home_form: Callable[[ast.AST], Iterator[int]] | None = None  # how the home holds it, if not as ``find`` sees

    def applies(self, module: str) -> bool:
        return _within(module, self.scope) and not _within(module, self.home) \
            and not _within(module, tuple(m for m, _ in self.allowed if ":" not in m))

    def allows(self, module: str, function: str) -> bool:
        """An exception for one function (``"module:function"`` in ``allowed``)."""
        return any(m == f"{module}:{function}" for m, _ in self.allowed)


def _within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or (n.endswith(".") and module.startswith(n)) or
               (n in LAYERS and module.startswith(n + ".")) for n in names)


HOMES = (
    Home("object keys", object_key_literals, ("casfs.layout",), home_form=kind_names),
    Home("the <kind>/<hh>/<hex> fan-out path", fanout_paths, ("casfs.layout",)),
    Home("Content-Range parsing", content_range_parsers, ("casfs.httpclient",)),
    Home("HTTP connection pools", http_connections, ("casfs.httpclient",),
         allowed=(("serve.client", "one connection per request to a replica's own HTTP API, no pool"),)),
    Home("parse_listen", parse_listen_defs, ("casfs.listen",)),
    Home("safetensors header parsing", safetensors_parsers, ("casfs.safetensors_header",)),
    Home("the Prometheus text format", prometheus_writers, ("casfs.metrics",)),
    Home("write-temp-then-rename", renames, ("casfs.fsutil",),
         allowed=(("snapshot.exports:_discard", "moves a bad export aside before removing it: no write"),)),
    Home("the $CASFS_HOME default", casfs_home_reads, ("casfs.urls",)),
    Home("retries in the tier walk", retry_loops, (), scope=("casfs.tiered", "casfs.tiers.")),
    Home("a Store's internals reached from above casfs", store_internals, (), scope=("snapshot", "serve")),
    Home("a tier picked by its index in the store's list", tier_indexing, ("casfs.tiered",)),
    Home("probes for undeclared tier methods", attribute_probes, (),
         scope=("casfs.tiered", "casfs.store", "casfs.tiers."),
         allowed=(("casfs.tiers.blob", "asks its object store for local_path, the one optional ObjectStore "
                                       "method (declared in casfs.objects.base)"),
                  ("casfs.tiers.shared", "asks torch's cudart binding and its results for CUDA calls that "
                                         "differ across torch versions: no tier is probed"))),
)


def _modules() -> list[tuple[str, str]]:
    out = []
    for layer in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, layer)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out.append((".".join(rel), os.path.join(dirpath, f)))
    return out


def strays(source: str, module: str, homes: tuple[Home, ...] = HOMES) -> list[str]:
    """Where ``source`` (module ``module``) holds a piece of knowledge outside its home."""
    tree = ast.parse(source)
    functions = _functions(tree)
    out = []
    for h in homes:
        if h.applies(module):
            for line in sorted(set(h.find(tree))):
                if h.allows(module, functions.get(line, "")):
                    continue
                where = " or ".join(h.home) if h.home else "nowhere"
                out.append(f"{module}:{line}: {h.what} (its home: {where})")
    return out


def _functions(tree: ast.AST) -> dict[int, str]:
    """line -> the name of the innermost function holding it."""
    out: dict[int, str] = {}
    for node in _walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                out[line] = node.name  # ast.walk goes outside in: inner functions overwrite
    return out


def test_each_piece_of_knowledge_lives_in_its_one_home():
    found = []
    modules = _modules()
    assert len(modules) > 60
    for module, path in modules:
        with open(path, encoding="utf-8") as f:
            found += strays(f.read(), module)
    assert found == [], "knowledge outside its home:\n" + "\n".join(found)


def test_every_home_exists_and_holds_its_knowledge():
    """A rule whose home no longer holds what it looks for has gone stale."""
    paths = dict(_modules())
    for h in HOMES:
        for home in h.home:
            with open(paths[home], encoding="utf-8") as f:
                tree = ast.parse(f.read())
            assert list((h.home_form or h.find)(tree)), f"{home} no longer holds {h.what}: move the rule with it"


# -- each rule catches what the issue found --------------------------------------------------------


def check(module: str, source: str) -> list[str]:
    return strays(textwrap.dedent(source), module)


@pytest.mark.parametrize("module,source,what", [
    ("casfs.gc", 'key = "packs/" + ref.pack.hex()\n', "object keys"),
    ("casfs.copy", 'key = f"chunks/{ref.digest.hex()}"\n', "object keys"),
    ("casfs.objects.local", 'p = f"{kind}/{name[:2]}/{name}"\n', "fan-out"),
    ("casfs.cacheserver.app", 'p = os.path.join(root, kind, h[:2], h)\n', "fan-out"),
    ("casfs.tiers.azcache", '_CR = re.compile(r"bytes (\\d+)-(\\d+)/(\\d+|\\*)")\n', "Content-Range"),
    ("casfs.tiers.azcache", 'conn = http.client.HTTPConnection(host, port, timeout=2)\n', "HTTP connection"),
    ("serve.boot", 'from http.client import HTTPConnection\nc = HTTPConnection("h")\n', "HTTP connection"),
    ("casfs.cacheserver.server", 'def parse_listen(text):\n    return text.rpartition(":")\n', "parse_listen"),
    ("casfs.prefetch", 'if key == "__metadata__":\n    pass\n', "safetensors"),
    ("snapshot.weights", 'if n > 100_000_000:\n    raise ValueError(n)\n', "safetensors"),
    ("serve.metrics", 'out.append(f"# TYPE {name} counter")\n', "Prometheus"),
    ("casfs.cacheserver.metrics", 'out.append(f"{name}_bucket{{le=\\"1\\"}} 3")\n', "Prometheus"),
    ("snapshot.cpu", 'os.replace(tmp, path)\n', "temp-then-rename"),
    ("serve.boot", 'os.rename(tmp, dest)\n', "temp-then-rename"),
    ("snapshot.cpu", 'home = os.environ.get("CASFS_HOME", "~/.local/share/casfs")\n', "CASFS_HOME"),
    ("casfs.tiered", 'for attempt in range(3):\n    frame = tier.get(ref)\n', "retries"),
    ("snapshot.weights", 'counts = image.store.chunks.stats()\n', "Store's internals"),
    ("serve.snapshots", 'def f(store):\n    return store.objects.get(k)\n', "Store's internals"),
    ("casfs.fuse.ops", 'mem = image.store.chunks.tiers[0]\n', "its index"),
    ("casfs.tiered", 'span = getattr(tier, "get_span", None)\n', "probes"),
    ("casfs.tiered", 'if hasattr(tier, "read_into"):\n    pass\n', "probes"),
])
def test_each_rule_catches_what_the_issue_found(module, source, what):
    got = check(module, source)
    assert len(got) == 1 and what in got[0], got


def test_the_rules_accept_the_homes_and_what_is_not_the_knowledge():
    assert check("casfs.layout", 'def chunk_key(d):\n    return f"chunks/{d.hex()}"\n') == []
    assert check("casfs.fsutil", "os.replace(tmp, path)\n") == []
    assert check("serve.client", "conn = http.client.HTTPConnection(host, port)\n") == []
    assert check("casfs.store", "for attempt in range(2):\n    pass\n") == []  # not the tier walk
    assert check("snapshot.weights", "stats.chunks += 1\nstats.tiers['ssd'] = 1\n") == []
    assert check("serve.http", "it = resp.chunks\nhost, port = sock.getsockname()[:2]\n") == []
    assert check("casfs.gc", '"""Deletes packs/ and chunks/ objects no tag reaches."""\n') == []
    assert check("casfs.tiered", "targets = [t for t in self.tiers[:upto] if t.writable]\n") == []
    assert check("casfs.cacheserver.app", 'RANGE = re.compile(r"^bytes=(\\d*)-(\\d*)$")\n') == []
    assert check("casfs.build.tar", 'raise E(f"a target of {n} bytes (at most {m - 1})")\n') == []
    assert check("snapshot.exports", "def _discard(p):\n    os.rename(p, p + '.bad')\n") == []
    assert len(check("snapshot.exports", "def _write(p):\n    os.rename(p + '.tmp', p)\n")) == 1  # only there
