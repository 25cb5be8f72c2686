"""Oracle features: can the teacher read F_V at all, given features that hold what it needs?

VDA's stage 2 teaches the encoder only through a teacher whose denoising loss
depends on the features. Whether it can is a property of the teacher and of the
conditioning route, not of any student, so it is measured with features that
carry the answer by construction: each teacher frame's own clean latents,
average-pooled to a G x G grid (:func:`oracle_features`). A stage-1 fit of W_proj
on them (:func:`fit_oracle_adapter`), then ``vidalign.gap.feature_gap`` on clips
the fit never saw, says how much a perfect encoder could move the loss: with
another clip's features, its frames reversed, its first frame repeated. If even
the oracle leaves the loss where it is, no encoder will (docs/design.md, "VDA
conditioning", has the measurements behind the ``spatial`` route).

The oracle's "student frames" are the teacher's own frames (T = F) and its d_v is
the latent channel count; ``frame_tokens`` is G * G, laid out as ``grid:G``
pooling lays a student's patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vidalign.errors import InvalidInput, require_finite
from vidalign.log import get_logger
from vidalign.vda.adapter import Adapter
from vidalign.vda.diffusion import DiffusionTeacher
from vidalign.vda.loss import denoising_loss

log = get_logger("vidalign.vda.oracle")

ORACLE_GRID = 4
"""Cells per side of the oracle's per-frame grid: 4 x 4 means of the latents hold where each
SynthMotion object is (one or two objects on a 32-pixel frame) and about a fifth of the
latents' variance; finer grids approach the latents themselves."""


def oracle_features(latents: Tensor, grid: int = ORACLE_GRID) -> Tensor:
    """``(N, C, F, h, w)`` clean latents -> ``(N, F * grid * grid, C)`` oracle F_V.

    Frame-major; within a frame, cell ``(i, j)`` is token ``i * grid + j`` (row-major, as
    ``grid:G`` pooling writes a student's tokens), the mean of the latents over that cell.
    """
    if latents.ndim != 5:
        raise InvalidInput(f"latents: expected (N, C, F, h, w), got {tuple(latents.shape)}")
    n, c, frames, h, w = latents.shape
    if not isinstance(grid, int) or grid < 1 or grid > min(h, w):
        raise InvalidInput(f"grid: expected an int in [1, {min(h, w)}] (the latent size), got {grid!r}")
    per_frame = latents.permute(0, 2, 1, 3, 4).reshape(n * frames, c, h, w)
    pooled = F.adaptive_avg_pool2d(per_frame, grid)  # (N*F, C, g, g)
    return pooled.reshape(n, frames, c, grid * grid).permute(0, 1, 3, 2).reshape(n, -1, c)


@dataclass
class OracleFit:
    """A stage-1 fit of W_proj on oracle features."""

    adapter: Adapter
    losses: list[float] = field(default_factory=list)
    """The mean denoising loss of every step."""


def fit_oracle_adapter(
    teacher: DiffusionTeacher,
    latents: Tensor,
    text_emb: Tensor | None,
    *,
    grid: int = ORACLE_GRID,
    conditioning: str = "spatial",
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 8,
    timestep_range: tuple[int, int] = (500, 1000),
    seed: int = 0,
    log_every: int = 25,
) -> OracleFit:
    """Stage 1 on oracle features: W_proj alone (no LoRA), AdamW, the teacher frozen.

    ``latents`` ``(N, C, F, h, w)`` are the fit's clips, ``text_emb`` their static
    captions' embeddings ``(N, L, D)`` (None: features alone). Batches are drawn with
    a generator seeded by ``seed``; step k's noise and timesteps use seed k, as
    ``denoising_loss`` draws them. The defaults are what gave the measurements in
    docs/design.md ("VDA conditioning").
    """
    require_finite("latents", latents)
    n = latents.shape[0]
    if text_emb is not None and text_emb.shape[0] != n:
        raise InvalidInput(f"text_emb: expected {n} rows (one per clip), got {text_emb.shape[0]}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name}: expected an int >= 1, got {value!r}")
    if not lr > 0:
        raise InvalidInput(f"lr: expected > 0, got {lr!r}")
    features = oracle_features(latents, grid)
    adapter = Adapter.create(
        d_v=latents.shape[1], cond_dim=teacher.cond_dim, teacher_family=teacher.family, seed=seed,
        teacher=teacher, conditioning=conditioning, frame_tokens=grid * grid,
    )
    adapter.to(teacher.device).train()
    params = list(adapter.proj.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).tolist()
        loss, _ = denoising_loss(
            teacher, adapter, latents[idx],
            text_emb=None if text_emb is None else text_emb[idx], features=features[idx],
            sample_ids=[f"oracle-{i}" for i in idx], seed=step, timestep_range=timestep_range,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log.info("oracle_fit_step", step=step + 1, steps=steps,
                     loss=round(sum(recent) / len(recent), 6))
    for p in params:
        p.requires_grad_(False)
    adapter.eval()
    return OracleFit(adapter=adapter, losses=losses)


def oracle_feature_gap(
    teacher: DiffusionTeacher,
    adapter_path: str,
    latents: Tensor,
    captions: Sequence[str] | None,
    *,
    timesteps: Sequence[int],
    seed: int = 0,
    draws: int = 2,
) -> dict:
    """``vidalign.gap.feature_gap`` of an oracle adapter (a file) on ``latents``' clips, in
    this process: perturbation -> one ``Gap`` per timestep. Pass clips the fit never saw."""
    from vidalign.gap import feature_gap
    from vidalign.teacher.denoising import TeacherEngine

    engine = TeacherEngine(teacher)
    info = engine.load_adapter(adapter_path)
    adapter = Adapter.load(adapter_path)
    grid = adapter.frame_grid
    return feature_gap(
        engine, [f"held-{i}" for i in range(len(latents))], oracle_features(latents, grid),
        adapter_id=info.id, frame_tokens=adapter.frame_tokens, latents=latents,
        captions=None if captions is None else list(captions), timesteps=timesteps, seed=seed,
        draws=draws,
    )
