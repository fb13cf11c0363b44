"""CPU snapshots: CRIU checkpoints of process trees, stored as casfs images, restored from them.

The flow::

    proc = snapshot.spawn(["python", "serve.py"], stdout="/var/log/serve.log")
    ref = snapshot.checkpoint(proc, store, "serve-v1")       # waits for snapshot.ready()
    live = snapshot.restore("serve-v1", store, lazy=True)     # as many at once as you like
    live.wait()

* ``spawn`` starts a process the way CRIU needs it: in its own PID namespace under tini
  (``unshare -p -f``, so restores get fresh outer PIDs and many can run at once), a session
  leader without a terminal (``setsid``), stdin from /dev/null and stdout/stderr appended to
  files (``O_APPEND``: CRIU does not check the size of such files) or /dev/null.
* ``checkpoint`` checks the rules a snapshotted process must follow (``criu.tree_rule_problems``),
  dumps the tree with ``criu dump``, and stores the image directory as a casfs image: page
  images are cut into chunks that are deduplicated against the store's other images. A JSON
  file ``casfs-snapshot.json`` in the image holds the metadata: the compatibility key (host
  key of ``snapshot.compat`` plus CRIU version, Python and library versions, and the sizes of
  the files the process maps), CRIU's flags, the files it had open, copies of link_remap files
  and /dev/shm segments.
* ``restore`` refuses an incompatible host (``IncompatibleHost``), puts back what CRIU does not
  carry (/dev/shm segments, written sparse; link_remap files; missing append-only logs), and
  runs ``criu restore``. Where the images come from: ``source="store"`` (lazy): nothing is
  unpacked; CRIU's metadata images are written from verified reads, and the memory pages are
  served from the store by a page server in this process as the restored processes touch
  them (``lazyrestore``, ``pageserver``; the first restore records which chunks its faults
  touched, later ones fetch those first). ``source="export"``: the image is exported once per
  host into a cache directory; ``source="mount"``: CRIU reads a casfs FUSE mount. With
  ``lazy=True`` CRIU's lazy-pages daemon (userfaultfd) serves memory pages on first touch, so
  the process runs before its pages arrive.
* ``restore_or_start`` restores, or falls back to a cold start (optionally taking the
  snapshot for next time) when the snapshot is missing or cannot be restored here.

Everything here runs as root (CRIU needs CAP_SYS_ADMIN and friends).

This module is the face of CPU snapshots; each step lives in a module of its own:
``spawning`` (starting a process CRIU can dump), ``hostkey`` (the compatibility key),
``checkpointing`` (dump and store), ``meta`` (what a stored snapshot is, listing them),
``shm`` (/dev/shm segments), ``exports`` (the per-host export cache), ``restoring`` and
``start`` (restore, or start cold), ``lazyrestore`` + ``pageserver`` + ``criuimg`` (restoring
from the store without unpacking). (The module names are not the function names: a lazily
imported submodule named ``restore`` would shadow ``snapshot.restore``.)
"""

from __future__ import annotations

from .checkpointing import DUMP_FLAGS, RESTORE_FLAGS, SNAPSHOT_CHUNK_SIZE, checkpoint
from .exports import drop_export, snapshot_cache_dir
from .hostkey import cpu_snapshot_key, restore_problems
from .meta import EXTRA_DIR, META_FILE, META_FORMAT, SnapshotRef, list_snapshots, read_meta
from .restoring import RestoredProcess, restore
from .shm import mapped_anywhere, shm_segments
from .spawning import SpawnedProcess, spawn
from .start import Started, restore_or_start

__all__ = [
    "DUMP_FLAGS",
    "EXTRA_DIR",
    "META_FILE",
    "META_FORMAT",
    "RESTORE_FLAGS",
    "SNAPSHOT_CHUNK_SIZE",
    "RestoredProcess",
    "SnapshotRef",
    "SpawnedProcess",
    "Started",
    "checkpoint",
    "cpu_snapshot_key",
    "drop_export",
    "list_snapshots",
    "mapped_anywhere",
    "read_meta",
    "restore",
    "restore_or_start",
    "restore_problems",
    "shm_segments",
    "snapshot_cache_dir",
    "spawn",
]
