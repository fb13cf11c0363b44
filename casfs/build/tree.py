"""An in-memory image tree that archive members and image layers are applied to, safely.

The tar and OCI builders turn archive members into this tree, then hand its entries to the
packer. Archives are hostile input; the rules below are the contract (tests check each one):

* **Names.** Leading ``/`` is stripped (absolute names land under the image root, as GNU tar
  does without ``-P``); empty and ``.`` components are dropped. A name with any ``..``
  component, a NUL byte, a component over 255 bytes, or a total over 4096 bytes is rejected
  with :class:`BuildError`. ``..`` is rejected even where it would stay inside the root
  (``a/../b``): no legitimate archive writer produces it.
* **No symlink is ever followed.** Symlinks are data (their targets may point anywhere; a
  container runtime resolves them inside the root). Placing a member whose parent path crosses
  a symlink (or any other non-directory) already in the tree is rejected; hard-link targets and
  whiteouts are looked up the same way, without following symlinks.
* **Missing parents** are synthesised: mode 0o755, owner 0:0, mtime 0.
* **Duplicates: the last one wins**, as with tar extraction. A directory entry for an existing
  directory updates its metadata and keeps its children; any other replacement (a file replaced
  by a directory, a directory by a symlink, ...) drops what was there, subtree included.
* **Hard links** name a non-directory already in the tree (an earlier member, or a lower layer)
  and share its inode (its metadata and content). A missing or directory target is rejected.
* **Whiteouts** (layers only, :func:`apply_whiteouts`): ``.wh.NAME`` removes NAME from lower
  layers and ``.wh..wh..opq`` empties its directory of lower-layer content. They are applied
  before the layer's other entries, so they never hide entries of their own layer (OCI image
  spec, "whiteouts"). The markers themselves are not part of the image.
* **Limits.** At most ``source.MAX_ENTRIES`` live entries (read at call time).
"""

from __future__ import annotations

import stat as statmod
from collections import deque
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Mapping

from ..errors import BuildError
from ..index import NO_XATTRS, EntrySpec
from . import source as _source
from .source import SourceEntry

MAX_NAME = 255  # bytes per path component (Linux NAME_MAX)
MAX_PATH = 4096  # bytes per path (Linux PATH_MAX)
MAX_LAYERS = 1000  # layers per image (overlayfs stacks at most ~500 lower dirs)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _show(name: str) -> str:
    """A member name for an error message: repr'd, and shortened when absurdly long."""
    return repr(name) if len(name) <= 120 else repr(name[:100]) + f"... ({len(_enc(name))} bytes)"


def normalize_name(name: str, where: str) -> str:
    """Turn an archive member name into an image path ('' is the root).

    Raises:
        BuildError: for a NUL byte, a ``..`` component, or a component/path over the limits.
    """
    if "\x00" in name:
        raise BuildError(f"{where}: member name {_show(name)} contains a NUL byte; refusing it")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise BuildError(f"{where}: member name {_show(name)} has a '..' component, which could escape "
                         "the image root; refusing it (repack the archive with relative names)")
    for p in parts:
        if len(_enc(p)) > MAX_NAME:
            raise BuildError(f"{where}: member name {_show(name)} has a component of {len(_enc(p))} bytes; "
                             f"file names are limited to {MAX_NAME} bytes")
    path = "/".join(parts)
    if len(_enc(path)) > MAX_PATH:
        raise BuildError(f"{where}: member name {_show(name)} is {len(_enc(path))} bytes long; "
                         f"paths are limited to {MAX_PATH} bytes")
    return path


@dataclass(eq=False, slots=True)
class Inode:
    """What a path points at. Hard links are several tree nodes sharing one Inode object.

    ``order`` sorts regular files so the packer reads each archive stream front to back
    (``(stream number, data offset)``), which keeps compressed layers from rewinding.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    symlink: bytes | None = None
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)
    opener: Callable[[], BinaryIO] | None = None
    order: tuple[int, int] = (0, 0)


def synthetic_dir() -> Inode:
    """The inode of a directory an archive implies but does not contain."""
    return Inode(mode=statmod.S_IFDIR | 0o755)


class _Node:
    __slots__ = ("inode", "children")

    def __init__(self, inode: Inode, children: dict[str, "_Node"] | None) -> None:
        self.inode = inode
        self.children = children  # None for anything but a directory


def _subtree_size(node: _Node) -> int:
    n, todo = 0, [node]
    while todo:
        x = todo.pop()
        n += 1
        if x.children:
            todo.extend(x.children.values())
    return n


def _kind(mode: int) -> str:
    for test, word in ((statmod.S_ISDIR, "a directory"), (statmod.S_ISREG, "a regular file"),
                       (statmod.S_ISLNK, "a symlink"), (statmod.S_ISCHR, "a character device"),
                       (statmod.S_ISBLK, "a block device"), (statmod.S_ISFIFO, "a fifo")):
        if test(mode):
            return word
    return "a special file"


class Tree:
    """The image being assembled. ``where`` prefixes every error message (the archive's name)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.root = _Node(synthetic_dir(), {})
        self.count = 1

    # -- internals ----------------------------------------------------------------------------

    def _grow(self) -> None:
        self.count += 1
        limit = _source.MAX_ENTRIES
        if self.count > limit:
            raise BuildError(f"{self.where}: the image would have more than {limit} entries; "
                             "split it or raise casfs.build.source.MAX_ENTRIES")

    def _walk(self, path: str, create: bool, what: str) -> tuple[_Node | None, str]:
        """The directory node holding ``path``'s last component, and that component.

        With ``create``, missing directories are synthesised and a non-directory on the way is
        an error; without it, either gives (None, name).
        """
        parts = path.split("/")
        node = self.root
        for i, name in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                if not create:
                    return None, parts[-1]
                child = _Node(synthetic_dir(), {})
                node.children[name] = child
                self._grow()
            elif child.children is None:
                if not create:
                    return None, parts[-1]
                prefix = "/".join(parts[: i + 1])
                if statmod.S_ISLNK(child.inode.mode):
                    target = (child.inode.symlink or b"").decode("utf-8", "surrogateescape")
                    raise BuildError(
                        f"{self.where}: {what} {_show(path)} lies under {prefix!r}, which is a symlink "
                        f"(-> {target!r}); casfs never follows symlinks while placing archive members, "
                        "so it refuses this entry (add a directory entry for it first to replace the symlink)")
                raise BuildError(f"{self.where}: {what} {_show(path)} lies under {prefix!r}, which is "
                                 f"{_kind(child.inode.mode)}, not a directory")
            node = child
        return node, parts[-1]

    def _lookup(self, path: str) -> _Node | None:
        if path == "":
            return self.root
        parent, name = self._walk(path, False, "")
        return None if parent is None else parent.children.get(name)  # type: ignore[union-attr]

    # -- operations ---------------------------------------------------------------------------

    def put(self, path: str, inode: Inode) -> None:
        """Place ``inode`` at normalised ``path`` (last one wins; see the module docstring).

        Raises:
            BuildError: when a parent is a symlink or other non-directory, the root would stop
                being a directory, or the entry limit is exceeded.
        """
        is_dir = statmod.S_ISDIR(inode.mode)
        if path == "":
            if not is_dir:
                raise BuildError(f"{self.where}: the archive's root entry ('.') is {_kind(inode.mode)}; "
                                 "the root of an image must be a directory")
            self.root.inode = inode
            return
        parent, name = self._walk(path, True, "entry")
        assert parent is not None and parent.children is not None
        old = parent.children.get(name)
        if old is not None and old.children is not None and is_dir:
            old.inode = inode  # a directory declared again: new metadata, same children
            return
        if old is not None:
            self.count -= _subtree_size(old)
        parent.children[name] = _Node(inode, {} if is_dir else None)
        self._grow()

    def link(self, path: str, target: str) -> None:
        """Make ``path`` a hard link to the existing non-directory ``target``.

        Raises:
            BuildError: when the target is missing (or lies under a symlink) or is a directory.
        """
        node = self._lookup(target)
        if node is None:
            raise BuildError(f"{self.where}: hard link {_show(path)} -> {_show(target)}: the target is not "
                             "an earlier entry of the archive (or lies under a symlink, which casfs "
                             "does not follow)")
        if node.children is not None:
            raise BuildError(f"{self.where}: hard link {_show(path)} -> {_show(target)}: the target is a "
                             "directory; directories cannot be hard linked")
        self.put(path, node.inode)

    def remove(self, path: str) -> bool:
        """Remove ``path`` and its subtree if present (no symlink following). True if removed."""
        if path == "":
            return False
        parent, name = self._walk(path, False, "")
        if parent is None or parent.children is None or name not in parent.children:
            return False
        self.count -= _subtree_size(parent.children.pop(name))
        return True

    def clear(self, path: str) -> None:
        """Remove every child of directory ``path`` (no-op when it is missing or not a directory)."""
        node = self._lookup(path)
        if node is None or node.children is None:
            return
        for child in node.children.values():
            self.count -= _subtree_size(child)
        node.children.clear()

    def ensure_dir(self, path: str, what: str) -> None:
        """Make sure directory ``path`` exists, synthesising it (and parents) when missing.

        Raises:
            BuildError: when ``path`` or a parent exists and is not a directory.
        """
        node = self._lookup(path)
        if node is None:
            self.put(path, synthetic_dir())
        elif node.children is None:
            raise BuildError(f"{self.where}: {what} in {path!r}, which is {_kind(node.inode.mode)}, "
                             "not a directory")

    def entries(self) -> list[SourceEntry]:
        """The tree as build entries: every directory first (breadth-first, so parents precede
        children, the root first), then everything else with regular files in archive order.

        Paths sharing an inode get one ``link_group``; every one of them can be opened.
        """
        dirs: list[tuple[str, _Node]] = []
        others: list[tuple[str, _Node]] = []
        refs: dict[int, int] = {}
        todo: deque[tuple[str, _Node]] = deque([("", self.root)])
        while todo:
            path, node = todo.popleft()
            if node.children is None:
                others.append((path, node))
                refs[id(node.inode)] = refs.get(id(node.inode), 0) + 1
                continue
            dirs.append((path, node))
            for name in sorted(node.children, key=_enc):
                todo.append((f"{path}/{name}" if path else name, node.children[name]))
        others.sort(key=lambda pn: pn[1].inode.order)
        groups: dict[int, int] = {}
        out: list[SourceEntry] = []
        for path, node in dirs + others:
            ino = node.inode
            spec = EntrySpec(path=path, mode=ino.mode, uid=ino.uid, gid=ino.gid, mtime_ns=ino.mtime_ns,
                             rdev=ino.rdev, symlink=ino.symlink,
                             xattrs=dict(ino.xattrs) if ino.xattrs else NO_XATTRS)
            opener = None
            if statmod.S_ISREG(ino.mode):
                spec.size = ino.size
                opener = ino.opener if ino.size else None
            if node.children is None and refs[id(ino)] > 1:
                spec.link_group = ("inode", groups.setdefault(id(ino), len(groups)))
            out.append(SourceEntry(spec, opener))
        return out


def close_all(objs: list) -> None:
    """Close every object in ``objs``, newest first, ignoring errors; then empty the list."""
    for obj in reversed(objs):
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    objs.clear()
