"""Training checkpoints as store artifacts: atomic, verified, pruned, resumable.

A checkpoint ``step-00000020`` holds weights as safetensors, optimizer and
scheduler state and RNG states (``torch.save``), the trainer's position in
the data (``trainer_state.json``) and any extra files (the loss history).
It is committed like every artifact — files first, manifest last — so a job
killed while saving leaves the previous checkpoint as the newest one, and
``latest()`` never returns a half-written checkpoint. Old checkpoints are
pruned to ``keep_latest_k``.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vidalign.errors import NotFound
from vidalign.store import (
    LocalStore,
    Store,
    fetch_artifact,
    latest_artifact,
    open_store,
    prune_artifacts,
    read_manifest,
)
from vidalign.store.artifacts import ArtifactCorrupted, commit_artifact
from vidalign.store.base import sha256_file

TRAINER_STATE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every global RNG a training loop might touch."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A committed checkpoint, its files verified and available under ``path``."""

    name: str
    step: int
    path: Path
    meta: dict[str, Any]
    config_digest: str = ""
    """Digest of the config that wrote it (``vidalign.config.config_digest``)."""

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def state(self, name: str) -> Any:
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=False)

    def trainer_state(self) -> dict[str, Any]:
        return json.loads((self.path / TRAINER_STATE).read_text())

    def file(self, rel: str) -> Path:
        return self.path / rel


class Checkpointer:
    """Saves and finds checkpoints under a store URI (local dir or s3://)."""

    def __init__(
        self, store: Store | str, *, keep_latest_k: int = 3, cache_dir: str | Path | None = None
    ) -> None:
        if keep_latest_k < 1:
            raise ValueError(f"keep_latest_k must be >= 1, got {keep_latest_k}")
        self.store = open_store(store) if isinstance(store, str) else store
        self.keep_latest_k = keep_latest_k
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="vidalign-ckpt-"))

    def save(
        self,
        step: int,
        *,
        weights: Mapping[str, Mapping[str, torch.Tensor]],
        state: Mapping[str, Any],
        trainer_state: Mapping[str, Any],
        producer: str,
        config_digest: str = "",
        meta: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, str | Path | bytes] | None = None,
    ) -> str:
        name = f"step-{step:08d}"
        with tempfile.TemporaryDirectory(prefix="vidalign-save-") as tmp:
            files: dict[str, str | Path | bytes] = {}
            for key, tensors in weights.items():
                path = Path(tmp) / f"{key}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
                files[path.name] = path
            for key, obj in state.items():
                path = Path(tmp) / f"{key}.pt"
                torch.save(obj, path)
                files[path.name] = path
            files[TRAINER_STATE] = json.dumps({"step": step, **trainer_state}, indent=2).encode()
            files.update(extra_files or {})
            commit_artifact(
                self.store, name, files, producer=producer, config_digest=config_digest,
                step=step, meta=meta,
            )
        prune_artifacts(self.store, "", self.keep_latest_k)
        return name

    def latest(self) -> Checkpoint | None:
        name = latest_artifact(self.store, "")
        return None if name is None else self.load(name)

    def load(self, name: str) -> Checkpoint:
        manifest = read_manifest(self.store, name)
        if manifest is None:
            raise NotFound(f"checkpoint {self.store.uri}/{name} is not committed")
        if isinstance(self.store, LocalStore):
            # Already on disk: verify in place instead of copying.
            path = self.store.root / name
            for rel, entry in manifest.files.items():
                if not (path / rel).is_file() or sha256_file(path / rel) != entry["sha256"]:
                    raise ArtifactCorrupted(
                        f"checkpoint {self.store.uri}/{name}: file '{rel}' does not match the "
                        "sha256 in its manifest: corrupted or overwritten"
                    )
        else:
            path = self.cache_dir / name
            fetch_artifact(self.store, name, path)
        assert manifest.step is not None
        return Checkpoint(
            name=name, step=manifest.step, path=path, meta=manifest.meta,
            config_digest=manifest.config_digest,
        )
