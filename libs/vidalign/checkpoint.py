"""Training checkpoints in a local directory: atomic, verified, pruned.

A checkpoint is a directory ``step-00000020/`` holding weights as safetensors,
optimizer and scheduler state (``torch.save``), and ``manifest.json`` listing
every file with its size and sha256. The directory is written under a
temporary name and renamed into place after the manifest: a reader never sees
a half-written checkpoint, and one without a manifest does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vidalign.errors import InvalidInput

MANIFEST = "manifest.json"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def state(self, name: str) -> Any:
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=False)


class LocalCheckpointer:
    def __init__(self, root: str | Path, keep_latest_k: int = 3) -> None:
        if keep_latest_k < 1:
            raise ValueError(f"keep_latest_k must be >= 1, got {keep_latest_k}")
        self.root = Path(root)
        self.keep_latest_k = keep_latest_k

    def save(
        self,
        step: int,
        *,
        weights: dict[str, dict[str, torch.Tensor]],
        state: dict[str, Any],
        meta: dict[str, Any],
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        for name, tensors in weights.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      tmp / f"{name}.safetensors")
        for name, obj in state.items():
            torch.save(obj, tmp / f"{name}.pt")
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
        }
        manifest = {"step": step, "created": time.time(), "files": files, "meta": meta}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if final.exists():  # a re-run of the same step after a crash: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name.split("-")[1])
            for p in self.root.iterdir()
            if p.name.startswith("step-") and (p / MANIFEST).is_file()
        )

    def latest(self) -> Checkpoint | None:
        steps = self.steps()
        return self.load(steps[-1]) if steps else None

    def load(self, step: int) -> Checkpoint:
        path = self.root / f"step-{step:08d}"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidInput(f"checkpoint {path}: unreadable manifest ({err})") from None
        for name, entry in manifest["files"].items():
            file = path / name
            if not file.is_file() or sha256_file(file) != entry["sha256"]:
                raise InvalidInput(
                    f"checkpoint {path}: {name} is missing or does not match its sha256 in the manifest"
                )
        return Checkpoint(step=manifest["step"], path=path, meta=manifest["meta"])

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_latest_k]:
            shutil.rmtree(self.root / f"step-{step:08d}", ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
