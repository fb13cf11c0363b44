"""The boot report: which phases a boot ran and how long each took (seconds), as JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import casfs

__all__ = ["PHASE_ORDER", "BootReport", "PhaseTimer", "write_report"]

PHASE_ORDER = ("gpu_health", "mount", "init", "weights", "compile", "warmup", "snapshot", "restore",
               "first_token")


@dataclass
class BootReport:
    """The JSON boot report (``to_dict``). ``phases`` maps phase -> seconds, in boot order."""

    mode: str  # "cold" | "restore"
    image: str
    image_id: str = ""
    model_dir: str = ""
    materialize: str = ""
    listen: str = ""
    engine: str = ""
    eager: bool = False
    snapshot: str | None = None
    started_at: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    total: float | None = None
    first_token_text: str = ""
    snapshot_create: dict[str, Any] | None = None
    gpu: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class PhaseTimer:
    """Times ``with timer.phase(name):`` blocks into ``report.phases[name]`` (seconds)."""

    def __init__(self, report: BootReport) -> None:
        self.report = report

    def phase(self, name: str) -> "_Phase":
        return _Phase(self.report, name)


class _Phase:
    def __init__(self, report: BootReport, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> "_Phase":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.report.phases[self.name] = time.monotonic() - self.t0


def write_report(report: BootReport, path: str) -> None:
    """Write the report as JSON, atomically (``casfs.atomic_open``)."""
    with casfs.atomic_open(path, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")
