"""Artifacts: a set of files committed atomically under one name, verified on read.

An artifact ``NAME`` is the objects ``NAME/<file>`` plus ``NAME/MANIFEST.json``,
which lists every file's path, size and sha256 together with the producer, a
config digest, a step and the creation time. The data files are written
first and the manifest last; an artifact without a manifest does not exist
for readers, so a commit interrupted at any point (a killed job, a dead S3
server) leaves nothing visible, and repeating the commit completes it.
Re-committing an existing name first removes its manifest (the artifact
disappears), then rewrites the files, then the manifest.

Every read checks the sha256 of what it read against the manifest; a
mismatch raises ``ArtifactCorrupted`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vidalign.errors import InvalidInput, NotFound
from vidalign.log import get_logger
from vidalign.store.base import Store, join, safe_key, sha256_file

log = get_logger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = 1


class ArtifactCorrupted(InvalidInput):
    """A file's bytes do not match the sha256 its manifest recorded."""


@dataclass(kw_only=True)
class Manifest:
    name: str
    files: dict[str, dict[str, Any]]
    """relative path -> {"size": int, "sha256": hex}"""
    producer: str
    config_digest: str = ""
    step: int | None = None
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            manifest = cls(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
            raise ArtifactCorrupted(f"{where}: unreadable manifest ({err})") from None
        if manifest.format != FORMAT:
            raise InvalidInput(f"{where}: manifest format {manifest.format}, this vidalign reads {FORMAT}")
        return manifest


def commit_artifact(
    store: Store,
    name: str,
    files: Mapping[str, str | Path | bytes],
    *,
    producer: str,
    config_digest: str = "",
    step: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Manifest:
    """Upload ``files`` (relative path -> local file or bytes) as artifact ``name``."""
    name = safe_key(name)
    if not files:
        raise InvalidInput(f"artifact {name}: no files to commit")
    entries: dict[str, dict[str, Any]] = {}
    for rel, source in files.items():
        rel = safe_key(rel)
        if rel == MANIFEST:
            raise InvalidInput(f"artifact {name}: '{MANIFEST}' is reserved")
        if isinstance(source, bytes):
            entries[rel] = {"size": len(source), "sha256": hashlib.sha256(source).hexdigest()}
        else:
            entries[rel] = {"size": os.path.getsize(source), "sha256": sha256_file(source)}
    manifest_key = join(name, MANIFEST)
    if store.exists(manifest_key):
        store.delete(manifest_key)  # uncommit first: readers never mix old manifest and new files
    for rel, source in files.items():
        key = join(name, safe_key(rel))
        if isinstance(source, bytes):
            store.put_bytes(key, source)
        else:
            store.put_file(key, source)
    manifest = Manifest(
        name=name,
        files=entries,
        producer=producer,
        config_digest=config_digest,
        step=step,
        meta=dict(meta or {}),
    )
    store.put_bytes(manifest_key, manifest.to_json())
    log.info("artifact_committed", uri=f"{store.uri}/{name}", files=len(entries),
             bytes=sum(e["size"] for e in entries.values()))
    return manifest


def read_manifest(store: Store, name: str) -> Manifest | None:
    """The manifest of a committed artifact, or None if ``name`` is not committed."""
    key = join(safe_key(name), MANIFEST)
    try:
        data = store.get_bytes(key)
    except NotFound:
        return None
    return Manifest.from_json(data, f"{store.uri}/{key}")


def _require(store: Store, name: str) -> Manifest:
    manifest = read_manifest(store, name)
    if manifest is None:
        raise NotFound(f"artifact {store.uri}/{name} is not committed (no {MANIFEST})")
    return manifest


def _entry(manifest: Manifest, store: Store, rel: str) -> dict[str, Any]:
    try:
        return manifest.files[safe_key(rel)]
    except KeyError:
        raise NotFound(
            f"artifact {store.uri}/{manifest.name} has no file '{rel}' "
            f"(files: {', '.join(manifest.files)})"
        ) from None


def read_artifact_file(store: Store, name: str, rel: str) -> bytes:
    """One file of a committed artifact, checked against its manifest."""
    manifest = _require(store, name)
    entry = _entry(manifest, store, rel)
    data = store.get_bytes(join(name, rel))
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ArtifactCorrupted(
            f"artifact {store.uri}/{name}: file '{rel}' does not match its manifest "
            f"(size {len(data)} vs {entry['size']}, or sha256 differs): corrupted or overwritten"
        )
    return data


def fetch_artifact(store: Store, name: str, dest: str | Path) -> Manifest:
    """Download every file of a committed artifact into ``dest``, verifying each.

    Files already in ``dest`` with the right sha256 are not downloaded again,
    so ``dest`` works as a cache.
    """
    manifest = _require(store, name)
    dest = Path(dest)
    for rel, entry in manifest.files.items():
        target = dest / rel
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue
        store.get_file(join(name, rel), target)
        if sha256_file(target) != entry["sha256"]:
            target.unlink(missing_ok=True)
            raise ArtifactCorrupted(
                f"artifact {store.uri}/{name}: file '{rel}' does not match the sha256 in its "
                "manifest: corrupted or overwritten"
            )
    return manifest


def list_artifacts(store: Store, prefix: str = "") -> list[str]:
    """Names of the committed artifacts under ``prefix``, sorted."""
    suffix = f"/{MANIFEST}"
    return sorted(k[: -len(suffix)] for k in store.list(prefix) if k.endswith(suffix))


def latest_artifact(store: Store, prefix: str) -> str | None:
    """The committed artifact under ``prefix`` with the largest step (then the newest)."""
    best: tuple[int, float, str] | None = None
    for name in list_artifacts(store, prefix):
        manifest = read_manifest(store, name)
        if manifest is None:
            continue
        key = (manifest.step if manifest.step is not None else -1, manifest.created, name)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


def prune_artifacts(store: Store, prefix: str, keep_latest_k: int) -> list[str]:
    """Delete all but the ``keep_latest_k`` committed artifacts with the largest steps.

    The manifest goes first, so a pruned artifact stops existing before its
    files are removed. Returns the deleted names.
    """
    if keep_latest_k < 1:
        raise InvalidInput(f"keep_latest_k must be >= 1, got {keep_latest_k}")
    ranked = []
    for name in list_artifacts(store, prefix):
        manifest = read_manifest(store, name)
        if manifest is not None:
            ranked.append((manifest.step if manifest.step is not None else -1, manifest.created, name))
    ranked.sort()
    doomed = [name for *_, name in ranked[:-keep_latest_k]]
    for name in doomed:
        store.delete(join(name, MANIFEST))
        store.delete_prefix(name)
    return doomed
