"""The caption gap of a CogVideoX teacher: does its denoising depend on what the caption says?

MotionEnhancer's priors are where the teacher's motion tokens attend in the
video. They carry motion only if the teacher reads those tokens, so before
priors are extracted, measure the teacher's loss on clips under three captions:

- **own**: the clip's caption;
- **other**: another clip's caption (clip ``i`` takes clip ``i + 1``'s, cyclically):
  does the teacher read the caption at all?
- **swapped**: the clip's caption with its directions, axes and growth words
  swapped for their opposites (:func:`vidalign.gap.swap_motion_words`): does it
  read the *motion* words, not just the objects and the scene?

The loss is CogVideoX's training objective, the one the tiny teacher is
pretrained with (``vidalign_trainer.pretrain.text_to_video_cogvideox``, run by
``scripts/demo_assets.py``): the mean squared error of the transformer's
v-prediction against ``scheduler.get_velocity(z0, eps, t)``. The three captions
see the same clips, timesteps and noise (one draw per clip, timestep and seed,
seeded from all three), so each pair differs only in the text. A relative gap
``(loss_x - loss_own) / loss_own`` near zero means the teacher denoises as well
with the wrong text: its attention priors cannot say anything about motion.
This module only measures; the threshold to require is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidalign.errors import InvalidInput
from vidalign.gap import swap_motion_words
from vidalign.motionenhancer.cogvideox import CogVideoXTeacher
from vidalign.video import check_video, sample_frames, uniform_indices

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
"""Spread over the schedule, as the demo's AnimateDiff gap (``DemoConfig.gap_timesteps``)."""
DEFAULT_SEEDS = (0, 1)
"""Two noise draws per clip and timestep."""


def _relative(loss: float, own: float) -> float:
    return (loss - own) / own


@dataclass(frozen=True)
class CaptionGapAt:
    """Mean loss over clips and seeds at one timestep, under each caption."""

    timestep: int
    own_loss: float
    other_loss: float
    swapped_loss: float

    @property
    def other_gap(self) -> float:
        """(other - own) / own: positive when the clip's own caption helps."""
        return _relative(self.other_loss, self.own_loss)

    @property
    def swapped_gap(self) -> float:
        """(swapped - own) / own: positive when the true motion words help."""
        return _relative(self.swapped_loss, self.own_loss)


@dataclass(frozen=True)
class CaptionGap:
    """A teacher's caption gap over a fixed set of clips, timesteps and seeds."""

    per_timestep: tuple[CaptionGapAt, ...]
    clips: int
    seeds: tuple[int, ...]

    @property
    def other_gap(self) -> float:
        """Mean over timesteps of the relative gap with another clip's caption (each timestep
        weighs the same: losses differ in scale across the schedule, relative gaps do not)."""
        return float(np.mean([g.other_gap for g in self.per_timestep]))

    @property
    def swapped_gap(self) -> float:
        """Mean over timesteps of the relative gap with the motion words swapped."""
        return float(np.mean([g.swapped_gap for g in self.per_timestep]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary gaps and one row per timestep."""
        return {
            "clips": self.clips,
            "seeds": list(self.seeds),
            "other_gap": self.other_gap,
            "swapped_gap": self.swapped_gap,
            "per_timestep": [
                {
                    "timestep": g.timestep,
                    "own_loss": g.own_loss,
                    "other_loss": g.other_loss,
                    "swapped_loss": g.swapped_loss,
                    "other_gap": g.other_gap,
                    "swapped_gap": g.swapped_gap,
                }
                for g in self.per_timestep
            ],
        }


def teacher_clips(teacher: CogVideoXTeacher, videos: torch.Tensor) -> torch.Tensor:
    """uint8 (N, F, H, W, 3) -> the teacher's frame count and size, resampled as its
    pretraining resamples them (uniform frames, bilinear resize to a square teacher's side).

    A non-square teacher (the real CogVideoX, 480x720) takes clips already at its size.
    """
    check_video(videos, "videos")
    spec = teacher.spec
    if spec.height == spec.width:
        return sample_frames(videos, spec.frames, spec.height)
    if tuple(videos.shape[2:4]) != (spec.height, spec.width):
        raise InvalidInput(
            f"videos: {spec.name} is {spec.height}x{spec.width}; expected clips of that size, "
            f"got {videos.shape[2]}x{videos.shape[3]}"
        )
    return videos[:, uniform_indices(videos.shape[1], spec.frames)].contiguous()


def _noise(shape: torch.Size, seed: int, clip: int, timestep: int) -> torch.Tensor:
    """The noise of one (seed, clip, timestep): independent of how many clips or timesteps
    a call measures, so adding a clip does not change the others' draws."""
    state = np.random.SeedSequence([seed, clip, timestep]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randn(shape, generator=generator)


def _check_args(
    teacher: CogVideoXTeacher,
    videos: torch.Tensor,
    captions: Sequence[str],
    timesteps: Sequence[int],
    seeds: Sequence[int],
) -> None:
    if len(captions) != len(videos) or len(videos) < 2:
        raise InvalidInput(
            f"videos, captions: expected as many captions as clips and at least 2 clips (each is "
            f"measured against another's caption), got {len(videos)} clips, {len(captions)} captions"
        )
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise InvalidInput("captions: expected non-empty strings")
    n_train = teacher.scheduler.config.num_train_timesteps
    if not timesteps or not all(isinstance(t, int) and 0 <= t < n_train for t in timesteps):
        raise InvalidInput(
            f"timesteps: expected a non-empty list of integers in [0, {n_train}), got {list(timesteps)}"
        )
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise InvalidInput(f"seeds: expected a non-empty list of integers >= 0, got {list(seeds)}")


@torch.no_grad()
def caption_gap(
    teacher: CogVideoXTeacher,
    videos: torch.Tensor,
    captions: Sequence[str],
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
) -> CaptionGap:
    """The teacher's v-prediction loss on uint8 clips (N, F, H, W, 3) under their own
    captions, another clip's and their motion-swapped ones (module docstring).

    Each clip is VAE-encoded once and its three captions are denoised as one batch
    per (timestep, seed), with the same noisy latents. A caption with no direction,
    axis or growth word is refused (InvalidInput from ``swap_motion_words``).
    """
    _check_args(teacher, videos, captions, timesteps, seeds)
    clips = teacher_clips(teacher, videos)
    n = len(captions)
    swapped = [swap_motion_words(c) for c in captions]
    scheduler = teacher.scheduler
    # sums[t] = per-caption (own, other, swapped) loss summed over clips and seeds
    sums = {t: torch.zeros(3, dtype=torch.float64) for t in timesteps}
    for i in range(n):
        z0 = teacher.pad_latent_frames(teacher.encode_video(clips[i].numpy()))
        embeds = teacher.encode_prompt([captions[i], captions[(i + 1) % n], swapped[i]]).embeds
        for t in timesteps:
            step = torch.tensor([t], device=z0.device)
            for seed in seeds:
                eps = _noise(z0.shape, seed, i, t).to(z0)
                z_t = scheduler.add_noise(z0, eps, step)
                target = scheduler.get_velocity(z0, eps, step).float()
                pred = teacher.predict_velocity(z_t.expand(3, *z_t.shape[1:]), embeds, step)
                sums[t] += (pred.float() - target).pow(2).flatten(1).mean(1).double().cpu()
    count = n * len(seeds)
    rows = tuple(
        CaptionGapAt(t, *(float(loss) / count for loss in sums[t].tolist())) for t in timesteps
    )
    return CaptionGap(per_timestep=rows, clips=n, seeds=tuple(seeds))
