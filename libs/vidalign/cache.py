"""vidalign's local cache: fetched artifacts and objects, run work dirs, generated tokenizers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$VIDALIGN_CACHE``, else ``~/.cache/vidalign``."""
    return Path(os.environ.get("VIDALIGN_CACHE", "~/.cache/vidalign")).expanduser()
