"""Local copies of store objects and artifacts, for code that needs a file path.

Model loaders (``from_pretrained``), safetensors and PyAV read files. A URI
that names a committed artifact (a prefix holding ``MANIFEST.json``) becomes a
verified local directory; one that names a single object becomes a local
file. Both are cached under ``$VIDALIGN_CACHE`` by URI; a cached artifact is
re-verified against its manifest and only changed files are fetched again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vidalign.cache import cache_root
from vidalign.errors import NotFound
from vidalign.store.artifacts import fetch_artifact, read_manifest


def _cache(kind: str, uri: str) -> Path:
    return cache_root() / kind / hashlib.sha256(uri.encode()).hexdigest()[:24]


def is_store_uri(location: str) -> bool:
    return location.startswith(("s3://", "file://"))


def materialize(location: str) -> Path:
    """A local path for ``location``: itself if local, else a verified cached copy."""
    from vidalign.store import split_uri

    if not is_store_uri(location):
        return Path(location)
    parent, name = split_uri(location)
    if read_manifest(parent, name) is not None:
        dest = _cache("artifacts", location)
        fetch_artifact(parent, name, dest)
        return dest
    if not parent.exists(name):
        raise NotFound(f"{location}: neither a committed artifact nor an object")
    dest = _cache("objects", location) / name
    if not dest.is_file() or dest.stat().st_size != parent.size(name):
        parent.get_file(name, dest)
    return dest
