"""Artifacts by URI: a local directory (the default) or S3/MinIO.

    store = open_store("s3://vidalign/runs/exp1")        # or "runs/exp1", "file:///data/runs"
    commit_artifact(store, "checkpoints/step-00000020", {"encoder.safetensors": path}, producer="stage2")
    latest_artifact(store, "checkpoints")                  # newest committed name, or None

See ``vidalign.store.s3`` for the environment variables of the S3 backend.
"""

from __future__ import annotations

from urllib.parse import urlparse

from vidalign.errors import InvalidInput
from vidalign.store.artifacts import (
    MANIFEST,
    ArtifactCorrupted,
    Manifest,
    commit_artifact,
    fetch_artifact,
    latest_artifact,
    list_artifacts,
    prune_artifacts,
    read_artifact_file,
    read_manifest,
)
from vidalign.store.base import Store, join, safe_key, sha256_file
from vidalign.store.local import LocalStore


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def open_store(uri: str) -> Store:
    """A store rooted at ``uri``: a path, ``file:///abs/path`` or ``s3://bucket[/prefix]``."""
    if not uri:
        raise InvalidInput("store URI is empty")
    if uri.startswith("s3://"):
        from vidalign.store.s3 import S3Store

        parsed = urlparse(uri)
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInput(f"{uri}: file:// URIs name a local path (file:///abs/path)")
        return LocalStore(parsed.path)
    if "://" in uri:
        raise InvalidInput(f"{uri}: unsupported store scheme; use a path, file:// or s3://")
    return LocalStore(uri)


def split_uri(uri: str) -> tuple[Store, str]:
    """(store of the parent, last key) for an object URI like ``s3://b/adapters/a.safetensors``."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        key = parsed.path.strip("/")
        if "/" not in key:
            return open_store(f"s3://{parsed.netloc}"), safe_key(key)
        parent, name = key.rsplit("/", 1)
        return open_store(f"s3://{parsed.netloc}/{parent}"), name
    local = urlparse(uri).path if uri.startswith("file://") else uri
    parent, _, name = local.rstrip("/").rpartition("/")
    return open_store(parent or "."), safe_key(name)


from vidalign.store.materialize import is_store_uri, materialize  # noqa: E402

__all__ = [
    "MANIFEST",
    "ArtifactCorrupted",
    "LocalStore",
    "Manifest",
    "Store",
    "commit_artifact",
    "fetch_artifact",
    "is_remote",
    "is_store_uri",
    "join",
    "latest_artifact",
    "list_artifacts",
    "materialize",
    "open_store",
    "prune_artifacts",
    "read_artifact_file",
    "read_manifest",
    "safe_key",
    "sha256_file",
    "split_uri",
]
