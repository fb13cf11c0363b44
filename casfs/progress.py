"""Byte progress bars for long work (build, export): one look, and 1024-based units (KiB, MiB,
GiB) like every size casfs prints (``casfs.sizes.format_size``), so the bar, the build summary
and ``casfs images`` agree. rich's own transfer columns print decimal MB."""

from __future__ import annotations

from typing import Any

from .sizes import format_size

__all__ = ["byte_bar"]


def byte_bar(description: str, total: int, *, eta: bool = False) -> tuple[Any, Any]:
    """A started rich ``Progress`` with one task of ``total`` bytes; returns (progress, task).
    The caller advances the task and stops the progress."""
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed")

    cols: list = ["[progress.description]{task.description}", BarColumn(), DownloadColumn(binary_units=True),
                  _Speed()]
    if eta:
        cols.append(TimeRemainingColumn())
    bar = Progress(*cols, transient=False)
    bar.start()
    return bar, bar.add_task(description, total=total)
