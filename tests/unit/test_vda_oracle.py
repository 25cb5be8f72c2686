"""Oracle features and the oracle fit (``vidalign.vda.oracle``) on the tiny random teacher.

The layout must be exactly what ``grid:G`` pooling gives a student (frame-major, cells
row-major), or the spatial route would paint each cell's mean in the wrong place; the fit
must start from an adapter the teacher ignores (zero W_proj: a feature gap of exactly 0)
and end with one whose features reach the loss.
"""

from __future__ import annotations

import pytest
import torch

from vidalign.errors import InvalidInput
from vidalign.vda import Adapter
from vidalign.vda.oracle import fit_oracle_adapter, oracle_feature_gap, oracle_features

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_oracle_features_are_cell_means_in_grid_pooling_order():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 8, 8, generator=g)
    grid, cell = 2, 4
    features = oracle_features(latents, grid)
    assert features.shape == (2, 3 * grid * grid, 4)
    for f in range(3):
        for i in range(grid):
            for j in range(grid):
                block = latents[:, :, f, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                token = features[:, f * grid * grid + i * grid + j]
                # A mean of 16 fp32 values two ways (pooling kernel vs .mean): sum order only,
                # 16 u max|x| ~ 4e-6 for |x| < 4.
                torch.testing.assert_close(token, block.mean(dim=(2, 3)), rtol=0, atol=4e-6)
    # The same layout as a student's grid:G pooling of a (frames, h, w, d) token grid.
    from vidalign.students.encoder import pool_grid

    student = pool_grid(latents[0].permute(1, 2, 3, 0), grid).reshape(-1, 4)  # (F * g * g, C)
    torch.testing.assert_close(student, features[0], rtol=0, atol=4e-6)


def test_oracle_features_refuse_bad_shapes():
    with pytest.raises(InvalidInput, match=r"latents: expected \(N, C, F, h, w\)"):
        oracle_features(torch.zeros(2, 4, 8, 8))
    with pytest.raises(InvalidInput, match=r"grid: expected an int in \[1, 8\]"):
        oracle_features(torch.zeros(1, 4, 2, 8, 8), 9)


def test_oracle_fit_makes_the_teacher_read_the_features(animatediff, tmp_path):
    """A fresh spatial adapter has a feature gap of exactly 0 (its W_proj is zero); three steps
    of the fit move W_proj and the gap off zero, through the engine the service uses."""
    g = torch.Generator().manual_seed(1)
    size = animatediff.resolution // animatediff.vae_scale_factor
    latents = torch.randn(3, animatediff.latent_channels, animatediff.frames, size, size, generator=g)
    captions = ["a red square", "a blue circle", "a green bar"]
    text = animatediff.encode_text(captions)
    fresh = Adapter.create(d_v=animatediff.latent_channels, cond_dim=animatediff.cond_dim,
                           teacher_family=animatediff.family, teacher=animatediff,
                           conditioning="spatial", frame_tokens=4)
    fresh.save(tmp_path / "fresh.safetensors")
    kwargs = {"timesteps": [700], "draws": 1}
    zero = oracle_feature_gap(animatediff, str(tmp_path / "fresh.safetensors"), latents, captions, **kwargs)
    assert all(gap.relative == 0.0 for per_t in zero.values() for gap in per_t)

    fit = fit_oracle_adapter(animatediff, latents, text, grid=2, steps=3, batch_size=2, log_every=0)
    adapter = fit.adapter
    assert len(fit.losses) == 3 and all(torch.isfinite(torch.tensor(fit.losses)))
    assert (adapter.conditioning, adapter.frame_tokens, adapter.d_v) == ("spatial", 4, 4)
    assert adapter.lora_rank == 0 and adapter.proj.weight.abs().max() > 0
    assert not any(p.requires_grad for p in adapter.parameters())
    adapter.save(tmp_path / "fit.safetensors")
    gaps = oracle_feature_gap(animatediff, str(tmp_path / "fit.safetensors"), latents, captions, **kwargs)
    assert set(gaps) == {"other_clip", "first_frame", "reversed", "shuffled"}
    assert any(gap.relative != 0.0 for per_t in gaps.values() for gap in per_t)


def test_oracle_fit_validates_its_inputs(animatediff):
    latents = torch.zeros(2, animatediff.latent_channels, 2, 8, 8)
    with pytest.raises(InvalidInput, match="text_emb: expected 2 rows"):
        fit_oracle_adapter(animatediff, latents, torch.zeros(3, 4, animatediff.cond_dim))
    with pytest.raises(InvalidInput, match="steps: expected an int >= 1, got 0"):
        fit_oracle_adapter(animatediff, latents, None, steps=0)
    latents[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="latents"):
        fit_oracle_adapter(animatediff, latents, None)
