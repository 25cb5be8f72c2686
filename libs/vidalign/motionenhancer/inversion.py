"""DDIM inversion, guided re-denoising with cross-stream memory, and prior extraction.

MotionEnhancer's extraction (§4.1, docs/papers.md): 3D VAE -> ``steps``-step DDIM
inversion -> ``steps``-step denoising with classifier-free guidance, in which the
denoising stream also attends to the inverted path's keys and values at the same
noise level ("cross-stream memory", the pattern of diffusers' community
``cogvideox_ddim_inversion.py``); the attention of the denoising pass is
captured (streaming, see ``vidalign.motionenhancer.attention``) and averaged over layers
and timesteps, then MHS selects heads and MTTI tokens.

Choices made here:

* Inversion runs with the empty prompt and no guidance (the community script
  uses "" for both halves of CFG, which makes guidance a no-op), with
  ``DDIMInverseScheduler`` built from the teacher scheduler's config, its
  ``alphas_cumprod`` copied from the CogVideoX scheduler (which applies
  CogVideoX's SNR shift; the inverse scheduler does not) and ``clip_sample=False``.
* Denoising starts from the inverted latent z_T (the community script starts
  from fresh noise and relies on the memory alone); the memory at denoising step
  i is the inversion trajectory at the same timestep.
* The captured batch element is the conditional (prompted) main stream; the
  captured rows are normalised over all its keys: text, own video and the
  reference stream's video.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler, DDIMInverseScheduler

from vidalign.errors import InvalidInput
from vidalign.motionenhancer.attention import AttentionStats, capture_attention
from vidalign.motionenhancer.cogvideox import CogVideoXTeacher
from vidalign.motionenhancer.mhs import MHSResult, select_heads
from vidalign.motionenhancer.mtti import (
    MTTIResult,
    SelectedToken,
    pool_tokens,
    select_tokens,
    token_spans,
)
from vidalign.papers import (
    ME_CROSS_STREAM_MEMORY,
    ME_DDIM_STEPS,
    ME_DENOISING_STEPS,
    ME_GUIDANCE,
    ME_HEAD_RATIO,
    ME_INVERSION_STEPS,
    ME_MTTI_DIFF_WEIGHT,
    ME_MTTI_MEAN_WEIGHT,
    ME_TOKEN_RATIO,
)

PRIORS_CHUNK_SIZE = 0
"""``extract_priors``' chunk size: the CLI's and the teacher protocol's default too, so an
in-process extraction and a served one record the same parameters. 0 = auto
(``vidalign.motionenhancer.attention.auto_chunk_size``); on the CPU the capture runs
the ``fused`` method, which does not chunk, and the value only reaches the metadata."""


def _schedulers(teacher: CogVideoXTeacher, steps: int) -> tuple[Any, DDIMInverseScheduler]:
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInput(f"steps: expected an int >= 1, got {steps!r}")
    config = {**teacher.scheduler.config, "clip_sample": False}
    forward = CogVideoXDDIMScheduler.from_config(config)
    inverse = DDIMInverseScheduler.from_config(
        {k: v for k, v in config.items() if k != "snr_shift_scale"}
    )
    # DDIMInverseScheduler has no SNR shift: take the CogVideoX schedule's alphas.
    inverse.alphas_cumprod = forward.alphas_cumprod.clone()
    forward.set_timesteps(steps, device=teacher.device)
    inverse.set_timesteps(steps, device=teacher.device)
    return forward, inverse


def _predict(
    teacher: CogVideoXTeacher, latents: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    return teacher.transformer(
        hidden_states=latents,
        encoder_hidden_states=embeds,
        timestep=t.expand(latents.shape[0]),
        image_rotary_emb=teacher.rotary_emb(latents),
        return_dict=False,
    )[0].float()


@torch.no_grad()
def ddim_invert(
    teacher: CogVideoXTeacher,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    steps: int = ME_INVERSION_STEPS,
) -> list[torch.Tensor]:
    """Latents (1, F, C, h, w) -> the inversion trajectory: one latent per timestep, noisiest last."""
    _, inverse = _schedulers(teacher, steps)
    trajectory = []
    x = latents
    for t in inverse.timesteps:
        v = _predict(teacher, x, embeds, t)
        x = inverse.step(v, t, x.float(), return_dict=False)[0].to(latents.dtype)
        trajectory.append(x)
    return trajectory


@torch.no_grad()
def ddim_denoise(
    teacher: CogVideoXTeacher,
    start: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    steps: int = ME_DENOISING_STEPS,
    guidance: float = ME_GUIDANCE,
    reference: list[torch.Tensor] | None = None,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """Denoise ``start`` (z_T) with CFG; ``reference`` (the inversion trajectory) turns on memory.

    With ``stats``, the caller must have installed capture (``capture_attention``):
    this function sets ``stats.memory`` for the duration of the loop.
    """
    forward, _ = _schedulers(teacher, steps)
    use_cfg = guidance != 1.0
    if use_cfg and uncond is None:
        raise InvalidInput("uncond: guidance != 1 needs the unconditional embeddings, got None")
    if reference is not None and len(reference) != steps:
        raise InvalidInput(
            f"reference: expected {steps} latents (one per step), got {len(reference)}"
        )
    embeds = torch.cat([uncond, cond]) if use_cfg else cond
    if reference is not None:
        embeds = torch.cat([embeds, embeds])
    if stats is not None:
        stats.memory = reference is not None
    x = start
    try:
        for i, t in enumerate(forward.timesteps):
            batch = torch.cat([x, x]) if use_cfg else x
            if reference is not None:
                ref = reference[steps - 1 - i]
                batch = torch.cat([batch, torch.cat([ref, ref]) if use_cfg else ref])
            v = _predict(teacher, batch, embeds, t)
            if reference is not None:
                v = v[: len(v) // 2]
            if use_cfg:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = forward.step(v, t, x.float(), return_dict=False)[0].to(start.dtype)
    finally:
        if stats is not None:
            stats.memory = False
    return x


@dataclass
class Priors:
    """What MotionEnhancer's extraction gives for one (video, prompt)."""

    head_scores: torch.Tensor
    """(H,) MHS score of each head (heads averaged over layers)."""
    selected_heads: list[int]
    token_scores: torch.Tensor
    """(L,) MTTI score of each token; -inf for padding and special tokens."""
    selected_tokens: list[SelectedToken]
    prior: torch.Tensor
    """(n_selected_tokens, F_tok, h, w) float32: the selected heads' mean attention of each
    selected token over the video tokens (F_tok = latent frames, / 2 in CogVideoX 1.5)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    mhs: MHSResult | None = None
    mtti: MTTIResult | None = None


def extract_priors(
    teacher: CogVideoXTeacher,
    video: np.ndarray,
    prompt: str,
    *,
    steps: int = ME_DDIM_STEPS,
    guidance: float = ME_GUIDANCE,
    chunk_size: int = PRIORS_CHUNK_SIZE,
    head_ratio: float = ME_HEAD_RATIO,
    token_ratio: float = ME_TOKEN_RATIO,
    negative_prompt: str = "",
    memory: bool = ME_CROSS_STREAM_MEMORY,
    mhs_weights: dict[str, float] | None = None,
    mean_weight: float = ME_MTTI_MEAN_WEIGHT,
    diff_weight: float = ME_MTTI_DIFF_WEIGHT,
) -> Priors:
    """MotionEnhancer priors of one clip: uint8 video (F, H, W, 3) and its prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput(f"prompt: expected a non-empty str, got {prompt!r}")
    began = time.perf_counter()
    encoded = teacher.encode_video(video)
    latents = teacher.pad_latent_frames(encoded)  # CogVideoX 1.5: token frames of 2 latents
    texts = teacher.encode_prompt([negative_prompt, prompt, ""])
    uncond, cond, null = texts.embeds[0:1], texts.embeds[1:2], texts.embeds[2:3]
    trajectory = ddim_invert(teacher, latents, null, steps)
    stats = AttentionStats(capture_index=-1)
    with capture_attention(teacher.transformer, stats, chunk_size=chunk_size):
        recon = ddim_denoise(
            teacher,
            trajectory[-1],
            cond,
            uncond,
            steps=steps,
            guidance=guidance,
            reference=trajectory if memory else None,
            stats=stats,
        )
    grid = stats.grid
    assert grid is not None
    mhs = select_heads(
        stats.same_location, stats.vision_mass, ratio=head_ratio, weights=mhs_weights
    )
    text_to_vision = stats.text_to_vision
    a_tok = pool_tokens(text_to_vision, mhs.selected, grid.frames)
    eligible = texts.attention_mask[1].bool() & ~texts.special[1]
    mtti = select_tokens(
        a_tok, eligible, ratio=token_ratio, mean_weight=mean_weight, diff_weight=diff_weight
    )
    tokens = token_spans(mtti, texts.offsets[1], prompt)
    rows = text_to_vision[mhs.selected].mean(0)[mtti.selected]
    prior = rows.reshape(len(tokens), grid.frames, grid.height, grid.width).float().cpu()
    metadata = {
        "model": teacher.spec.name,
        "steps": steps,
        "guidance": guidance,
        "memory": memory,
        "chunk_size": chunk_size,
        "head_ratio": head_ratio,
        "token_ratio": token_ratio,
        "prompt": prompt,
        "frames_used": (encoded.shape[1] - 1) * teacher.vae_scale_temporal + 1,
        "latent_shape": tuple(latents.shape),
        "token_grid": {
            "text": grid.text_len,
            "frames": grid.frames,
            "height": grid.height,
            "width": grid.width,
        },
        "layer_calls": stats.layer_calls,
        "forwards": stats.forwards,
        "reconstruction_rmse": float((recon.float() - latents.float()).pow(2).mean().sqrt()),
        "seconds": time.perf_counter() - began,
    }
    return Priors(
        head_scores=mhs.score.cpu(),
        selected_heads=mhs.selected,
        token_scores=mtti.score.cpu(),
        selected_tokens=tokens,
        prior=prior,
        metadata=metadata,
        mhs=mhs,
        mtti=mtti,
    )
