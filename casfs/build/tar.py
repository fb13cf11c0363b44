"""Build source: a tar archive (plain, gzip/bzip2/xz/zstd compressed) or a ``docker save`` tar.

A ``docker save`` archive is recognised by a top-level ``manifest.json`` listing one image's
``Layers``; its layers (tars inside the tar, each possibly compressed) are applied in order with
OCI whiteouts. Any other tar is one literal tree: ``.wh.`` names in it are ordinary files, as
``tar -x`` would leave them.

How names, duplicates, symlinks, hard links and whiteouts are treated is the contract in
:mod:`casfs.build.tree`. On top of it, per member:

* numeric uid/gid are used (user and group names are ignored); ids outside 0..2**32-1 are
  rejected;
* mtimes are kept to the nanosecond range of the index: negative mtimes (before 1970) are kept,
  absurd ones (beyond 1677..2262, or not a number) are clamped to that range, never rejected;
  a pax ``mtime`` record is read exactly from its decimal text (no float), so a tar of a tree
  and the tree give the same image id;
* pax ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` records become xattrs;
* regular files, directories, symlinks, hard links, character/block devices and fifos are
  supported; any other member type (GNU volume labels, multi-volume parts, ...) is rejected;
* a member whose data runs past the end of its archive, a corrupt header after the first one, a
  pax/GNU long-name header over ``MAX_META_BYTES``, and a sparse file over ``MAX_SPARSE_BYTES``
  are rejected (plain ``tarfile`` would silently stop at a corrupt header).

Nothing is extracted: file contents are read lazily from the archive by the packer, in archive
order. The archive (and every layer stream) stays open until :meth:`TarSource.close`.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import math
import os
import re
import stat as statmod
import sys
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterator, Mapping
from urllib.parse import unquote_to_bytes

import zstandard

from ..errors import BuildError
from ..index import NO_XATTRS
from . import source as _source
from .source import SourceEntry
from .tree import MAX_LAYERS, MAX_PATH, OPAQUE_MARKER, WHITEOUT_PREFIX, Inode, Tree, close_all, normalize_name

MAX_META_BYTES = 16 << 20  # pax extended headers and GNU long names
MAX_SPARSE_BYTES = 1 << 40  # logical size of one sparse member
MAX_MANIFEST_BYTES = 16 << 20
_INT64 = (-(1 << 63), (1 << 63) - 1)
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError,
                  ValueError, IndexError, OverflowError)
_NO_PAX: dict = {}  # shared by members without pax records (never written to)
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class _CorruptHeader(Exception):
    """Raised inside tarfile's parser; turned into a BuildError that names the archive."""


class _SafeTarInfo(tarfile.TarInfo):
    """tarfile's header parser with the holes a hostile archive could use closed.

    * A bad header after the first one is an error (tarfile treats it as the end of the archive,
      which would silently truncate the image); so is a header cut short.
    * A pax or GNU long-name header is read into memory whole: its size is capped.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:  # type: ignore[attr-defined]
            if tf.offset:
                raise _CorruptHeader(f"corrupt tar header at byte {tf.offset} ({e}); the archive is "
                                     "damaged or truncated") from None
            raise

    def _proc_member(self, tf):  # type: ignore[override]
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise _CorruptHeader(f"an extended (pax or GNU long name) header at byte {self.offset} claims "
                                 f"{self.size} bytes, over the {MAX_META_BYTES}-byte limit")
        return super()._proc_member(tf)


class _ZstdStream(io.RawIOBase):
    """A zstd-decompressed view of ``raw`` that tarfile can seek in.

    Forward seeks decompress and discard; a backward seek restarts from the beginning, so read
    front to back (the builders do: members are listed, then contents read in archive order).
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._start = raw.tell()
        self._reader = None
        self._restart()

    def _restart(self) -> None:
        self._raw.seek(self._start)
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._raw, read_across_frames=True,
                                                                  closefd=False)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._reader.readinto(b)  # type: ignore[union-attr]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a zstd stream cannot seek from its end")
        if offset < 0:
            raise ValueError("negative seek position")
        if offset < self._pos:
            self._restart()
        while self._pos < offset:
            got = len(self._reader.read(min(offset - self._pos, 1 << 20)))  # type: ignore[union-attr]
            if not got:
                break
            self._pos += got
        return self._pos


class _MemberReader(io.RawIOBase):
    """A member's content; archive damage found while reading becomes a BuildError."""

    def __init__(self, inner: BinaryIO, what: str, data_ranges: list | None = None) -> None:
        self._inner = inner
        self._what = what
        # a sparse member's (offset, length) data regions: the packer skips the holes
        self.data_ranges = data_ranges

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        try:
            return bool(self._inner.seekable())  # type: ignore[attr-defined]
        except (AttributeError, *_STREAM_ERRORS):
            return False

    def seek(self, pos: int, whence: int = 0) -> int:
        try:
            return self._inner.seek(pos, whence)
        except _STREAM_ERRORS as e:
            raise self._fail(e) from None

    def _fail(self, e: BaseException) -> BuildError:
        return BuildError(f"{self._what}: cannot read its content ({type(e).__name__}: {e}); the archive "
                          "is truncated or corrupt")

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        try:
            return self._inner.read(n)
        except _STREAM_ERRORS as e:
            raise self._fail(e) from None

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(b)  # type: ignore[attr-defined]
        except _STREAM_ERRORS as e:
            raise self._fail(e) from None

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def _stream_error(where: str, e: BaseException) -> BuildError:
    if isinstance(e, _CorruptHeader):
        return BuildError(f"{where}: {e}")
    if isinstance(e, tarfile.ReadError) and "unexpected end of data" in str(e):
        return BuildError(f"{where}: truncated archive: a member claims more data than the archive holds")
    return BuildError(f"{where}: corrupt or unreadable tar archive ({type(e).__name__}: {e})")


def open_tar(f: BinaryIO, where: str, size: int | None, keep: list) -> tuple[tarfile.TarFile | None, int | None]:
    """Open the tar in seekable stream ``f`` (gzip, bzip2, xz and zstd are detected by magic).

    Returns (tarfile or None for an empty stream, the stream's size when uncompressed and
    ``size`` was given, else None). Objects to close later are appended to ``keep``.

    Raises:
        BuildError: when the stream is not a tar archive or is damaged.
    """
    try:
        head = f.read(6)
        f.seek(0)
        if not head:
            return None, None
        if head.startswith(b"\x1f\x8b"):
            stream: BinaryIO = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
            size = None
        elif head.startswith(b"BZh"):
            stream = bz2.BZ2File(f)  # type: ignore[assignment]
            size = None
        elif head.startswith(b"\xfd7zXZ\x00"):
            stream = lzma.LZMAFile(f)  # type: ignore[assignment]
            size = None
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            stream = io.BufferedReader(_ZstdStream(f), 1 << 20)  # type: ignore[assignment]
            size = None
        else:
            stream = f
        if stream is not f:
            keep.append(stream)
        tf = tarfile.open(fileobj=stream, mode="r:", tarinfo=_SafeTarInfo, encoding="utf-8",
                          errors="surrogateescape")
    except BuildError:
        raise
    except tarfile.ReadError as e:
        raise BuildError(f"{where}: not a tar archive, or a damaged one ({e})") from None
    except (_CorruptHeader, *_STREAM_ERRORS) as e:
        raise _stream_error(where, e) from None
    keep.append(tf)
    return tf, size


def read_members(tf: tarfile.TarFile, where: str, size: int | None) -> list[tarfile.TarInfo]:
    """Every member of ``tf`` (after tarfile's pax/GNU processing), checked against ``size``.

    Raises:
        BuildError: on damage, a member running past the end of the stream, or more than
            ``source.MAX_ENTRIES`` members.
    """
    out: list[tarfile.TarInfo] = []
    limit = _source.MAX_ENTRIES
    while True:
        try:
            m = tf.next()
        except BuildError:
            raise
        except (_CorruptHeader, *_STREAM_ERRORS) as e:
            raise _stream_error(where, e) from None
        if m is None:
            tf.members = []  # tarfile's own copy of the list: the caller's is the only one kept
            return out
        # memory (#17: builds held ~2.5 KB per entry): share what most members repeat
        m.uname, m.gname = sys.intern(m.uname), sys.intern(m.gname)
        if not m.pax_headers:
            m.pax_headers = _NO_PAX
        if m.size < 0 or tf.offset <= m.offset:
            raise BuildError(f"{where}: corrupt tar header at byte {m.offset}: member {m.name[:200]!r} "
                             f"has a negative size ({m.size}) or points back into the archive")
        if m.issparse():
            _check_sparse(m, where, size)
        if size is not None and m.isreg() and not m.issparse() and m.offset_data + m.size > size:
            raise BuildError(f"{where}: member {m.name[:200]!r} claims {m.size} bytes but the archive ends "
                             f"{max(0, size - m.offset_data)} bytes after its header (truncated or corrupt)")
        out.append(m)
        if len(out) > limit:
            raise BuildError(f"{where}: more than {limit} members; split the archive or raise "
                             "casfs.build.source.MAX_ENTRIES")


def _check_sparse(m: tarfile.TarInfo, where: str, size: int | None) -> None:
    """Reject a sparse map tarfile could loop on or that runs past the archive."""
    end = stored = 0
    for off, n in m.sparse or ():
        if off < 0 or n < 0:
            off = -1  # reported below
        elif n == 0:
            continue  # GNU tar pads its maps with (0, 0) entries
        if off < end or off + n > m.size:
            raise BuildError(f"{where}: sparse member {m.name[:200]!r} has an unordered, overlapping or "
                             "out-of-range sparse map; the archive is corrupt")
        end = off + n
        stored += n
    if size is not None and m.offset_data + stored > size:
        raise BuildError(f"{where}: sparse member {m.name[:200]!r} claims {stored} stored bytes but the "
                         "archive ends before them (truncated or corrupt)")


def _xattrs(m: tarfile.TarInfo, what: str) -> Mapping[bytes, bytes]:
    if not m.pax_headers:
        return NO_XATTRS  # (shared: no dict per member)
    out: dict[bytes, bytes] = {}
    for key, value in m.pax_headers.items():
        try:
            if key.startswith("SCHILY.xattr."):
                name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
                data = value.encode("utf-8", "surrogateescape")
            elif key.startswith("LIBARCHIVE.xattr."):
                name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
                data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            else:
                continue
        except ValueError as e:
            raise BuildError(f"{what}: malformed xattr record {key[:80]!r} ({e})") from None
        if not name or b"\0" in name or len(name) > 255 or len(data) > 65536:
            raise BuildError(f"{what}: xattr {name[:80]!r} has an empty or over-long name (255 bytes max), "
                             f"a NUL byte, or a value over 64 KiB ({len(data)} bytes)")
        out[name] = data
    return out


_PAX_TIME = re.compile(r"^(-?)([0-9]{1,30})(?:\.([0-9]{0,30}))?$")


def _mtime_ns(mtime: float | int, pax: str | None = None) -> int:
    """The member's mtime in nanoseconds. A pax ``mtime`` record ("1700000000.123456789") is
    read from its text, digit by digit: tarfile turns it into a float, which keeps only about
    7 digits after the point at today's dates, so a tar of a tree and the tree itself gave
    different image ids (#17)."""
    if pax is not None:
        t = _PAX_TIME.match(pax.strip())
        if t:
            sign, secs, frac = t.groups()
            ns = int(secs) * 1_000_000_000 + int((frac or "")[:9].ljust(9, "0"))
            return min(max(-ns if sign else ns, _INT64[0]), _INT64[1])
    if isinstance(mtime, float):
        if math.isnan(mtime):
            return 0
        if math.isinf(mtime):
            return _INT64[1] if mtime > 0 else _INT64[0]
        ns = int(mtime * 1e9)
    else:
        ns = int(mtime) * 1_000_000_000
    return min(max(ns, _INT64[0]), _INT64[1])


class _Opener:
    """Opens one member's content (a callable the packer calls). A slotted object, not a
    closure: a closure and its cells cost ~220 bytes a file (#17: build memory per entry)."""

    __slots__ = ("tf", "m", "what")

    def __init__(self, tf: tarfile.TarFile, m: tarfile.TarInfo, what: str) -> None:
        self.tf, self.m, self.what = tf, m, what

    def __call__(self) -> BinaryIO:
        try:
            inner = self.tf.extractfile(self.m)
        except _STREAM_ERRORS as e:
            raise BuildError(f"{self.what}: cannot open its content ({e})") from None
        assert inner is not None
        sparse = self.m.sparse if self.m.issparse() else None
        return _MemberReader(inner, self.what, sparse)  # type: ignore[return-value]


def _opener(tf: tarfile.TarFile, m: tarfile.TarInfo, what: str) -> Callable[[], BinaryIO]:
    return _Opener(tf, m, what)


def member_inode(tf: tarfile.TarFile, m: tarfile.TarInfo, path: str, where: str, stream_no: int) -> Inode:
    """The inode a (non-hard-link) member describes.

    Raises:
        BuildError: on an unsupported type, ids out of range, a bad symlink target or xattr.
    """
    what = f"{where}: {path or '.'!r}"
    for name, v in (("uid", m.uid), ("gid", m.gid)):
        if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
            raise BuildError(f"{what}: {name} {v!r} is outside 0..4294967295")
    ino = Inode(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, mtime_ns=_mtime_ns(m.mtime, m.pax_headers.get("mtime")),
                xattrs=_xattrs(m, what))
    if m.isreg():
        if m.size < 0 or (m.issparse() and m.size > MAX_SPARSE_BYTES):
            raise BuildError(f"{what}: a {'sparse ' if m.issparse() else ''}file claiming {m.size} bytes; "
                             f"refusing it (sparse files are limited to {MAX_SPARSE_BYTES} bytes)")
        ino.mode |= statmod.S_IFREG
        ino.size = m.size
        if m.size:  # (an empty file needs no opener and no place in the reading order)
            ino.opener = _opener(tf, m, what)
            ino.order = (stream_no, m.offset_data)
            # the opener keeps this member for extractfile, which reads only its offsets, size,
            # type and sparse map: drop the strings and records already turned into the inode
            m.name = m.linkname = m.uname = m.gname = ""
            m.pax_headers = _NO_PAX
    elif m.isdir():
        ino.mode |= statmod.S_IFDIR
    elif m.issym():
        target = m.linkname.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target or len(target) >= MAX_PATH:
            raise BuildError(f"{what}: symlink with an empty target, a NUL byte in it, or a target of "
                             f"{len(target)} bytes (at most {MAX_PATH - 1}); Linux cannot represent it")
        ino.mode = statmod.S_IFLNK | 0o777
        ino.symlink = target
    elif m.ischr() or m.isblk():
        ino.mode |= statmod.S_IFCHR if m.ischr() else statmod.S_IFBLK
        try:
            ino.rdev = os.makedev(m.devmajor, m.devminor)
        except (OverflowError, ValueError, TypeError):
            raise BuildError(f"{what}: device numbers {m.devmajor}:{m.devminor} are out of range") from None
    elif m.isfifo():
        ino.mode |= statmod.S_IFIFO
    else:
        raise BuildError(f"{what}: unsupported tar member type {m.type!r}; only files, directories, "
                         "symlinks, hard links, devices and fifos can be in an image")
    return ino


def apply_members(tree: Tree, tf: tarfile.TarFile, members: list[tarfile.TarInfo], where: str,
                  stream_no: int, layer: bool) -> None:
    """Apply ``members`` of ``tf`` to ``tree``: as an image layer (whiteouts) or a literal tar.

    Raises:
        BuildError: for any member the rules of :mod:`casfs.build.tree` refuse.
    """
    tree.where = where
    placed: list[tuple[str, tarfile.TarInfo]] = []
    whiteouts: list[str] = []
    opaque: list[str] = []
    for m in members:
        path = normalize_name(m.name, where)
        if layer and path:
            parent, _, base = path.rpartition("/")
            if base == OPAQUE_MARKER:
                opaque.append(parent)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                victim = base[len(WHITEOUT_PREFIX):]
                if not victim or victim in (".", ".."):
                    raise BuildError(f"{where}: whiteout {path!r} names no file")
                whiteouts.append(f"{parent}/{victim}" if parent else victim)
                continue
        placed.append((path, m))
    # whiteouts hide lower layers only: apply them before this layer's own entries
    for p in whiteouts:
        tree.remove(p)
    for d in opaque:
        tree.clear(d)
    for path, m in placed:
        if m.islnk():
            tree.link(path, normalize_name(m.linkname, where))
        else:
            tree.put(path, member_inode(tf, m, path, where, stream_no))
    for d in opaque:
        tree.ensure_dir(d, "opaque-directory marker")


def _plain_name(name: str) -> str | None:
    try:
        return normalize_name(name, "")
    except BuildError:
        return None


def _resolve_lexically(base: str, target: str, where: str) -> str:
    parts = [] if target.startswith("/") else [p for p in base.split("/") if p]
    for p in target.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise BuildError(f"{where}: a layer symlink target {target!r} escapes the archive")
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


class TarSource:
    """A tar archive or ``docker save`` tar as a build source (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise BuildError(f"{path}: not a regular file")
        self.description = f"tar archive {self.path}"
        self._keep: list = []

    def entries(self) -> Iterator[SourceEntry]:
        """Every entry of the resulting tree (directories first, then files in archive order).

        Raises:
            BuildError: for damaged or hostile archives (see the module docstring).
        """
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise BuildError(f"{self.path}: cannot open: {e.strerror}") from None
        self._keep.append(f)
        where = self.description
        tf, size = open_tar(f, where, os.fstat(f.fileno()).st_size, self._keep)
        if tf is None:
            raise BuildError(f"{where}: the file is empty")
        members = read_members(tf, where, size)
        manifest = self._docker_manifest(tf, members)
        if manifest is None:
            tree = Tree(where)
            apply_members(tree, tf, members, where, 1, layer=False)
        else:
            self.description = where = f"docker-save archive {self.path}"
            tree = self._apply_layers(tf, members, manifest, where)
        yield from tree.entries()

    def _docker_manifest(self, tf: tarfile.TarFile, members: list[tarfile.TarInfo]) -> list[str] | None:
        """The layer names of a ``docker save`` archive, or None for a plain tar."""
        cand = [m for m in members if _plain_name(m.name) == "manifest.json" and m.isreg()]
        if not cand or cand[-1].size > MAX_MANIFEST_BYTES:
            return None
        m = cand[-1]
        try:
            data = json.loads(_MemberReader(tf.extractfile(m), self.description).read())  # type: ignore[arg-type]
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, list) or not all(isinstance(x, dict) and "Layers" in x for x in data):
            return None
        where = f"docker-save archive {self.path}"
        if len(data) != 1:
            tags = [t for x in data for t in (x.get("RepoTags") or [])]
            raise BuildError(f"{where}: manifest.json lists {len(data)} images ({', '.join(map(str, tags)) or 'untagged'}); "
                             "casfs builds one image: `docker save` just the one you want")
        layers = data[0]["Layers"]
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise BuildError(f"{where}: manifest.json 'Layers' must be a list of file names")
        if len(layers) > MAX_LAYERS:
            raise BuildError(f"{where}: {len(layers)} layers exceed the limit of {MAX_LAYERS}")
        return layers

    def _apply_layers(self, tf: tarfile.TarFile, members: list[tarfile.TarInfo], layers: list[str],
                      where: str) -> Tree:
        by_name: dict[str, tarfile.TarInfo] = {}
        for m in members:
            try:
                by_name[normalize_name(m.name, where)] = m
            except BuildError:
                continue  # never placed; a layer naming it fails below as "not in the archive"
        tree = Tree(where)
        for i, name in enumerate(layers, 1):
            m = self._layer_member(by_name, name, where)
            lwhere = f"{where}, layer {i} ({name})"
            stream = tf.extractfile(m)
            assert stream is not None
            self._keep.append(stream)
            ltf, lsize = open_tar(stream, lwhere, m.size, self._keep)  # type: ignore[arg-type]
            if ltf is None:
                continue  # an empty layer file
            apply_members(tree, ltf, read_members(ltf, lwhere, lsize), lwhere, i, layer=True)
        return tree

    @staticmethod
    def _layer_member(by_name: dict[str, tarfile.TarInfo], name: str, where: str) -> tarfile.TarInfo:
        """The regular-file member holding layer ``name``, following in-archive links lexically."""
        path = normalize_name(name, where)
        for _ in range(16):
            m = by_name.get(path)
            if m is None:
                raise BuildError(f"{where}: manifest.json names layer {name!r}, which is not in the archive")
            if m.issym():
                path = _resolve_lexically(path.rpartition("/")[0], m.linkname, where)
            elif m.islnk():
                path = normalize_name(m.linkname, where)
            elif m.isreg():
                return m
            else:
                raise BuildError(f"{where}: layer {name!r} is not a regular file in the archive")
        raise BuildError(f"{where}: layer {name!r}: too many levels of links")

    def close(self) -> None:
        """Close the archive and every layer stream (content openers stop working)."""
        close_all(self._keep)
