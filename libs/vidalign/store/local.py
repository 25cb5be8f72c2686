"""The local-directory store: the embedded default (a plain path or ``file://``)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from vidalign.errors import InvalidInput, NotFound
from vidalign.store.base import BLOCK, Store, safe_key


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / prefix)

    def _path(self, key: str) -> Path:
        """The file for ``key``; refuses keys that resolve outside the root (symlinks)."""
        path = self.root / safe_key(key)
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise InvalidInput(
                f"store key {key!r} resolves to {resolved}, outside the store root {root} "
                "(a symlink points out of the store)"
            )
        return path

    def _write_atomic(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as src:
            self._write_atomic(self._path(key), lambda dst: shutil.copyfileobj(src, dst, BLOCK))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(self._path(key), lambda dst: dst.write(data))

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{self.uri}/{key} does not exist")
        return path

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._existing(key)
        dest = Path(path)
        with open(src, "rb") as f:
            self._write_atomic(dest.absolute(), lambda dst: shutil.copyfileobj(f, dst, BLOCK))

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self._existing(key), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [safe_key(prefix)]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".") and name.endswith(".part"):
                    continue  # an upload in progress
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
