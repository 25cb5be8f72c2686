"""VDA's denoising loss and its gradient with respect to the encoder features.

L = || eps - eps_theta(z_t, t, [text_emb; W_proj(F_V)]) ||^2   (VDA eq. 3/4)

How the W_proj(F_V) tokens reach the F frames is the adapter's ``conditioning``
(``vidalign.vda.adapter``): one context for all frames (``"context"``,
``"frame_pos"``), under ``"frame"`` per teacher frame the text and the tokens of
the student frame at its time, or, under ``"spatial"``, the tokens of that
student frame as a feature map added to the UNet's first one (text alone as the
context).

Randomness is an input (docs/design.md, decision 2): the timestep and noise of sample b,
draw k come only from ``draw_generator(seed, sample_id, k)``, so any replica,
retry or in-process check computes the same loss and the same dL/dF_V.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vidalign.errors import InvalidInput, require_finite
from vidalign.vda.adapter import Adapter, frame_sources
from vidalign.vda.diffusion import DiffusionTeacher

_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed takes a non-negative int64


def draw_generator(seed: int, sample_id: str, draw: int) -> torch.Generator:
    """A CPU generator seeded from sha256(f"{seed}:{sample_id}:{draw}") (first 8 bytes, big-endian)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}:{draw}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "big") & _SEED_MASK)


def _check_inputs(
    teacher: DiffusionTeacher,
    adapter: Adapter | None,
    latents: Tensor,
    text_emb: Tensor | None,
    features: Tensor | None,
    sample_ids: Sequence[str],
) -> None:
    if latents.ndim != 5 or latents.shape[1] != teacher.latent_channels:
        raise InvalidInput(
            f"latents: expected (B, {teacher.latent_channels}, F, h, w), got {tuple(latents.shape)}"
        )
    require_finite("latents", latents)
    batch = latents.shape[0]
    if len(sample_ids) != batch or not all(isinstance(s, str) and s for s in sample_ids):
        raise InvalidInput(
            f"sample_ids: expected {batch} non-empty strings (one per latent), got {list(sample_ids)!r:.200}"
        )
    if text_emb is None and features is None:
        raise InvalidInput("text_emb, features: expected at least one conditioning, got neither")
    if text_emb is not None:
        if (
            text_emb.ndim != 3
            or text_emb.shape[0] != batch
            or text_emb.shape[2] != teacher.cond_dim
        ):
            raise InvalidInput(
                f"text_emb: expected ({batch}, L, {teacher.cond_dim}), got {tuple(text_emb.shape)}"
            )
        require_finite("text_emb", text_emb)
    if features is not None:
        if adapter is None:
            raise InvalidInput("adapter: features need an adapter to project them, got None")
        if features.ndim != 3 or features.shape[0] != batch:
            raise InvalidInput(
                f"features: expected ({batch}, T, {adapter.d_v}), got {tuple(features.shape)}"
            )
        adapter.student_frames(features)
        require_finite("features", features)
    if adapter is not None:
        if adapter.cond_dim != teacher.cond_dim:
            raise InvalidInput(
                f"adapter.cond_dim: expected the teacher's {teacher.cond_dim}, got {adapter.cond_dim}"
            )
        if adapter.conditioning == "spatial" and adapter.spatial_channels != teacher.spatial_channels:
            raise InvalidInput(
                f"adapter.spatial_channels: expected the teacher's {teacher.spatial_channels} "
                f"(its first feature map), got {adapter.spatial_channels}"
            )
        if adapter.lora_rank > 0 and adapter.teacher_family != teacher.family:
            raise InvalidInput(
                f"adapter.teacher_family: its LoRA is for {adapter.teacher_family!r}, "
                f"the teacher is {teacher.family!r}"
            )


def _draw_plan(
    teacher: DiffusionTeacher,
    num_draws: int,
    draws: Sequence[int] | None,
    timestep_range: tuple[int, int] | None,
    timesteps: Sequence[int] | None,
) -> tuple[list[int], tuple[int, int], list[int] | None]:
    """Validated draw indices, timestep range and explicit timesteps."""
    n = teacher.num_train_timesteps
    if draws is None:
        if not isinstance(num_draws, int) or num_draws < 1:
            raise InvalidInput(f"num_draws: expected an int >= 1, got {num_draws!r}")
        draws = list(range(num_draws))
    elif len(draws) == 0 or any(not isinstance(d, int) or d < 0 for d in draws):
        raise InvalidInput(f"draws: expected non-empty ints >= 0, got {list(draws)!r}")
    lo, hi = (0, n) if timestep_range is None else timestep_range
    if not 0 <= lo < hi <= n:
        raise InvalidInput(f"timestep_range: expected 0 <= lo < hi <= {n}, got ({lo}, {hi})")
    if timesteps is not None:
        if len(timesteps) != len(draws) or any(not 0 <= int(t) < n for t in timesteps):
            raise InvalidInput(
                f"timesteps: expected {len(draws)} ints in [0, {n}) (one per draw), "
                f"got {list(timesteps)!r}"
            )
        timesteps = [int(t) for t in timesteps]
    return list(draws), (lo, hi), timesteps


def _conditioning(
    adapter: Adapter | None,
    text_emb: Tensor | None,
    features: Tensor | None,
    device: torch.device,
    frames: int,
) -> Tensor:
    """The cross-attention context [text_emb; W_proj(F_V)] for ``frames`` teacher frames.

    ``(B, L, D)``, shared by every frame, unless the adapter's conditioning is
    ``"frame"``: then ``(B, frames, L, D)``, frame f holding the text tokens and the
    projected tokens of student frame ``frame_sources(frames, T)[f]``. Either way
    it is differentiable w.r.t. ``features`` and the adapter's projection.
    (``"spatial"`` features are not part of the context: ``_spatial_residual``.)
    """
    text = None if text_emb is None else text_emb.to(device, torch.float32)
    if features is None or adapter.conditioning == "spatial":
        assert text is not None, "denoising_loss gives 'spatial' a context and _check_inputs the rest"
        return text
    projected = adapter.project(features).to(device, torch.float32)
    if adapter.conditioning != "frame":
        return projected if text is None else torch.cat([text, projected], dim=1)
    per_frame = _per_teacher_frame(adapter, projected, frames)
    if text is None:
        return per_frame
    return torch.cat([text.unsqueeze(1).expand(-1, frames, -1, -1), per_frame], dim=2)


def _per_teacher_frame(adapter: Adapter, projected: Tensor, frames: int) -> Tensor:
    """``(B, T * frame_tokens, D)`` projected tokens -> ``(B, frames, frame_tokens, D)``:
    teacher frame f gets the tokens of student frame ``frame_sources(frames, T)[f]``."""
    batch, count, dim = projected.shape
    student = count // adapter.frame_tokens  # a whole number: project() checked it
    index = torch.tensor(frame_sources(frames, student), device=projected.device)
    return projected.reshape(batch, student, adapter.frame_tokens, dim).index_select(1, index)


def _spatial_residual(
    adapter: Adapter | None, features: Tensor | None, device: torch.device, latent_shape: torch.Size
) -> Tensor | None:
    """Under ``"spatial"`` conditioning, the map added to the UNet's first feature map.

    ``(B, F, spatial_channels, h, w)``: teacher frame f's G x G grid of projected
    tokens of student frame ``frame_sources(F, T)[f]`` (row-major, as ``grid:G``
    pooling writes them), resized to the latent size by nearest neighbour (each
    token covers its own cell of the frame). None in the other modes. Linear in
    W_proj(F_V), so dL/dF_V flows back through it.
    """
    if features is None or adapter is None or adapter.conditioning != "spatial":
        return None
    batch, _, frames, height, width = latent_shape
    grid = adapter.frame_grid
    per_frame = _per_teacher_frame(adapter, adapter.project(features).to(device, torch.float32), frames)
    maps = per_frame.transpose(2, 3).reshape(batch * frames, -1, grid, grid)
    maps = F.interpolate(maps, size=(height, width), mode="nearest")
    return maps.reshape(batch, frames, *maps.shape[1:])


def _attached_lora(teacher: DiffusionTeacher, adapter: Adapter | None) -> str | None:
    """The teacher-side name of the adapter's LoRA, attaching it on first use."""
    if adapter is None or adapter.lora_rank == 0:
        return None
    if adapter.lora_name not in teacher.lora_names:
        teacher.attach_lora(adapter.lora_name, adapter.lora_config(), adapter.lora_state)
    return adapter.lora_name


def _text_context(
    teacher: DiffusionTeacher, adapter: Adapter | None, text_emb: Tensor | None,
    features: Tensor | None, batch: int,
) -> Tensor | None:
    """``text_emb``, or under ``spatial`` conditioning without text the empty caption's
    embedding for each of ``batch`` samples: the features are not a context there, so the
    UNet attends to its own unconditional context (encoded once, shared)."""
    if text_emb is not None or features is None or adapter is None or adapter.conditioning != "spatial":
        return text_emb
    with torch.no_grad():
        empty = teacher.encode_text([""])
    return empty.expand(batch, *empty.shape[1:])


def denoising_loss(
    teacher: DiffusionTeacher,
    adapter: Adapter | None,
    latents: Tensor,
    *,
    text_emb: Tensor | None,
    features: Tensor | None,
    sample_ids: Sequence[str],
    seed: int,
    num_draws: int = 1,
    timestep_range: tuple[int, int] | None = None,
    timesteps: Sequence[int] | None = None,
    draws: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample, per-draw denoising losses ``(B, K)`` float32 and their timesteps ``(B, K)`` int64.

    ``latents`` are clean VAE latents ``(B, C, F, h, w)``. ``text_emb`` None is
    VDA's no-text ablation; ``features`` None conditions on text alone. The
    result is differentiable w.r.t. ``features`` and the adapter's projection.
    Draw k uses draw index ``draws[k]`` (default ``k``) and timestep
    ``timesteps[k]`` when given; all B samples share one UNet call per draw.
    ``seeds`` (one per sample) replaces ``seed`` sample by sample: requests with
    different seeds joined into one batch (the teacher's dynamic batching) draw
    exactly what each would draw alone.
    """
    _check_inputs(teacher, adapter, latents, text_emb, features, sample_ids)
    if seeds is not None and len(seeds) != len(sample_ids):
        raise InvalidInput(f"seeds: expected {len(sample_ids)} (one per sample), got {len(seeds)}")
    per_sample = [seed] * len(sample_ids) if seeds is None else list(seeds)
    draws, (lo, hi), timesteps = _draw_plan(teacher, num_draws, draws, timestep_range, timesteps)
    device = teacher.device
    z0 = latents.to(device, torch.float32)
    text_emb = _text_context(teacher, adapter, text_emb, features, z0.shape[0])
    cond = _conditioning(adapter, text_emb, features, device, z0.shape[2])
    residual = _spatial_residual(adapter, features, device, z0.shape)
    losses, used = [], []
    with teacher.lora(_attached_lora(teacher, adapter)):
        for k, draw in enumerate(draws):
            t_k, eps_k = [], []
            for sample_id, sample_seed in zip(sample_ids, per_sample, strict=True):
                g = draw_generator(sample_seed, sample_id, draw)
                # t before eps: the order is part of the reproducibility contract.
                if timesteps is None:
                    t_k.append(torch.randint(lo, hi, (1,), generator=g))
                else:
                    t_k.append(torch.tensor([timesteps[k]]))
                eps_k.append(torch.randn(z0.shape[1:], generator=g))
            t = torch.cat(t_k)
            eps = torch.stack(eps_k).to(device)
            z_t = teacher.add_noise(z0, eps, t)
            eps_pred = teacher.predict_noise(z_t, t.to(device), cond, residual)
            losses.append((eps_pred - eps).square().flatten(1).mean(dim=1))
            used.append(t)
    return torch.stack(losses, dim=1), torch.stack(used, dim=1)


@dataclass
class DenoisingLossResult:
    """What the teacher returns for one batch."""

    losses: Tensor
    """(B, K) float32 denoising losses, one per sample and draw."""
    timesteps: Tensor
    """(B, K) int64 timesteps the draws used."""
    grad: Tensor | None
    """(B, T, d_v) float32 d(mean_k losses[b]) / d features[b]; None unless asked for."""


def loss_and_grad(
    teacher: DiffusionTeacher,
    adapter: Adapter | None,
    latents: Tensor,
    *,
    text_emb: Tensor | None,
    features: Tensor | None,
    sample_ids: Sequence[str],
    seed: int,
    num_draws: int = 1,
    timestep_range: tuple[int, int] | None = None,
    timesteps: Sequence[int] | None = None,
    want_grad: bool,
    seeds: Sequence[int] | None = None,
) -> DenoisingLossResult:
    """The teacher side of stage 2: losses and, if ``want_grad``, dL/dF_V for the remote backward.

    Each draw is a separate forward + backward, so memory holds one draw's graph
    at a time. Samples are independent, so the gradient of the batch sum w.r.t.
    the features is each sample's own gradient. Only the features get a gradient:
    no teacher or adapter ``.grad`` is written.
    """
    _check_inputs(teacher, adapter, latents, text_emb, features, sample_ids)
    kwargs = {
        # Resolved once here, not once per draw.
        "text_emb": _text_context(teacher, adapter, text_emb, features, latents.shape[0]),
        "sample_ids": sample_ids,
        "seed": seed,
        "seeds": seeds,
        "timestep_range": timestep_range,
    }
    if not want_grad:
        # no_grad rather than inference_mode: callers may reuse these tensors under autograd.
        with torch.no_grad():
            losses, used = denoising_loss(
                teacher,
                adapter,
                latents,
                features=features,
                num_draws=num_draws,
                timesteps=timesteps,
                **kwargs,
            )
        return DenoisingLossResult(losses=losses, timesteps=used, grad=None)
    if features is None:
        raise InvalidInput("features: want_grad needs features to differentiate, got None")
    draws, _, timesteps = _draw_plan(teacher, num_draws, None, timestep_range, timesteps)
    leaf = features.detach().to(teacher.device, torch.float32).requires_grad_(True)
    grad = torch.zeros_like(leaf)
    losses, used = [], []
    for k in draws:
        loss_k, t_k = denoising_loss(
            teacher,
            adapter,
            latents,
            features=leaf,
            draws=[k],
            timesteps=None if timesteps is None else [timesteps[k]],
            **kwargs,
        )
        (g,) = torch.autograd.grad(loss_k.sum() / len(draws), leaf)
        grad += g
        losses.append(loss_k.detach())
        used.append(t_k)
    return DenoisingLossResult(
        losses=torch.cat(losses, dim=1),
        timesteps=torch.cat(used, dim=1),
        grad=grad.to(features.device),
    )
