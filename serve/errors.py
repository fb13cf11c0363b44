"""serve's errors: each says which boot phase failed and why (one line at the CLI)."""

from __future__ import annotations

from casfs import CasfsError

__all__ = ["BootError"]


class BootError(CasfsError):
    """The replica could not boot; the message says which phase failed and why."""
