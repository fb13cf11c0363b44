"""The snapshotter's metadata: one SQLite database (``<root>/metadata.db``) of snapshots.

A snapshot row: ``id`` (its directory ``<root>/snapshots/<id>``), ``key`` (containerd's backend
key or committed name, unique), ``parent`` (a committed snapshot's key, or ""), ``kind``
(view, active, committed: containerd's numbers), ``labels`` (JSON), ``created``/``updated``
(seconds since the epoch) and, for a snapshot whose contents are a casfs image, ``image``
and ``store``.

SQLite in WAL mode with ``synchronous=FULL``: a snapshot that an RPC reported as created or
committed is still there after the snapshotter (or the host) crashes, and a crash halfway
through an RPC leaves the database as before it. Directories are created before their row
and removed after it, so a directory without a row is debris (``Cleanup`` removes it) and a
row always has its directory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["ACTIVE", "COMMITTED", "Metadata", "Snapshot", "VIEW"]

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd.services.snapshots.v1.Kind
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,
    parent  TEXT NOT NULL DEFAULT '',
    kind    INTEGER NOT NULL,
    labels  TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    image   TEXT NOT NULL DEFAULT '',
    store   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


@dataclass
class Snapshot:
    """One snapshot as recorded."""

    id: int
    key: str
    parent: str
    kind: int
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    image: str = ""  # casfs image id when the contents are a casfs image
    store: str = ""  # the store that image is read from

    @property
    def is_casfs(self) -> bool:
        return bool(self.image)


def _row(r: tuple) -> Snapshot:
    return Snapshot(id=r[0], key=r[1], parent=r[2], kind=r[3], labels=json.loads(r[4]), created=r[5],
                    updated=r[6], image=r[7], store=r[8])


_COLS = "id, key, parent, kind, labels, created, updated, image, store"


class Metadata:
    """The snapshot table at ``path``. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def get(self, key: str) -> Snapshot | None:
        with self.lock:
            r = self._db.execute(f"SELECT {_COLS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def all(self) -> Iterator[Snapshot]:
        with self.lock:
            rows = self._db.execute(f"SELECT {_COLS} FROM snapshots ORDER BY id").fetchall()
        for r in rows:
            yield _row(r)

    def children(self, key: str) -> list[str]:
        with self.lock:
            return [r[0] for r in self._db.execute("SELECT key FROM snapshots WHERE parent = ?", (key,))]

    def next_id(self) -> int:
        """An id no row has had (the directory is made before the row that claims it)."""
        with self.lock:
            r = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()
            used = self._db.execute("SELECT MAX(id) FROM snapshots").fetchone()[0] or 0
            return max(r[0] if r else 0, used) + 1

    def insert(self, key: str, parent: str, kind: int, labels: dict[str, str], *, sid: int,
               image: str = "", store: str = "") -> Snapshot:
        now = time.time()
        with self.lock:
            self._db.execute(f"INSERT INTO snapshots ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (sid, key, parent, kind, json.dumps(labels), now, now, image, store))
        return Snapshot(sid, key, parent, kind, dict(labels), now, now, image, store)

    def commit(self, key: str, name: str, labels: dict[str, str], image: str = "", store: str = "") -> Snapshot:
        """Turn active snapshot ``key`` into committed snapshot ``name`` (same id, directory)."""
        now = time.time()
        with self.lock:
            self._db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, image = ?, "
                             "store = ? WHERE key = ?",
                             (name, COMMITTED, json.dumps(labels), now, image, store, key))
        s = self.get(name)
        assert s is not None
        return s

    def update_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self.lock:
            self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                             (json.dumps(labels), time.time(), key))
        s = self.get(key)
        assert s is not None
        return s

    def delete(self, key: str) -> None:
        with self.lock:
            self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
