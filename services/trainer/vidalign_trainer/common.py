"""What the trainer jobs share: the data section, the toy dataset, ranks under torchrun.

Every source of randomness in a training job is a function of (seed, step):
``InMemoryClips.order`` gives the clips of a step's global batch, ``step_seed``
the teacher's seed for that step. A job resumed at step k therefore repeats
exactly what an uninterrupted one does, and data-parallel ranks agree on the
global batch and take their own slices of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput

# --- data -------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataConfig:
    kind: str = "toy"
    """``toy``: procedurally generated moving squares (vidalign.data.toy); ``synth``: a
    SynthMotion directory written by ``vidalign data synth`` (``path``)."""
    path: str = ""
    """SynthMotion directory (``kind: synth``)."""
    num_clips: int = 32
    """Clips to use (``synth``: the first ``num_clips`` of the directory, 0 for all)."""
    frames: int = 16
    size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("toy", "synth"):
            raise ValueError(f"data.kind: expected toy or synth, got {self.kind!r}")
        if self.kind == "synth" and not self.path:
            raise ValueError("data.path: kind synth needs the SynthMotion directory")
        if self.num_clips < (0 if self.kind == "synth" else 1):
            raise ValueError(f"data.num_clips must be >= 1, got {self.num_clips}")


TASKS = ("caption", "qa")
CAPTION_PROMPT = "Describe the video."
QA_PROMPT = "Which direction does the square move?"
"""The toy clips' question (SynthMotion's come with their own prompts)."""


@dataclass(kw_only=True)
class InstructionDataConfig(DataConfig):
    """Clips as (prompt, target) pairs: their captions and/or their questions."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """``caption`` ("Describe the video." -> the caption) and/or ``qa`` (toy: the direction
    question; synth: every SynthMotion question with the prompt and answer the evaluation uses)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise ValueError(
                f"data.tasks: expected a non-empty subset of {list(TASKS)}, got {self.tasks}"
            )


@dataclass
class ClipBatch:
    """Some clips of a dataset, in the order asked for."""

    ids: list[str]
    video: torch.Tensor
    """uint8 (B, F, H, W, 3)."""
    static_captions: list[str]


class ClipDataset(Protocol):
    """What the trainer jobs need from a dataset (real datasets plug in here)."""

    ids: list[str]
    """Clip ids, unique and stable: F_V, latents and draws are keyed by them."""
    static_captions: list[str]
    """One static-only caption per clip (same order as ``ids``): no video read."""

    def clips(self, indices: Sequence[int]) -> ClipBatch: ...

    def order(self, step: int, batch_size: int, seed: int) -> list[int]: ...


class InMemoryClips:
    """Clips in memory: moving squares (``data.kind: toy``) or SynthMotion (``synth``)."""

    def __init__(self, config: DataConfig) -> None:
        if config.kind == "synth":
            from vidalign.data.synthset import load_synth_set

            synth = load_synth_set(
                config.path, num_clips=config.num_clips, frames=config.frames, size=config.size
            )
            self.ids, self.videos = synth.ids, synth.videos
            self.static_captions = synth.static_captions
            return
        clips = moving_squares(
            config.num_clips, frames=config.frames, size=config.size, seed=config.seed
        )
        self.ids = [c.clip_id for c in clips]
        self.videos = torch.stack([torch.from_numpy(c.video) for c in clips])
        self.static_captions = [c.static_caption for c in clips]

    def __len__(self) -> int:
        return len(self.ids)

    def order(self, step: int, batch_size: int, seed: int) -> list[int]:
        return epoch_order(len(self.ids), step, batch_size, seed)

    def clips(self, indices: Sequence[int]) -> ClipBatch:
        picks = list(indices)
        return ClipBatch(
            ids=[self.ids[i] for i in picks],
            video=self.videos[picks],
            static_captions=[self.static_captions[i] for i in picks],
        )

    def batch(self, step: int, batch_size: int, seed: int) -> ClipBatch:
        return self.clips(self.order(step, batch_size, seed))


def epoch_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch over ``n`` examples: a fresh permutation each epoch.

    A function of (n, step, batch size, seed) only, so a resumed job continues
    the same sequence and data-parallel ranks agree on the global batch.
    """
    picks = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picks.append(int(order[offset]))
    return picks


def open_dataset(config: DataConfig) -> ClipDataset:
    """The dataset a ``data`` config section names."""
    if config.kind in ("toy", "synth"):
        return InMemoryClips(config)
    raise InvalidInput(f"data.kind: no dataset of kind {config.kind!r}")


def step_seed(seed: int, step: int) -> int:
    """The teacher's seed for one step: distinct across steps and runs."""
    return (seed << 32) | step


# --- ranks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun's rendezvous from the environment; world size 1 without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def global_mean(value: torch.Tensor, ranks: Dist) -> float:
    """The mean of a scalar over ranks (each rank holds the mean of an equal slice)."""
    if ranks.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ranks.world_size
    return value.item()
