"""What every builder produces: a tree of entries, each regular file with a way to open it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Protocol

from ..index import EntrySpec

MAX_ENTRIES = 5_000_000


@dataclass(slots=True)
class SourceEntry:
    """One entry of a build source. ``open`` is set for regular files with content."""

    spec: EntrySpec
    open: Callable[[], BinaryIO] | None = None


class Source(Protocol):
    """A build source: a directory, a tar, an OCI layout."""

    description: str

    def entries(self) -> Iterator[SourceEntry]:
        """Every entry, parents before children, the root ('') first."""
        ...

    def close(self) -> None: ...
