"""Small text formatting shared by the CLI commands."""

from __future__ import annotations

import stat as statmod
import time

from ..sizes import format_size as human, parse_size  # noqa: F401 - the commands' short names


def mode_string(mode: int) -> str:
    return statmod.filemode(mode)


def mtime_string(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))
