"""The teacher's conditioning gap: can it tell the true motion description from a wrong one?

A teacher can only pass motion to the encoder through its conditioning if its
denoising loss depends on that conditioning. Before aligning anything, measure
the loss of each clip under its true caption and under the same caption with
the motion changed (the opposite direction), with the same timesteps and the
same noise (randomness is an input, so the pair differs only in the text). A
gap near zero means the noisy frames already tell the teacher everything at
those timesteps: align elsewhere (higher noise) or fix the teacher first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vidalign.data.toy import ToyClip
from vidalign.errors import InvalidInput
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.video import sample_frames

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

_SWAPS = {
    **OPPOSITE,
    "vertically": "horizontally",
    "horizontally": "vertically",
    "grows larger": "shrinks",
    "shrinks": "grows larger",
}
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(_SWAPS, key=len, reverse=True)) + r")\b")


def wrong_motion(caption: str, direction: str) -> str:
    """The caption with its direction replaced by the opposite one."""
    if direction not in OPPOSITE or not re.search(rf"\b{direction}\b", caption):
        raise InvalidInput(f"caption {caption!r} does not state the direction {direction!r}")
    return re.sub(rf"\b{direction}\b", OPPOSITE[direction], caption)


def swap_motion_words(caption: str) -> str:
    """Every direction, axis and growth word replaced by its opposite, in one pass.

    ``"slides left, then grows larger. The camera pans up."`` becomes
    ``"slides right, then shrinks. The camera pans down."``: the objects and the
    scene stay, the motion is wrong. A caption with none of the words is refused.
    """
    wrong = _SWAP_RE.sub(lambda m: _SWAPS[m.group(1)], caption)
    if wrong == caption:
        raise InvalidInput(f"caption {caption[:120]!r} states no direction, axis or growth")
    return wrong


@dataclass
class Gap:
    timestep: int
    true_loss: float
    wrong_loss: float

    @property
    def relative(self) -> float:
        """(wrong - true) / true: positive when the true description helps."""
        return (self.wrong_loss - self.true_loss) / self.true_loss


def conditioning_gap(
    teacher, clips: Sequence[ToyClip], *, timesteps: Sequence[int], seed: int = 0, draws: int = 4
) -> list[Gap]:
    """Mean loss with the true vs the wrong caption of toy clips, per timestep (paired draws)."""
    video = torch.stack([torch.from_numpy(c.video) for c in clips])
    return caption_gap(
        teacher,
        [c.clip_id for c in clips],
        video,
        [c.caption for c in clips],
        [wrong_motion(c.caption, c.direction) for c in clips],
        timesteps=timesteps,
        seed=seed,
        draws=draws,
    )


def caption_gap(
    teacher,
    ids: Sequence[str],
    video: torch.Tensor,
    true: Sequence[str],
    wrong: Sequence[str],
    *,
    timesteps: Sequence[int],
    seed: int = 0,
    draws: int = 4,
) -> list[Gap]:
    """Mean loss of uint8 clips ``(N, F, H, W, 3)`` under ``true`` vs ``wrong`` captions.

    Both passes use the same sample ids, seed, draws and timesteps, so the pair
    differs only in the text.
    """
    if not len(ids) == len(video) == len(true) == len(wrong):
        raise InvalidInput(
            f"expected as many ids, clips, true and wrong captions, got "
            f"{len(ids)}, {len(video)}, {len(true)}, {len(wrong)}"
        )
    info = teacher.info()
    pixels = sample_frames(video, info.frames, info.resolution)
    gaps = []
    for t in timesteps:
        losses = []
        for captions in (list(true), list(wrong)):
            request = DenoisingLossRequest(
                sample_ids=list(ids), pixels=pixels, captions=captions, seed=seed,
                num_draws=draws, timesteps=[t] * draws, model=info.model,
            )
            losses.append(teacher.denoising_loss(request).losses.mean().item())
        gaps.append(Gap(timestep=t, true_loss=losses[0], wrong_loss=losses[1]))
    return gaps
