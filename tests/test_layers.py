"""The layers' contract, read from the source: every module's imports, checked with ``ast``.

    serve/     may use  casfs  and  snapshot, through their top-level public names only
    snapshot/  may use  casfs, through its top-level public names only
    casfs/     uses nothing above it (its CLI finds serve's and snapshot's commands through the
               ``casfs.commands`` entry points, by name, without importing them)

A public name is one in the package's ``__all__``. Violations: importing a submodule of a lower
package (``from casfs.fuse.mount import is_mounted``), a name that is not in its ``__all__``
(``from casfs import MountThing``), a private name of another package (``snapshot.cpu._x``,
``from casfs import _x``), reaching a submodule through the package (``casfs.fuse.mount...``),
and any upward import. Imports inside functions count as much as module-level ones, and so do
imports by name (``importlib.import_module("serve.cli")``, ``__import__``) and module paths held
in strings for something else to import (``"serve.cli:register"``). The
checker's own tests feed it small synthetic sources so it is known to catch each violation.
Run on the tree before issue 11 it reports 37 violations (casfs/cli importing serve and
snapshot, serve reaching casfs.fuse.mount/export/urls/errors and snapshot.cpu._mapped_by_anyone).
What it cannot see: reaches through objects. The ones issue 11 found (a Store's parts reached
from serve or snapshot, ``image.store.chunks``; a tier picked by index, ``chunks.tiers[0]``) are
rules of ``tests/test_homes.py``; others (``self.mod._x`` after ``self.mod = module``) are for
review.

This is the contract from now on: a change that needs another casfs name exports it (and
``tests/test_public_api.py`` lists it); it does not reach around the face.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import pkgutil
import textwrap
import types
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("casfs", "snapshot", "serve")  # bottom to top
MAY_USE = {"casfs": set(), "snapshot": {"casfs"}, "serve": {"casfs", "snapshot"}}


@dataclass(frozen=True)
class Use:
    """One import (or attribute reach) of ``target`` (a dotted module) in a module's source."""

    target: str
    names: tuple[str, ...]  # for ``from target import a, b`` and ``target.a``; () for ``import target``
    line: int
    kind: str  # "import", "from" or "attr"


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def uses(source: str, module: str, is_package: bool = False) -> list[Use]:
    """Every import in ``source`` (module ``module``), plus attribute reaches through an imported
    top-level package (``casfs.fuse.mount.x`` after ``import casfs``), wherever they occur."""
    tree = ast.parse(source)
    out: list[Use] = []
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Use(a.name, (), node.lineno, "import"))
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            out.append(Use(target, tuple(a.name for a in node.names), node.lineno, "from"))
            for a in node.names:
                bound[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            out.append(Use(bound[node.value.id], (node.attr,), node.lineno, "attr"))
        elif isinstance(node, ast.Call) and node.args and _callee(node) in ("import_module", "__import__"):
            target = _leading_text(node.args[0]).rstrip(".")
            if target and not target.startswith("."):
                out.append(Use(target, (), node.lineno, "import"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value):
            # a module named in a string, for something else to import ("serve.cli:register")
            out.append(Use(node.value.split(":")[0], (), node.lineno, "name"))
    return out


_MODULE_PATH = re.compile(r"^(casfs|snapshot|serve)(\.[a-z_][a-z0-9_]*)+(:[A-Za-z_]\w*)?$")


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _leading_text(node: ast.AST) -> str:
    """The constant text a module-name argument starts with (``f"serve.{m}"`` -> ``"serve."``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return ""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, module: str, public: dict[str, set[str]], is_package: bool = False) -> list[str]:
    """Why ``source`` (module ``module``) breaks the layers' contract ([] when it does not).

    ``public`` maps each layer to its ``__all__``.
    """
    layer = module.split(".")[0]
    out = []
    for u in uses(source, module, is_package):
        top = u.target.split(".")[0]
        where = f"{module}:{u.line}"
        if top not in LAYERS or top == layer:
            continue
        if top not in MAY_USE[layer]:
            out.append(f"{where}: {layer} imports {u.target}, a layer above it")
            continue
        if u.target != top:
            rest = u.target[len(top) + 1:].split(".")
            private = [n for n in rest + list(u.names) if _private(n)]
            if private:
                out.append(f"{where}: uses the private {u.target}" +
                           "".join(f".{n}" for n in u.names if _private(n)))
            elif u.kind == "attr" and rest[0] in public[top]:
                continue  # ``from casfs import Store`` then ``Store.attr``: a public object's attribute
            else:
                out.append(f"{where}: imports {u.target}, which is not {top}'s public face "
                           f"(use top-level {top} names)")
            continue
        for name in u.names:
            if _private(name):
                out.append(f"{where}: uses the private {top}.{name}")
            elif name not in public[top] and not name.startswith("__"):
                out.append(f"{where}: {top}.{name} is not in {top}.__all__")
    return sorted(dict.fromkeys(out), key=lambda v: int(v.split(":")[1]))  # once each, by line


def _modules() -> list[tuple[str, str, bool]]:
    """(module name, path, is package) of every module of the three layers."""
    out = []
    for layer in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, layer)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                    is_package = rel[-1] == "__init__"
                    out.append((".".join(rel[:-1] if is_package else rel), os.path.join(dirpath, f),
                                is_package))
    return out


def _public() -> dict[str, set[str]]:
    return {layer: set(importlib.import_module(layer).__all__) for layer in LAYERS}


# -- the contract, on the real code ----------------------------------------------------------


def test_every_module_keeps_to_the_layers():
    public = _public()
    found = []
    modules = _modules()
    assert len(modules) > 60 and any(m == "serve.boot" for m, _, _ in modules)
    for module, path, is_package in modules:
        with open(path, encoding="utf-8") as f:
            found += violations(f.read(), module, public, is_package)
    assert found == [], "layer violations:\n" + "\n".join(found)


@pytest.mark.parametrize("layer", ["snapshot", "serve"])
def test_every_public_name_of_a_lazy_package_is_what_its_module_defines(layer):
    """snapshot and serve import their submodules on first use; a submodule named like one of
    the package's public names would replace that name once imported (snapshot.restore would
    become a module). Import every submodule, then look again."""
    pkg = importlib.import_module(layer)
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            importlib.import_module(f"{layer}.{info.name}")
        except ImportError:  # an optional dependency (torch, CUDA, vLLM) absent here
            continue
    for name in pkg.__all__:
        assert not isinstance(getattr(pkg, name), types.ModuleType), f"{layer}.{name} is a module"


def test_every_casfs_public_name_resolves():
    import casfs

    for name in casfs.__all__:
        assert not isinstance(getattr(casfs, name), types.ModuleType), f"casfs.{name} is a module"


# -- the checker catches each violation --------------------------------------------------------

PUBLIC = {"casfs": {"Store", "mount", "export", "CasfsError"},
          "snapshot": {"restore", "shm_segments", "CriuError"},
          "serve": {"BootConfig"}}


def check(module: str, source: str, is_package: bool = False) -> list[str]:
    return violations(textwrap.dedent(source), module, PUBLIC, is_package)


@pytest.mark.parametrize("layer", ["serve", "snapshot"])
def test_the_checker_catches_an_import_of_a_casfs_submodule(layer):
    for src in ("from casfs.fuse.mount import is_mounted\n", "import casfs.export\n",
                "from casfs import errors\n", "import casfs.urls as urls\n"):
        got = check(f"{layer}.thing", src)
        assert len(got) == 1 and ("not casfs's public face" in got[0] or "not in casfs.__all__" in got[0]), (src, got)


def test_the_checker_catches_a_casfs_submodule_reached_through_the_package():
    got = check("serve.boot", """
        import casfs

        def stop(path):
            casfs.fuse.mount.unmount(path)
    """)
    assert got == ["serve.boot:5: casfs.fuse is not in casfs.__all__"]


def test_the_checker_catches_casfs_importing_the_layers_above_it():
    got = check("casfs.cli.serve", """
        def cmd(args):
            from serve.boot import boot_replica
            import snapshot
            return boot_replica
    """)
    assert len(got) == 2 and all("a layer above it" in g for g in got)
    assert check("snapshot.thing", "import serve\n") == ["snapshot.thing:1: snapshot imports serve, a layer above it"]


def test_the_checker_catches_casfs_importing_upward_by_name():
    """The CLI's command modules are imported by name; naming serve's there is an upward import
    as much as a ``from serve import`` (plugins come through the ``casfs.commands`` entry points,
    declared in pyproject.toml, not in casfs's source)."""
    got = check("casfs.cli.main", """
        import importlib
        COMMAND_MODULES = ("casfs.cli.build", "serve.cli")

        def load(name):
            importlib.import_module("snapshot.cli").register(name)
            return __import__(f"serve.{name}")
    """)
    assert got == ["casfs.cli.main:3: casfs imports serve.cli, a layer above it",
                   "casfs.cli.main:6: casfs imports snapshot.cli, a layer above it",
                   "casfs.cli.main:7: casfs imports serve, a layer above it"], got
    assert check("casfs.cli.plugins", 'ENTRY = "serve.cli:register"\n') == [
        "casfs.cli.plugins:1: casfs imports serve.cli, a layer above it"]
    assert check("serve.x", 'importlib.import_module("casfs.fuse.mount")\n') == [
        "serve.x:1: imports casfs.fuse.mount, which is not casfs's public face (use top-level casfs names)"]


def test_the_checker_catches_private_names_of_another_package():
    assert check("serve.snapshots", "from snapshot.cpu import _mapped_by_anyone\n") == [
        "serve.snapshots:1: uses the private snapshot.cpu._mapped_by_anyone"]
    got = check("serve.snapshots", """
        from snapshot import cpu

        def segments(pids):
            return cpu._shm_segments(pids)
    """)
    assert got == ["serve.snapshots:2: snapshot.cpu is not in snapshot.__all__",
                   "serve.snapshots:5: uses the private snapshot.cpu._shm_segments"]
    assert check("serve.x", "import snapshot\nsnapshot._shm_segments([1])\n") == [
        "serve.x:2: uses the private snapshot._shm_segments"]
    assert check("snapshot.x", "from casfs import _private_helper\n") == [
        "snapshot.x:1: uses the private casfs._private_helper"]


def test_the_checker_catches_a_name_missing_from_all():
    assert check("snapshot.weights", "from casfs import Store, NotExported\n") == [
        "snapshot.weights:1: casfs.NotExported is not in casfs.__all__"]
    assert check("serve.x", "import snapshot\nsnapshot.checkpoint_everything()\n") == [
        "serve.x:2: snapshot.checkpoint_everything is not in snapshot.__all__"]


def test_the_checker_accepts_what_the_contract_allows():
    assert check("serve.boot", """
        import casfs
        import snapshot
        from casfs import Store, mount as do_mount
        from casfs import CasfsError as Err
        from snapshot import restore
        from . import client
        from .errors import BootError

        def f(image, p):
            import casfs
            casfs.export(image, p)
            snapshot.shm_segments([1])
            return casfs.__version__, Err.__name__, client, BootError, restore, do_mount, Store
    """) == []
    assert check("snapshot", "from . import cpu\nfrom .meta import read_meta\n", is_package=True) == []
    assert check("snapshot", 'def f(m):\n    return importlib.import_module(f"snapshot.{m}")\n',
                 is_package=True) == []
    assert check("casfs.cli.main", 'MODS = ("casfs.cli.build", "casfs.cli.mount")\n') == []
    assert check("casfs.cli.main", "from . import plugins\nfrom ..store import Store\n") == []


def test_relative_imports_resolve_to_the_module_they_name():
    assert [u.target for u in uses("from . import cpu\nfrom ..casfs import x\n", "snapshot.start")] == \
        ["snapshot", "casfs"]
    assert [u.target for u in uses("from .meta import m\n", "snapshot", is_package=True)] == ["snapshot.meta"]
    assert [u.target for u in uses("from ..errors import E\n", "casfs.fuse.mount")] == ["casfs.errors"]
