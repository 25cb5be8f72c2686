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


# --- the feature gap: does the teacher read F_V, and its frame order? --------------------

FEATURE_PERTURBATIONS = ("other_clip", "first_frame", "reversed", "shuffled")
"""How ``feature_gap`` spoils a clip's features: another clip's features (a derangement:
clip i gets clip i + 1's), its first frame's tokens for every frame, its frames reversed,
its frames in a fixed non-identity order. The last three keep the clip's content and
change only time: a teacher that reads F_V as an unordered set shows no gap there."""

FEATURE_GAP_TIMESTEPS = (500, 625, 750, 875)
"""Default timesteps of ``feature_gap``: the upper half of a 1000-step schedule, where the
noisy latents leave the most to the condition (a gap is sought in t in [500, 1000))."""


def perturb_features(features: torch.Tensor, how: str, frame_tokens: int, *, seed: int = 0) -> torch.Tensor:
    """``features`` (N, T * frame_tokens, d) frame-major, spoilt as ``how`` says
    (``FEATURE_PERTURBATIONS``)."""
    if how not in FEATURE_PERTURBATIONS:
        raise InvalidInput(f"perturbation: expected one of {FEATURE_PERTURBATIONS}, got {how!r}")
    n, tokens, d = features.shape
    if frame_tokens < 1 or tokens % frame_tokens:
        raise InvalidInput(
            f"features: {tokens} tokens are not a whole number of frames of {frame_tokens} tokens"
        )
    frames = features.reshape(n, tokens // frame_tokens, frame_tokens, d)
    t = frames.shape[1]
    if how == "other_clip":
        if n < 2:
            raise InvalidInput("other_clip: needs at least 2 clips to swap features between")
        return features.roll(-1, dims=0)
    if t < 2:
        raise InvalidInput(f"{how}: needs at least 2 frames of features, got {t}")
    if how == "first_frame":
        spoilt = frames[:, :1].expand_as(frames)
    elif how == "reversed":
        spoilt = frames.flip(1)
    else:  # shuffled: a fixed permutation with no frame in place
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(t, generator=g)
        while bool((order == torch.arange(t)).any()):
            order = torch.randperm(t, generator=g)
        spoilt = frames[:, order]
    return spoilt.reshape(n, tokens, d)


def feature_gap(
    teacher,
    ids: Sequence[str],
    features: torch.Tensor,
    *,
    adapter_id: str,
    frame_tokens: int,
    pixels: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
    perturbations: Sequence[str] = FEATURE_PERTURBATIONS,
    timesteps: Sequence[int] = FEATURE_GAP_TIMESTEPS,
    seed: int = 0,
    draws: int = 4,
) -> dict[str, list[Gap]]:
    """The teacher's mean loss with each clip's own features vs spoilt ones, per timestep.

    ``teacher`` is any Teacher (in-process or a gRPC client); the clips come as ``pixels``
    (N, F, H, W, 3) uint8 at the teacher's frames and size, or as ``latents``; ``captions``
    (the static ones VDA conditions on) or None for the features alone. Each pair uses the
    same sample ids, seed, draws and timesteps, so it differs only in the features; a
    ``Gap``'s ``relative`` is (spoilt - own) / own, positive when the teacher uses what the
    features carry. Returns perturbation -> gaps, one per timestep.
    """
    if (pixels is None) == (latents is None):
        raise InvalidInput("feature_gap: pass the clips as pixels or as latents, not both or neither")
    if len(ids) != len(features) or (captions is not None and len(captions) != len(ids)):
        raise InvalidInput(
            f"expected as many ids, features and captions, got {len(ids)}, {len(features)}, "
            f"{'none' if captions is None else len(captions)}"
        )
    spoilt = {how: perturb_features(features, how, frame_tokens, seed=seed) for how in perturbations}

    def mean_loss(feats: torch.Tensor, t: int) -> float:
        request = DenoisingLossRequest(
            sample_ids=list(ids), features=feats, pixels=pixels, latents=latents,
            captions=None if captions is None else list(captions), adapter_id=adapter_id,
            seed=seed, num_draws=draws, timesteps=[t] * draws,
        )
        return teacher.denoising_loss(request).losses.mean().item()

    gaps: dict[str, list[Gap]] = {how: [] for how in perturbations}
    for t in timesteps:
        own = mean_loss(features, t)
        for how, feats in spoilt.items():
            gaps[how].append(Gap(timestep=t, true_loss=own, wrong_loss=mean_loss(feats, t)))
    return gaps


def mean_relative(gaps: Sequence[Gap]) -> float:
    """The mean of the gaps' relative values (over timesteps)."""
    if not gaps:
        raise InvalidInput("gaps: expected at least one")
    return sum(g.relative for g in gaps) / len(gaps)
