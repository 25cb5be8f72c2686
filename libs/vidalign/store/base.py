"""The object store interface: keys under a root URI, two real backends.

A ``Store`` is rooted at a URI: a local directory (a plain path or
``file:///abs/path``; the embedded default) or ``s3://bucket/prefix`` (MinIO
in deployment; any S3-compatible server). Keys are relative POSIX paths below
the root; a key can never leave the root (``..``, absolute paths, and on the
local backend symlinks pointing outside are refused with a clear error).

Objects are written whole: a reader sees the old object or the new one,
never a torn write. Multi-object atomicity (an artifact) is built on top of
that in ``vidalign.store.artifacts``: data first, manifest last.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from vidalign.errors import InvalidInput

BLOCK = 1 << 20


def safe_key(key: str) -> str:
    """Normalise ``key`` to a relative POSIX path inside the store, or raise InvalidInput."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"store key {key!r}: empty")
    if "\\" in key or "\x00" in key:
        raise InvalidInput(f"store key {key!r}: backslashes and NUL are not allowed")
    path = PurePosixPath(key)
    if path.is_absolute():
        raise InvalidInput(f"store key {key!r}: absolute paths are not allowed inside a store")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidInput(f"store key {key!r}: '..' would leave the store's root")
    if not parts:
        raise InvalidInput(f"store key {key!r}: names nothing")
    return "/".join(parts)


def join(*parts: str) -> str:
    """Join key parts (each validated); empty parts are skipped."""
    return safe_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


class Store(abc.ABC):
    """Keys -> bytes under one root URI."""

    uri: str

    def child(self, prefix: str) -> Store:
        """The store rooted at ``prefix`` below this one."""
        return self._child(safe_key(prefix))

    @abc.abstractmethod
    def _child(self, prefix: str) -> Store: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file, streaming (multipart on S3)."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download to ``path`` (written under a temporary name, then renamed)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` without reading the whole object."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted, relative to this store's root."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; no error if it does not exist."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def iter_chunks(self, key: str, chunk: int = 8 * BLOCK) -> Iterator[bytes]:
        """The object in ranged reads of ``chunk`` bytes (bounded memory)."""
        total = self.size(key)
        for offset in range(0, total, chunk):
            yield self.read_range(key, offset, min(chunk, total - offset))

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        for block in self.iter_chunks(key):
            digest.update(block)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
