"""Copying an image between stores: only the objects the destination lacks, in parallel, verified."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import chunk as chunkmod
from .errors import CorruptChunk, StoreError
from .layout import index_key, object_key
from .leases import begin_writer, missing_objects
from .store import Store


@dataclass
class CopyResult:
    image_id: str
    objects_total: int
    objects_copied: int
    bytes_copied: int
    seconds: float


def copy_image(src: Store, dst: Store, name: str, *, tag: str | None = None, threads: int = 16,
               progress: bool | None = None) -> CopyResult:
    """Copy image ``name`` (tag or id) from ``src`` to ``dst`` and tag it there.

    Chunks and packs already in ``dst`` are skipped when their frames of this image verify; a
    damaged copy in ``dst`` is replaced (so objects ``dst`` holds are read and checked: a copy
    into a store that has most of the image costs reads of what it has). Every copied frame is
    verified against its digest first, so a corrupt source is an error, never a corrupt
    destination. The index is
    written last and the tag after it, so an interrupted copy tags nothing. While it runs the
    copy holds a lease in ``dst`` that names every object of the image (``casfs.leases``), so a
    gc there keeps the objects it skipped as present; before the index is written each one is
    checked again and any that vanished is copied again.

    Args:
        tag: tag to set in ``dst`` (default: ``name`` when it is a tag).

    Raises:
        ImageNotFound, CorruptChunk, StoreError.
    """
    t0 = time.perf_counter()
    image_id = src.resolve(name)
    ix = src.load_index(image_id)
    # object key -> chunk refs to verify inside it
    wanted: dict[str, list] = {}
    for ref in ix.all_chunks():
        key = object_key(ref)
        wanted.setdefault(key, []).append(ref)
    keys = list(wanted)
    lease = begin_writer(dst, "copy", record=keys + [index_key(image_id)], on_wait=_say)
    try:
        return _copy(src, dst, name, image_id, wanted, keys, tag, threads, progress, t0)
    finally:
        if lease is not None:
            lease.release()


def _check_frames(data: bytes, refs: list) -> None:
    """Every frame of this image in object ``data`` (a loose chunk, or a pack's members) has
    the digest and length the index names.

    Raises:
        CorruptChunk: for the first one that does not.
    """
    for ref in refs:
        frame = data if ref.pack is None else data[ref.pack_off:ref.pack_off + ref.stored_len]
        chunkmod.decode(frame, expect=ref.digest, length=ref.raw_len)


def _say(msg: str) -> None:
    print(f"casfs: {msg}", file=sys.stderr, flush=True)


def _copy(src: Store, dst: Store, name: str, image_id: str, wanted: dict, keys: list[str],
          tag: str | None, threads: int, progress: bool | None, t0: float) -> CopyResult:
    copied = 0
    nbytes = 0
    show = sys.stderr.isatty() if progress is None else progress
    bar = task = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress

        bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
        bar.start()
        task = bar.add_task(f"copying {name}", total=len(keys))

    def one(key: str, check: bool = True) -> int:
        if check and dst.objects.contains(key):
            try:
                _check_frames(dst.objects.get(key), wanted[key])
                return -1
            except KeyError:  # removed meanwhile: copy it
                pass
            except CorruptChunk as e:  # the destination's copy is damaged: replace it
                _say(f"{key} in {dst.url} is corrupt ({e}); replacing it")
        data = src.objects.get(key)
        _check_frames(data, wanted[key])  # raises CorruptChunk
        dst.objects.put(key, data)
        return len(data)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for n in pool.map(one, keys):
                if n >= 0:
                    copied += 1
                    nbytes += n
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    for _ in range(3):  # the final check (casfs.leases, step 6): what vanished is copied again
        gone = missing_objects(dst.objects, keys, threads)
        if not gone:
            break
        _say(f"{len(gone)} object(s) vanished from {dst.url} during the copy; copying them again")
        for key in gone:
            nbytes += one(key, check=False)
            copied += 1
    else:
        raise StoreError(f"objects keep vanishing from {dst.url} during the copy (is an outside "
                         "cleaner running?); copy again")
    frame = src.index_frame(image_id)
    try:
        chunkmod.decode(frame, expect=bytes.fromhex(image_id))
    except CorruptChunk as e:
        raise CorruptChunk(f"index of {image_id[:12]} in {src.url} is corrupt: {e}") from None
    try:
        have = dst.objects.get(index_key(image_id))
        chunkmod.verify(have, expect=bytes.fromhex(image_id))
    except KeyError:
        have = None
    except CorruptChunk as e:
        _say(f"the index of {image_id[:12]} in {dst.url} is corrupt ({e}); replacing it")
        have = None
    if have is None:
        dst.objects.put(index_key(image_id), frame)
        copied += 1
        nbytes += len(frame)
    if tag is None and name != image_id and not name.startswith(image_id[:8]):
        tag = name
    if tag:
        dst.tag(tag, image_id)
    return CopyResult(image_id, len(keys) + 1, copied, nbytes, time.perf_counter() - t0)
