"""Building images: a source (directory, tar, OCI layout) -> chunks + packs + index in a store."""

from __future__ import annotations

import os
import stat as statmod
import sys
import time
from dataclasses import dataclass

from ..errors import BuildError
from ..index import serialize
from .packer import COMPRESS_POLICIES, DEFAULT_CHUNK_SIZE, WEIGHT_SUFFIXES, Packer, PackStats
from .source import Source

__all__ = ["BuildResult", "build_image", "open_source", "COMPRESS_POLICIES", "DEFAULT_CHUNK_SIZE",
           "WEIGHT_SUFFIXES"]


@dataclass
class BuildResult:
    """The outcome of a build: the new image id and what it cost."""

    image_id: str
    tag: str | None
    entries: int
    seconds: float
    pack: PackStats
    index_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.pack.bytes_in / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def dedup_ratio(self) -> float:
        """Input bytes per newly stored raw byte (1.0 = nothing deduplicated)."""
        return self.pack.bytes_in / self.pack.bytes_new_raw if self.pack.bytes_new_raw else float("inf")


def open_source(path: str) -> Source:
    """Pick the builder for ``path``: an OCI layout dir, another directory, or a tar archive.

    Raises:
        BuildError: when ``path`` is missing or of no known kind.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "oci-layout")):
            from .oci import OciSource

            return OciSource(path)
        from .directory import DirectorySource

        return DirectorySource(path)
    if os.path.isfile(path):
        from .tar import TarSource

        return TarSource(path)
    raise BuildError(f"{path}: no such file or directory")


def build_image(store, source: Source | str, tag: str | None = None, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool | None = None,
                dedup_against_tags: bool = True, compress: str = "auto") -> BuildResult:
    """Build an image from ``source`` into ``store`` and optionally tag it.

    Nothing is tagged unless every chunk and the index were stored: a failed build leaves at
    most unreferenced objects (removed by ``gc``).

    Args:
        store: a ``casfs.Store``.
        source: a Source or a path for ``open_source``.
        chunk_size: bytes per chunk, a power of two from 4 KiB to 256 MiB.
        progress: show a progress bar (default: when stderr is a terminal).
        compress: the codec policy. ``"auto"`` (default) stores model-weight files (names
            ending in ``.safetensors .bin .pt .pth .gguf .onnx .npy``) raw, so they can be
            read straight into (pinned) buffers, and everything else as zstd where that saves
            at least 10%; ``"always"`` uses zstd wherever it makes a chunk smaller;
            ``"never"`` stores every chunk raw.

    Raises:
        BuildError: on unusable or hostile input, or files changing during the build.
        StoreError: when the store cannot be written.
    """
    from ..store import check_tag

    if tag is not None:
        check_tag(tag)
    if chunk_size & (chunk_size - 1) or not (4096 <= chunk_size <= 256 << 20):
        raise BuildError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 256 MiB")
    if compress not in COMPRESS_POLICIES:
        raise BuildError(f"compress must be one of {', '.join(COMPRESS_POLICIES)}, got {compress!r}")
    src = open_source(source) if isinstance(source, str) else source
    t0 = time.perf_counter()
    try:
        entries = list(src.entries())
        total = sum(e.spec.size for e in entries if statmod.S_ISREG(e.spec.mode))
        show = sys.stderr.isatty() if progress is None else progress
        bar = None
        if show:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                       TransferSpeedColumn)

            bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            bar.start()
            task = bar.add_task(f"building {tag or ''}".strip(), total=total)
            on_bytes = lambda n: bar.advance(task, n)  # noqa: E731
        else:
            on_bytes = None
        known = store.known_chunks() if dedup_against_tags else {}
        packer = Packer(store.objects, chunk_size, known=known, on_bytes=on_bytes, compress=compress)
        try:
            parallel = bool(getattr(src, "parallel_reads", False))
            linked: dict[object, list[int]] = {}  # hard links: read one name, share its chunks
            for e in entries:
                if e.open is not None:
                    group = e.spec.link_group
                    if group is not None and group in linked:
                        e.spec.chunks = linked[group]
                        continue
                    e.spec.chunks = packer.add_file(e.open, e.spec.size, parallel_read=parallel,
                                                    name=e.spec.path)
                    if group is not None:
                        linked[group] = e.spec.chunks
            table = packer.finish()
        except BaseException:
            packer.abort()
            raise
        finally:
            if bar is not None:
                bar.stop()
        try:
            data = serialize([e.spec for e in entries], table, chunk_size)
        except (ValueError, OverflowError) as err:
            raise BuildError(f"{src.description}: {err} (a field is out of range or the tree is malformed)") from None
        image_id = store.put_index(data)
        if tag is not None:
            store.tag(tag, image_id)
        return BuildResult(image_id, tag, len(entries), time.perf_counter() - t0, packer.stats, len(data))
    finally:
        src.close()
