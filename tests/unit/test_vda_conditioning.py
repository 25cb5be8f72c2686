"""VDA's conditioning modes: how W_proj(F_V) reaches the teacher's frames.

"frame" (each teacher frame sees the tokens of the student frame at its time),
"frame_pos" (all tokens plus a learned frame-position embedding) and "spatial"
(the tokens of the student frame at its time, on their grid, added to the UNet's
first feature map) let the teacher see the order of F_V's frames; "context" (all
tokens, unordered, the original route) must not. Checked on the tiny presets: the
loss moves when F_V's frames are reversed or shuffled except under "context",
dL/dF_V from ``loss_and_grad`` is autograd's in every mode, and adapter files
keep their mode (files from before the modes existed load as "context").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from vidalign.errors import InvalidInput
from vidalign.students import load_student
from vidalign.vda import Adapter, DiffusionTeacher, denoising_loss, loss_and_grad
from vidalign.vda.adapter import (
    CONDITIONINGS,
    DEFAULT_CONDITIONING,
    DEFAULT_MAX_FRAMES,
    METADATA_KEY,
    _serialize,
    frame_sources,
)
from vidalign.vda.loss import _conditioning, _spatial_residual

from ..conftest import STUDENT
from ..support.numerics import (
    FP32_U,
    TINY_TEACHER_GRAD_TERMS,
    TINY_TEACHER_LOSS_TERMS,
    assert_fp32_close,
    max_abs,
    max_abs_diff,
)

MODES = ("frame", "frame_pos", "context", "spatial")
B, FRAMES, SIZE = 2, 8, 16
"""Latents (B, 4, FRAMES, SIZE, SIZE): the tiny teacher's 8 frames of 32x32 pixels."""
STUDENT_FRAMES = 8
"""T of the tiny Video-LLaVA (and of Video-LLaVA): F_V is (B, 8 * tokens_per_frame, d_v)."""
TIMESTEPS = [300, 800]
READABLE = 16.0
"""Scale of W_proj (and of the frame_pos table) that the tiny random teacher reads.

At W_proj's initial scale the random-init teacher barely looks at F_V: 8 projected
tokens of std 0.7 beside 77 text tokens move its loss by 2e-5..4e-5 when the frames are
reversed or shuffled under "frame" -- below the fp32 bound used here (1e-4), so nothing
could be told apart. x16 (token std ~11, above the text's) stands in for a projection
the teacher reads, as stage 1 trains it to be; measured effects then 9e-3..4e-2."""


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def d_v() -> int:
    return load_student(STUDENT).d_v


@pytest.fixture(scope="module")
def inputs(animatediff, d_v):
    """Latents, caption embeddings and F_V whose frames differ as much as frames can.

    Random features, not the tiny student's: its random-init tower gives the 8
    frames of a moving-squares clip features 4% apart (in norm), which measures
    that tower, not whether the conditioning passes order through.
    """
    g = torch.Generator().manual_seed(11)
    return {
        "latents": torch.randn(B, animatediff.latent_channels, FRAMES, SIZE, SIZE, generator=g),
        "text_emb": animatediff.encode_text(["a red square", "a blue circle"]),
        "features": torch.randn(B, STUDENT_FRAMES, d_v, generator=g),
    }


def _adapter(teacher: DiffusionTeacher, d_v: int, conditioning: str, **kwargs) -> Adapter:
    return Adapter.create(
        d_v=d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family, seed=1,
        conditioning=conditioning, teacher=teacher, **kwargs,
    )


SPATIAL_READABLE = 0.2
"""Std of the random W_proj given to a "spatial" adapter (a fresh one is zero): with F_V of
std 1 and d_v 32 the added map has std ~1.1, the size of the input convolution's own
output, as a trained adapter's would be; measured effects of frame order 1e-2..5e-2."""


def _readable(adapter: Adapter) -> Adapter:
    """``adapter`` with W_proj scaled by READABLE (random of std SPATIAL_READABLE under
    spatial, whose W_proj starts at zero) and, under frame_pos, a non-zero table."""
    with torch.no_grad():
        if adapter.conditioning == "spatial":
            g = torch.Generator().manual_seed(0)
            adapter.proj.weight.copy_(SPATIAL_READABLE * torch.randn(adapter.proj.weight.shape, generator=g))
        else:
            adapter.proj.weight.mul_(READABLE)
        if adapter.conditioning == "frame_pos":
            g = torch.Generator().manual_seed(0)
            adapter.proj.frame_pos.copy_(READABLE * torch.randn(adapter.proj.frame_pos.shape, generator=g))
    return adapter


def _losses(teacher, adapter, inputs, features, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        losses, _ = denoising_loss(
            teacher, adapter, inputs["latents"], text_emb=inputs["text_emb"], features=features,
            sample_ids=["clip-a", "clip-b"], seed=3, timesteps=TIMESTEPS,
            draws=list(range(len(TIMESTEPS))), **kwargs,
        )
    return losses


# --- the frame mapping ----------------------------------------------------------------


def test_frame_sources_pick_the_student_frame_nearest_in_time():
    assert frame_sources(8, 8) == list(range(8))
    # VDA: 24 teacher frames over Video-LLaVA's 8, both spanning the clip end to end:
    # teacher frame f sits at f * 7/23 student frames; the end frames' halves of a period
    # hold 2 teacher frames each, the inner ones 3 or 4.
    assert frame_sources(24, 8) == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 7, 7]
    assert frame_sources(4, 5) == [0, 1, 3, 4]  # fewer teacher frames: student frame 2 is unseen
    assert frame_sources(1, 8) == [0]
    assert frame_sources(3, 1) == [0, 0, 0]
    for bad in ((0, 8), (8, 0), (8.0, 8)):
        with pytest.raises(InvalidInput, match="expected an int >= 1"):
            frame_sources(*bad)


def test_frame_context_holds_the_text_and_its_student_frames_tokens(animatediff, d_v):
    """Under "frame", teacher frame f's context is [text; W_proj(tokens of frame s(f))], exactly."""
    tokens = 4  # grid:2 pooling
    adapter = _adapter(animatediff, d_v, "frame", frame_tokens=tokens)
    g = torch.Generator().manual_seed(5)
    features = torch.randn(B, 3 * tokens, d_v, generator=g)
    text = torch.randn(B, 7, animatediff.cond_dim, generator=g)
    cond = _conditioning(adapter, text, features, torch.device("cpu"), FRAMES)
    assert cond.shape == (B, FRAMES, 7 + tokens, animatediff.cond_dim)
    projected = adapter.project(features)
    for f, s in enumerate(frame_sources(FRAMES, 3)):
        assert torch.equal(cond[:, f, :7], text)
        assert torch.equal(cond[:, f, 7:], projected[:, s * tokens : (s + 1) * tokens])
    no_text = _conditioning(adapter, None, features, torch.device("cpu"), FRAMES)
    assert torch.equal(no_text, cond[:, :, 7:])
    # The shared-context modes keep one (B, L, D) context: text, then every token in order.
    for mode in ("context", "frame_pos"):
        shared = _adapter(animatediff, d_v, mode, frame_tokens=tokens)
        cond = _conditioning(shared, text, features, torch.device("cpu"), FRAMES)
        assert torch.equal(cond, torch.cat([text, shared.project(features)], dim=1))


def test_per_frame_context_reaches_only_its_frame_on_sd15(sd15, d_v):
    """SD1.5 denoises frames independently: a student frame's features move exactly the
    teacher frames mapped to it. T = 4 student frames over F = 8 teacher frames."""
    adapter = _readable(_adapter(sd15, d_v, "frame"))
    g = torch.Generator().manual_seed(7)
    z_t = torch.randn(1, sd15.latent_channels, FRAMES, SIZE, SIZE, generator=g)
    text = torch.randn(1, 5, sd15.cond_dim, generator=g)
    features = torch.randn(1, 4, d_v, generator=g)
    changed = features.clone()
    changed[:, 1] = torch.randn(d_v, generator=g)
    t = torch.tensor([600])
    with torch.no_grad():
        eps = [
            sd15.predict_noise(z_t, t, _conditioning(adapter, text, f, sd15.device, FRAMES))
            for f in (features, changed)
        ]
    sources = frame_sources(FRAMES, 4)
    moved = [f for f in range(FRAMES) if sources[f] == 1]
    assert moved == [2, 3]
    # Frames whose context is unchanged see the same inputs in the same batch layout:
    # at most fp32 sum-order noise, u x 1.5e3 x max|eps| (as for the loss); measured 0.
    still = [f for f in range(FRAMES) if f not in moved]
    tol = assert_fp32_close(eps[1][:, :, still], eps[0][:, :, still], terms=TINY_TEACHER_LOSS_TERMS,
                            what="frames of other student frames")
    for f in moved:
        assert max_abs_diff(eps[1][:, :, f], eps[0][:, :, f]) > 100 * tol


@pytest.mark.parametrize("family", ["animatediff", "sd15"])
def test_predict_noise_takes_a_per_frame_context(family, animatediff, sd15):
    """(B, F, L, D) with the same context in every frame is the (B, L, D) call, exactly."""
    teacher = animatediff if family == "animatediff" else sd15
    g = torch.Generator().manual_seed(2)
    z_t = torch.randn(B, teacher.latent_channels, 4, SIZE, SIZE, generator=g)
    t = torch.tensor([10, 700])
    shared = torch.randn(B, 6, teacher.cond_dim, generator=g)
    with torch.no_grad():
        expected = teacher.predict_noise(z_t, t, shared)
        actual = teacher.predict_noise(z_t, t, shared.unsqueeze(1).expand(-1, 4, -1, -1))
    assert torch.equal(actual, expected)
    for bad in ((B, 3, 6, teacher.cond_dim), (B, 4, 6, teacher.cond_dim + 1), (B + 1, 4, 6, teacher.cond_dim)):
        with pytest.raises(InvalidInput, match=r"cond: expected .* one context per frame"):
            teacher.predict_noise(z_t, t, torch.zeros(bad))


# --- order: visible under "frame" and "frame_pos", invisible under "context" -------------

# Under "context" (and "frame_pos" with a zero table) reversing or shuffling F_V's frames
# permutes the key/value tokens of every cross-attention and nothing else; attention is a
# softmax-weighted sum over its keys, so the permutation changes only the order of those
# fp32 sums (85 terms: 77 text + 8 frame tokens; a permuted n-term sum moves by at most
# ~n u of its summands, Higham 3.1). These perturbations then travel through the rest of
# the UNet as its own roundings do, which tests/support/numerics bounds for the tiny
# teacher's loss: TINY_TEACHER_LOSS_TERMS x u x max|loss| = 1.5e3 x 6e-8 x 1.1 ~ 1e-4
# (10 sigma of the random walk of ~2e4 roundings). Measured: <= 1.2e-7 (one ulp of 1.1).
#
# Under "frame" and "frame_pos" the permuted frames must move the loss by ORDER_FACTOR
# times that bound: no rounding explains a difference 10x its (already 10-sigma) bound,
# while what the tiny teacher reads from order (READABLE) measured 9.2e-3..3.7e-2, i.e.
# 90-350x the bound and >= 9x above the threshold.
ORDER_FACTOR = 10


def _permutations() -> dict[str, torch.Tensor]:
    shuffled = torch.randperm(STUDENT_FRAMES, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(shuffled, torch.arange(STUDENT_FRAMES))
    return {"reversed": torch.arange(STUDENT_FRAMES).flip(0), "shuffled": shuffled}


@pytest.mark.parametrize("mode", MODES)
def test_frame_order_reaches_the_teacher_unless_context(mode, animatediff, d_v, inputs):
    adapter = _readable(_adapter(animatediff, d_v, mode))
    base = _losses(animatediff, adapter, inputs, inputs["features"])
    bound = TINY_TEACHER_LOSS_TERMS * FP32_U * max_abs(base)
    for name, order in _permutations().items():
        permuted = _losses(animatediff, adapter, inputs, inputs["features"][:, order])
        if mode == "context":
            assert_fp32_close(permuted, base, terms=TINY_TEACHER_LOSS_TERMS, what=f"context, {name}")
        else:
            change = max_abs_diff(permuted, base)
            assert change > ORDER_FACTOR * bound, (
                f"{mode}, {name} frames: the loss moved by {change:.3e}, not more than "
                f"{ORDER_FACTOR} x the fp32 bound {bound:.3e}: the teacher does not see order"
            )


def test_a_fresh_frame_pos_adapter_conditions_as_context(animatediff, d_v, inputs):
    """The frame-position table starts at zero: a new frame_pos adapter is exactly a context one."""
    fresh = _adapter(animatediff, d_v, "frame_pos")
    context = _adapter(animatediff, d_v, "context")
    assert torch.equal(fresh.proj.frame_pos, torch.zeros(DEFAULT_MAX_FRAMES, animatediff.cond_dim))
    assert torch.equal(fresh.proj.weight, context.proj.weight)  # the table draws no randomness
    assert torch.equal(
        _losses(animatediff, fresh, inputs, inputs["features"]),
        _losses(animatediff, context, inputs, inputs["features"]),
    )


def test_spatial_residual_lays_each_frames_tokens_on_its_grid(animatediff, d_v):
    """Under "spatial", teacher frame f's added map is W_proj(tokens of student frame s(f)),
    token i * G + j covering cell (i, j) of the latent frame: exact copies, no mixing."""
    grid, student = 2, 3
    adapter = _readable(_adapter(animatediff, d_v, "spatial", frame_tokens=grid * grid))
    assert (adapter.frame_grid, adapter.spatial_channels) == (grid, animatediff.spatial_channels)
    features = torch.randn(B, student * grid * grid, d_v, generator=torch.Generator().manual_seed(5))
    shape = torch.Size((B, animatediff.latent_channels, FRAMES, SIZE, SIZE))
    residual = _spatial_residual(adapter, features, torch.device("cpu"), shape)
    assert residual.shape == (B, FRAMES, animatediff.spatial_channels, SIZE, SIZE)
    projected = adapter.project(features)
    cell = SIZE // grid
    for f, s in enumerate(frame_sources(FRAMES, student)):
        for i in range(grid):
            for j in range(grid):
                token = projected[:, s * grid * grid + i * grid + j]  # (B, channels)
                block = residual[:, f, :, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                assert torch.equal(block, token[:, :, None, None].expand_as(block))
    # The text alone is the cross-attention context; other modes add no residual.
    text = animatediff.encode_text(["a red square", "a blue circle"])
    assert torch.equal(_conditioning(adapter, text, features, torch.device("cpu"), FRAMES), text)
    frame = _adapter(animatediff, d_v, "frame", frame_tokens=grid * grid)
    assert _spatial_residual(frame, features, torch.device("cpu"), shape) is None


def test_a_fresh_spatial_adapter_leaves_the_teacher_as_text_alone(animatediff, d_v, inputs):
    """W_proj's last layer starts at zero (both projections): the teacher starts as pretrained,
    exactly; without text the UNet attends to the empty caption, its unconditional context."""
    for projection in ("linear", "mlp"):
        fresh = _adapter(animatediff, d_v, "spatial", projection=projection)
        assert torch.equal(
            _losses(animatediff, fresh, inputs, inputs["features"]),
            _losses(animatediff, None, inputs, None),
        )
    adapter = _readable(_adapter(animatediff, d_v, "spatial"))
    kwargs = {"features": inputs["features"], "sample_ids": ["clip-a", "clip-b"], "seed": 3,
              "timesteps": TIMESTEPS, "draws": [0, 1]}
    with torch.no_grad():
        no_text, _ = denoising_loss(animatediff, adapter, inputs["latents"], text_emb=None, **kwargs)
        empty, _ = denoising_loss(animatediff, adapter, inputs["latents"],
                                  text_emb=animatediff.encode_text(["", ""]), **kwargs)
    assert torch.equal(no_text, empty)


def test_spatial_map_reaches_only_its_frames_on_sd15(sd15, d_v):
    """SD1.5 denoises frames independently: a student frame's spatial map moves exactly the
    teacher frames mapped to it (T = 4 over F = 8), and the others bit for bit not."""
    adapter = _readable(_adapter(sd15, d_v, "spatial"))
    g = torch.Generator().manual_seed(7)
    z0 = torch.randn(1, sd15.latent_channels, FRAMES, SIZE, SIZE, generator=g)
    features = torch.randn(1, 4, d_v, generator=g)
    changed = features.clone()
    changed[:, 1] = torch.randn(d_v, generator=g)
    text = sd15.encode_text(["a red square"])
    eps = []
    with torch.no_grad():
        for f in (features, changed):
            residual = _spatial_residual(adapter, f, sd15.device, z0.shape)
            eps.append(sd15.predict_noise(z0, torch.tensor([600]), text, residual))
    moved = [f for f, s in enumerate(frame_sources(FRAMES, 4)) if s == 1]
    still = [f for f in range(FRAMES) if f not in moved]
    assert moved == [2, 3]
    tol = assert_fp32_close(eps[1][:, :, still], eps[0][:, :, still], terms=TINY_TEACHER_LOSS_TERMS,
                            what="frames of other student frames")
    for f in moved:
        assert max_abs_diff(eps[1][:, :, f], eps[0][:, :, f]) > 100 * tol


def test_spatial_shapes_and_channels_are_checked(animatediff, d_v, inputs):
    with pytest.raises(InvalidInput, match=r"frame_tokens: 'spatial' conditioning lays .* square grid, got 2"):
        _adapter(animatediff, d_v, "spatial", frame_tokens=2)
    with pytest.raises(InvalidInput, match=r"spatial_channels: expected 0 under conditioning 'frame', got 8"):
        Adapter(d_v=d_v, cond_dim=animatediff.cond_dim, teacher_family="animatediff",
                conditioning="frame", spatial_channels=8)
    with pytest.raises(InvalidInput, match=r"spatial_channels: expected a positive int .* got 0"):
        Adapter(d_v=d_v, cond_dim=animatediff.cond_dim, teacher_family="animatediff", conditioning="spatial")
    with pytest.raises(InvalidInput, match=r"'spatial' conditioning needs spatial_channels or the teacher"):
        Adapter.create(d_v=d_v, cond_dim=animatediff.cond_dim, teacher_family="animatediff",
                       conditioning="spatial")
    # An adapter made for another first feature map: a clear refusal, not a broadcasting error.
    other = _readable(Adapter.create(d_v=d_v, cond_dim=animatediff.cond_dim, teacher_family="animatediff",
                                     conditioning="spatial", spatial_channels=animatediff.spatial_channels + 1))
    with pytest.raises(InvalidInput, match=r"adapter.spatial_channels: expected the teacher's \d+"):
        _losses(animatediff, other, inputs, inputs["features"])
    z_t = inputs["latents"]
    residual = torch.zeros(B, FRAMES, animatediff.spatial_channels, SIZE, SIZE - 1)
    with pytest.raises(InvalidInput, match=r"residual: expected \(2, 8, \d+, 16, 16\), got"):
        animatediff.predict_noise(z_t, torch.tensor([1, 2]), inputs["text_emb"], residual)


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_loss_and_grad_is_autograd_in_every_mode(mode, animatediff, d_v, inputs):
    adapter = _readable(_adapter(animatediff, d_v, mode))
    common = {
        "text_emb": inputs["text_emb"], "sample_ids": ["clip-a", "clip-b"], "seed": 5,
        "num_draws": 2, "timestep_range": (100, 900),
    }
    features = inputs["features"].clone().requires_grad_(True)
    losses, steps = denoising_loss(animatediff, adapter, inputs["latents"], features=features, **common)
    wrt = [features, adapter.proj.frame_pos] if mode == "frame_pos" else [features]
    expected, *table = torch.autograd.grad(losses.mean(dim=1).sum(), wrt)
    result = loss_and_grad(
        animatediff, adapter, inputs["latents"], features=inputs["features"], want_grad=True, **common
    )
    # loss_and_grad cuts the graph at F_V and runs one backward per draw: only the order of
    # fp32 sums differs. u 6e-8 x 4e4 (UNet forward + backward, W_proj) x max|grad|
    # (tests/support/numerics); the per-frame gather and the position add are exact. A
    # dropped draw, sample or frame moves the gradient by >= 1/3 of itself.
    assert_fp32_close(result.grad, expected, terms=TINY_TEACHER_GRAD_TERMS, what=f"{mode} grad")
    assert_fp32_close(result.losses, losses.detach(), terms=TINY_TEACHER_LOSS_TERMS, what=f"{mode} losses")
    assert torch.equal(result.timesteps, steps)
    # Every student frame conditions some teacher frame (T = F = 8): all get a gradient.
    assert (expected.abs().amax(dim=2) > 0).all()
    if mode == "frame_pos":
        # The table trains with W_proj: the rows of the 8 frames present get a gradient,
        # the rest none.
        (rows,) = table
        assert (rows[:STUDENT_FRAMES].abs().amax(dim=1) > 0).all()
        assert not rows[STUDENT_FRAMES:].any()


def test_student_frames_no_teacher_frame_sees_get_no_gradient(animatediff, d_v, inputs):
    """16 student frames over 8 teacher frames under "frame": only the 8 mapped ones train."""
    adapter = _readable(_adapter(animatediff, d_v, "frame"))
    features = torch.randn(B, 16, d_v, generator=torch.Generator().manual_seed(4))
    result = loss_and_grad(
        animatediff, adapter, inputs["latents"], text_emb=inputs["text_emb"], features=features,
        sample_ids=["clip-a", "clip-b"], seed=5, timesteps=[500], want_grad=True,
    )
    seen = set(frame_sources(FRAMES, 16))
    assert seen == {0, 2, 4, 6, 9, 11, 13, 15}
    reached = result.grad.abs().amax(dim=2) > 0
    assert reached[:, sorted(seen)].all()
    assert not reached[:, sorted(set(range(16)) - seen)].any()


# --- the adapter file --------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["linear", "mlp"])
@pytest.mark.parametrize("mode", MODES)
def test_adapter_file_keeps_its_mode(mode, projection, tmp_path, animatediff, d_v, inputs):
    adapter = _adapter(animatediff, d_v, mode, projection=projection, frame_tokens=4, max_frames=12)
    if mode == "frame_pos":
        with torch.no_grad():
            adapter.proj.frame_pos.normal_(generator=torch.Generator().manual_seed(1))
    digest = adapter.save(tmp_path / "a.safetensors")
    assert adapter.save(tmp_path / "b.safetensors") == digest  # stable bytes: a stable id
    loaded = Adapter.load(tmp_path / "a.safetensors")
    assert loaded.digest == digest == loaded.lora_name
    assert (loaded.conditioning, loaded.frame_tokens, loaded.max_frames) == (mode, 4, 12)
    assert loaded.spatial_channels == (animatediff.spatial_channels if mode == "spatial" else 0)
    assert loaded._fields() == adapter._fields()
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("proj.frame_pos" in a) == (mode == "frame_pos")
    assert loaded.save(tmp_path / "c.safetensors") == digest
    features = inputs["features"].repeat_interleave(4, dim=1)  # 8 frames of 4 tokens
    assert torch.equal(loaded.project(features), adapter.project(features))


def test_new_adapters_default_to_frame_conditioning(animatediff, d_v):
    adapter = Adapter.create(d_v=d_v, cond_dim=animatediff.cond_dim, teacher_family=animatediff.family)
    assert adapter.conditioning == DEFAULT_CONDITIONING == "frame"
    assert (adapter.frame_tokens, adapter.max_frames) == (1, DEFAULT_MAX_FRAMES)
    assert set(CONDITIONINGS) == set(MODES)


def test_a_file_from_before_the_modes_loads_as_context(tmp_path, animatediff, d_v, inputs):
    """A file without the conditioning fields -- as written before they existed -- is "context"
    and conditions exactly as a context adapter with its weights."""
    context = _readable(_adapter(animatediff, d_v, "context"))
    fields = {k: v for k, v in context._fields().items()
              if k not in ("conditioning", "frame_tokens", "max_frames")}
    tensors = {f"proj.{k}": v.contiguous() for k, v in context.proj.state_dict().items()}
    old = tmp_path / "old.safetensors"
    old.write_bytes(_serialize(tensors, {METADATA_KEY: json.dumps({"format_version": 2, **fields})}))
    loaded = Adapter.load(old)
    assert (loaded.conditioning, loaded.frame_tokens) == ("context", 1)
    assert torch.equal(
        _losses(animatediff, loaded, inputs, inputs["features"]),
        _losses(animatediff, context, inputs, inputs["features"]),
    )


def test_bad_modes_and_frame_layouts_are_invalid_input(tmp_path, animatediff, d_v, inputs):
    with pytest.raises(InvalidInput, match=r"conditioning: expected one of .*'frame'.*got 'per_frame'"):
        _adapter(animatediff, d_v, "per_frame")
    for field in ("frame_tokens", "max_frames"):
        with pytest.raises(InvalidInput, match=f"{field}: expected a positive int, got 0"):
            _adapter(animatediff, d_v, "frame", **{field: 0})
    # A file naming an unknown mode: the path and the field in the message.
    good = tmp_path / "good.safetensors"
    _adapter(animatediff, d_v, "frame").save(good)
    fields = {"format_version": 2, **_adapter(animatediff, d_v, "frame")._fields(), "conditioning": "bogus"}
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(good), bad,
                                metadata={METADATA_KEY: json.dumps(fields)})
    with pytest.raises(InvalidInput, match=r"bad\.safetensors.*conditioning: expected one of"):
        Adapter.load(bad)
    # F_V whose token count is not a multiple of frame_tokens (pooled otherwise).
    grid = _adapter(animatediff, d_v, "frame", frame_tokens=4)
    features = torch.randn(B, 10, d_v)
    message = r"features: shape \(2, 10, 32\) has 10 tokens .* frame_tokens 4"
    with pytest.raises(InvalidInput, match=message):
        grid.project(features)
    with pytest.raises(InvalidInput, match=message):
        _losses(animatediff, grid, inputs, features)
    # More student frames than the frame_pos table has rows.
    short = _adapter(animatediff, d_v, "frame_pos", max_frames=4)
    with pytest.raises(InvalidInput, match=r"holds 8 frames .* max_frames 4"):
        _losses(animatediff, short, inputs, inputs["features"])


# --- plumbing: stage 1 and `vidalign adapter init` -----------------------------------------


def test_stage1_adapter_config_validates_and_reads_frame_tokens_from_the_features():
    from vidalign_trainer.features import FeatureSet
    from vidalign_trainer.stage1 import AdapterConfig, feature_frame_tokens

    assert AdapterConfig().conditioning == DEFAULT_CONDITIONING
    assert AdapterConfig(conditioning="context").conditioning == "context"
    with pytest.raises(ValueError, match=r"adapter.conditioning: expected one of frame, frame_pos, context, spatial, got 'ctx'"):
        AdapterConfig(conditioning="ctx")
    with pytest.raises(ValueError, match=r"adapter\.max_frames must be >= 1"):
        AdapterConfig(max_frames=0)

    def feature_set(source: dict) -> FeatureSet:
        return FeatureSet(uri="mem://f", features={}, d_v=32, tokens=8, source=source)

    assert feature_frame_tokens(feature_set({"pooling": "frame"})) == 1
    assert feature_frame_tokens(feature_set({"pooling": "grid:3"})) == 9
    assert feature_frame_tokens(feature_set({})) == 1  # a set from before pooling was recorded
    with pytest.raises(InvalidInput, match=r"features mem://f: pooling: expected"):
        feature_frame_tokens(feature_set({"pooling": "mean"}))


def test_stage1_trains_the_frame_pos_table_of_grid_features(tmp_path):
    """Stage 1 end to end: frame_tokens from the feature set's pooling (grid:2 -> 4), and the
    position table trains with W_proj and ships in the adapter file."""
    from vidalign.config import load_config
    from vidalign.store import materialize
    from vidalign_trainer.features import FeaturesConfig, extract_features
    from vidalign_trainer.stage1 import Stage1Config, run_stage1

    configs = Path(__file__).resolve().parents[2] / "configs"
    features = extract_features(load_config(FeaturesConfig, configs / "features-tiny.yaml", [
        f"output.dir={tmp_path / 'features'}", "data.num_clips=2", "pooling=grid:2",
    ]))
    result = run_stage1(load_config(Stage1Config, configs / "stage1-tiny.yaml", [
        f"features={features}", f"output.dir={tmp_path / 'stage1'}", "data.num_clips=2",
        "train.batch_size=1", "train.steps=2", "train.lr=1e-2", "adapter.lora_rank=0",
        "adapter.conditioning=frame_pos", "adapter.max_frames=12", "eval.num_clips=0",
    ]))
    adapter = Adapter.load(materialize(result.adapter_uri))
    assert (adapter.conditioning, adapter.frame_tokens, adapter.max_frames) == ("frame_pos", 4, 12)
    rows = adapter.proj.frame_pos
    # The 8 student frames' rows moved from zero; the 4 rows no frame uses got no gradient.
    assert (rows[:STUDENT_FRAMES].abs().amax(dim=1) > 0).all()
    assert not rows[STUDENT_FRAMES:].any()


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs.choices[name]


def test_adapter_init_offers_the_library_modes():
    """The CLI imports no torch to build its parser, so it spells the modes out: keep them equal."""
    from vidalign_cli.main import build_parser

    init = _subcommand(_subcommand(build_parser(), "adapter"), "init")
    options = {a.dest: a for a in init._actions}
    assert tuple(options["conditioning"].choices) == CONDITIONINGS
    assert options["conditioning"].default == DEFAULT_CONDITIONING
    assert options["max_frames"].default == DEFAULT_MAX_FRAMES
    assert options["pooling"].default == "frame"


def test_adapter_init_writes_the_mode_and_the_students_tokens_per_frame(tmp_path, capsys):
    from vidalign_cli.main import main

    out = tmp_path / "a.safetensors"
    assert main(["adapter", "init", "--teacher-model", "tiny-animatediff", "--student", STUDENT,
                 "--pooling", "grid:2", "--conditioning", "frame_pos", "--max-frames", "16",
                 "--out", str(out)]) == 0
    adapter = Adapter.load(out)
    assert capsys.readouterr().out.strip() == adapter.digest
    assert (adapter.conditioning, adapter.frame_tokens, adapter.max_frames) == ("frame_pos", 4, 16)
    assert main(["adapter", "init", "--teacher-model", "tiny-animatediff", "--feature-dim", "12",
                 "--out", str(out)]) == 0
    adapter = Adapter.load(out)
    assert (adapter.d_v, adapter.conditioning, adapter.frame_tokens) == (12, "frame", 1)
    assert main(["adapter", "init", "--teacher-model", "tiny-animatediff", "--pooling", "mean",
                 "--out", str(out)]) == 2
    assert "pooling: expected 'frame' or 'grid:G'" in capsys.readouterr().err
