"""A training run's output location: a store URI plus a local working directory.

Checkpoints and final artifacts go to the store (``<uri>/checkpoints/step-N``,
``<uri>/<artifact>``). The per-step metrics file is appended locally (one
line per step must not cost an upload) and travels inside every checkpoint,
so a resumed run restores exactly the history up to its checkpoint even if
the killed run had logged steps past it. For a local store the working
directory is the output directory itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vidalign.cache import cache_root
from vidalign.checkpoint import Checkpoint, Checkpointer
from vidalign.store import LocalStore, open_store

METRICS = "metrics.jsonl"


class RunDir:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.store = open_store(uri)
        if isinstance(self.store, LocalStore):
            self.work = self.store.root
        else:
            self.work = cache_root() / "runs" / hashlib.sha256(self.store.uri.encode()).hexdigest()[:16]
        self.work.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.work / METRICS

    def checkpointer(self, keep_latest_k: int) -> Checkpointer:
        return Checkpointer(
            self.store.child("checkpoints"),
            keep_latest_k=keep_latest_k,
            cache_dir=self.work / ".checkpoint-cache",
        )

    def start_metrics(self, checkpoint: Checkpoint | None) -> None:
        """Fresh history, or exactly the history saved with ``checkpoint``."""
        saved = checkpoint.file(METRICS) if checkpoint is not None else None
        if saved is not None and saved.is_file():
            self.metrics_path.write_bytes(saved.read_bytes())
        else:
            self.metrics_path.write_text("")

    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def publish_metrics(self) -> None:
        if not isinstance(self.store, LocalStore):
            self.store.put_file(METRICS, self.metrics_path)
