"""Exceptions raised by casfs. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class CasfsError(Exception):
    """Base class for every error casfs raises on purpose."""


class CorruptChunk(CasfsError):
    """A chunk frame is malformed, truncated, or its bytes do not match its digest."""


class CorruptIndex(CasfsError):
    """An image index is malformed, truncated, out of bounds, or fails its digest."""


class ChunkUnavailable(CasfsError):
    """No tier could deliver a verified copy of a chunk."""


class ImageNotFound(CasfsError):
    """A tag or image id names no image in the store."""


class PathNotFound(CasfsError):
    """A path does not exist inside an image."""


class NotAFile(CasfsError):
    """A read was asked of something that is not a regular file."""


class BuildError(CasfsError):
    """A build source is unusable or hostile (path escapes, bad archive, limits exceeded)."""


class StoreError(CasfsError):
    """A store URL is malformed or its backend cannot be reached or written."""
