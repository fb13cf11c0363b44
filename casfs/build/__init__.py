"""Building images: a source (directory, tar, OCI layout) -> chunks + packs + index in a store."""

from __future__ import annotations

import os
import stat as statmod
import sys
import time
from dataclasses import dataclass

from ..errors import BuildError
from ..index import serialize
from ..layout import object_key
from ..leases import Lease, begin_writer, missing_objects
from ..chunk import DEFAULT_BLOCK
from .packer import COMPRESS_POLICIES, DEFAULT_CHUNK_SIZE, Packer, PackStats
from .policy import CODE_CHUNK_SIZE, WEIGHT_CHUNK_SIZE, WEIGHT_SUFFIXES, chunk_size_for
from .source import Source

__all__ = ["BuildResult", "build_image", "check_build_options", "open_source", "COMPRESS_POLICIES", "CODE_CHUNK_SIZE",
           "DEFAULT_CHUNK_SIZE", "WEIGHT_CHUNK_SIZE", "WEIGHT_SUFFIXES", "chunk_size_for"]


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


def _say(msg: str) -> None:
    print(f"casfs: {msg}", file=sys.stderr, flush=True)


def _ensure_stored(store, packer: Packer, lease: Lease | None, attempts: int = 3) -> list:
    """The chunk table, once every object it references is in the store (step 6 of
    ``casfs.leases``): the objects are recorded in the build's lease (a gc starting later keeps
    them; one already running is waited for), then each is checked, and the chunks of any that
    vanished are read from the source and stored again.

    Raises:
        BuildError: when objects keep vanishing, or the source changed.
        StoreError: when the store cannot be read or written.
    """
    for _ in range(attempts):
        keys = {object_key(ref) for ref in packer.table}
        if lease is not None:
            lease.record(keys, on_wait=_say)
        gone = missing_objects(store.objects, keys)
        if not gone:
            return list(packer.table)
        _say(f"{len(gone)} object(s) this build references vanished from {store.url} while it ran "
             f"(e.g. {gone[0]}); storing their chunks again from the source")
        packer.restore(set(gone))
    raise BuildError(f"objects this build references keep vanishing from {store.url} (is a gc with "
                     "leases disabled or an outside cleaner running?); build again")


def check_build_options(tag: str | None, chunk_size: int | None, compress: str = "auto") -> None:
    """Refuse build options that cannot work, before a store is opened or created.

    Raises:
        ValueError: an invalid tag. BuildError: a chunk size or compress policy out of range.
    """
    from ..store import check_tag

    if tag is not None:
        check_tag(tag)
    if chunk_size is not None and (chunk_size & (chunk_size - 1) or not (4096 <= chunk_size <= 256 << 20)):
        raise BuildError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 256 MiB")
    if compress not in COMPRESS_POLICIES:
        raise BuildError(f"compress must be one of {', '.join(COMPRESS_POLICIES)}, got {compress!r}")


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
    if os.path.lexists(path):
        raise BuildError(f"{path}: not a directory, tar archive or OCI layout (a device, fifo, socket "
                         "or dangling symlink); build from a directory or a tar file")
    raise BuildError(f"{path}: no such file or directory")


def build_image(store, source: Source | str, tag: str | None = None, *,
                chunk_size: int | None = None, progress: bool | None = None,
                dedup_against_tags: bool = True, compress: str = "auto",
                block: int | None = None) -> BuildResult:
    """Build an image from ``source`` into ``store`` and optionally tag it.

    Nothing is tagged unless every chunk and the index were stored: a failed build leaves at
    most unreferenced objects (removed by ``gc``). While it runs the build holds a lease in the
    store (``casfs.leases``): a concurrent ``gc`` keeps the images it reuses chunks of and what
    it uploads, and before the index is written every object it references is checked (a chunk
    whose object vanished is stored again from the source).

    Args:
        store: a ``casfs.Store``.
        source: a Source or a path for ``open_source``.
        chunk_size: bytes per chunk for every file, a power of two from 4 KiB to 256 MiB.
            None (the default): each file gets its own (``casfs.build.policy``): 16 MiB for
            model weights and large incompressible files, 512 KiB for everything else.
        progress: show a progress bar (default: when stderr is a terminal).
        compress: the codec policy. ``"auto"`` (default) stores model-weight files (names
            ending in ``.safetensors .bin .pt .pth .gguf .onnx .npy``) raw, so they can be
            read straight into (pinned) buffers, and everything else as zstd where that saves
            at least 10%; ``"always"`` uses zstd wherever it makes a chunk smaller;
            ``"never"`` stores every chunk raw.

        block: block size of blocked frames (chunks longer than it are read and verified
            block by block: ``casfs.chunk``), a power of two from 16 KiB to 1 MiB; None for
            the default (64 KiB), 0 for whole frames only (every read fetches whole chunks).
    Raises:
        BuildError: on unusable or hostile input, or files changing during the build.
        StoreError: when the store cannot be written.
    """
    check_build_options(tag, chunk_size, compress)
    src = open_source(source) if isinstance(source, str) else source
    t0 = time.perf_counter()
    try:
        entries = list(src.entries())
        # each hard-linked file once: what the packer reads, the summary and `casfs images` show
        groups: set[object] = set()
        total = 0
        for e in entries:
            if statmod.S_ISREG(e.spec.mode) and (e.spec.link_group is None or e.spec.link_group not in groups):
                groups.add(e.spec.link_group)
                total += e.spec.size
        show = sys.stderr.isatty() if progress is None else progress
        bar = None
        if show:
            from ..progress import byte_bar

            bar, task = byte_bar(f"building {tag or ''}".strip(), total, eta=True)
            on_bytes = lambda n: bar.advance(task, n)  # noqa: E731
        else:
            on_bytes = None
        lease = begin_writer(store, "build", pin_tags=dedup_against_tags, on_wait=_say)
        try:
            pins = lease.pins if lease is not None else None
            known = store.known_chunks(image_ids=pins) if dedup_against_tags else {}
            packer = Packer(store.objects, chunk_size, known=known, on_bytes=on_bytes, compress=compress,
                            block=DEFAULT_BLOCK if block is None else block)
            try:
                parallel = bool(getattr(src, "parallel_reads", False))
                linked: dict[object, list[int]] = {}  # hard links: read one name, share its chunks
                sizes: dict[object, int] = {}
                for e in entries:
                    if e.open is not None:
                        group = e.spec.link_group
                        if group is not None and group in linked:
                            e.spec.chunks = linked[group]
                            e.spec.chunk_size = sizes[group]
                            continue
                        e.spec.chunks, e.spec.chunk_size = packer.add_file(
                            e.open, e.spec.size, parallel_read=parallel, name=e.spec.path)
                        if group is not None:
                            linked[group] = e.spec.chunks
                            sizes[group] = e.spec.chunk_size
                packer.finish()
                if bar is not None:
                    bar.stop()
                    bar = None
                table = _ensure_stored(store, packer, lease)
            except BaseException:
                packer.abort()
                raise
            finally:
                if bar is not None:
                    bar.stop()
            packer.close()
            try:
                data = serialize([e.spec for e in entries], table, chunk_size or CODE_CHUNK_SIZE)
            except (ValueError, OverflowError) as err:
                raise BuildError(f"{src.description}: {err} (a field is out of range or the tree is malformed)") from None
            image_id = store.put_index(data)
            if tag is not None:
                store.tag(tag, image_id)
        finally:
            if lease is not None:
                lease.release()
        return BuildResult(image_id, tag, len(entries), time.perf_counter() - t0, packer.stats, len(data))
    finally:
        src.close()
