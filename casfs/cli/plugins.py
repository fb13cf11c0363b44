"""Command groups that other packages add to ``casfs``: the ``casfs.commands`` entry points.

casfs imports nothing above it, so ``casfs serve`` and ``casfs snapshot`` are not casfs
modules: the ``serve`` and ``snapshot`` packages register them through the entry-point group
``casfs.commands`` (pyproject.toml ``[project.entry-points."casfs.commands"]``), each entry
naming a ``register(subparsers)`` function, as casfs's own command modules have. The contract
for a plugin's commands: set ``func(args) -> int``; the global options are ``args.store``,
``args.cache_dir``, ``args.azcache`` and ``args.verbose``, and ``args.open_store()`` opens the
store they name; raise ``casfs.CasfsError``/``OSError``/``ValueError`` for a one-line error.

Where the entries come from: the installed distributions' metadata, except that when casfs
runs from a source checkout (a ``pyproject.toml`` of project ``casfs`` beside the package),
that file's table stands for the ``casfs`` distribution's entries. An editable install's
metadata is a copy of pyproject.toml taken at install time, and a checkout run without any
install (``python -m casfs.cli.main`` from the tree, as the vLLM venv does) has none.

A plugin that cannot be imported or registered costs a one-line warning on stderr, never
the rest of the command line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Callable

GROUP = "casfs.commands"

__all__ = ["GROUP", "command_entries", "register_plugins"]


def _source_entries() -> dict[str, str] | None:
    """The ``casfs.commands`` table of the checkout casfs runs from (None: not a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "pyproject.toml")
    try:
        import tomllib

        with open(path, "rb") as f:
            project = tomllib.load(f).get("project") or {}
    except (OSError, ValueError):
        return None
    if project.get("name") != "casfs":
        return None
    table = (project.get("entry-points") or {}).get(GROUP) or {}
    return {str(k): str(v) for k, v in table.items()}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def command_entries() -> dict[str, str]:
    """Command name -> ``"module:function"`` of every registered plugin, sorted by name."""
    source = _source_entries()
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        if source is not None and dist is not None and _norm(dist.name) == "casfs":
            continue  # the checkout's own table is the truth (see the module docstring)
        found.setdefault(ep.name, ep.value)
    found.update(source or {})
    return dict(sorted(found.items()))


def _load(value: str) -> Callable[[argparse._SubParsersAction], None]:
    return importlib.metadata.EntryPoint(name="", value=value, group=GROUP).load()


def register_plugins(sub: argparse._SubParsersAction, taken: set[str]) -> list[str]:
    """Add every plugin's commands to ``sub``; returns the names added.

    A plugin named like a command in ``taken``, or one whose module fails to import or whose
    ``register`` raises, is skipped with one warning line on stderr.
    """
    added = []
    for name, value in command_entries().items():
        if name in taken:
            print(f"casfs: warning: command plugin {name!r} ({value}) skipped: casfs already has "
                  f"a {name!r} command", file=sys.stderr)
            continue
        try:
            _load(value)(sub)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the CLI
            print(f"casfs: warning: command plugin {name!r} ({value}) not loaded: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            continue
        added.append(name)
    return added
