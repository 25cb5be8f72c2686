"""Comparing two training runs that should be the same run up to float rounding."""

from __future__ import annotations

import math
import os

import torch

# Two AdamW runs whose gradients differ only by the order of fp32 sums (DDP's
# all-reduce of two half-batch gradients vs one whole-batch backward; ZeRO's
# flattened buffers vs per-parameter tensors; another CPU's BLAS kernels) do
# not agree element by element to any fixed epsilon: Adam divides each update
# by sqrt(v_hat), so an entry whose gradient is near its own rounding error
# (a sign that flips between steps, m_hat crossing zero) can move by up to
# ~2 * lr per step in one run and not the other.  Measured: 3.0e-6 on one of
# 6,144 patch-embedding entries after 3 steps at lr 1e-3 on one machine,
# 2.4e-6 on another, while 99.9% of the entries agree to 1e-7.
#
# What does follow from the dtype is the size of the *whole* difference
# against the distance the weights travelled: entries with well-conditioned
# gradients carry relative errors of ~u * sqrt(n) (u = 2^-24 = 6e-8, n <= 1e4
# summands: ~6e-6), and the few ill-conditioned ones carry at most 2 * lr per
# step each.  For a fraction f of ill-conditioned entries the ratio is
# ~2 * sqrt(f); 1e-3 admits f up to 2.5e-7 of the displacement's energy on
# top of the rounding floor (measured: 1.3e-5 here).  A real defect -- a rank
# training on the wrong slice, a gradient not all-reduced, an optimizer state
# not restored -- moves the weights by the order of the displacement itself,
# a ratio ~1, three orders above this.
ADAM_TRAJECTORY_REL = 1e-3


def relative_distance(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> float:
    """||a - b|| / ||a - start|| over all tensors together (Frobenius norms, float64)."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    assert a.keys() <= start.keys(), sorted(a.keys() - start.keys())
    diff = math.fsum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a)
    moved = math.fsum((a[k].double() - start[k].double()).pow(2).sum().item() for k in a)
    assert moved > 0, "the weights never moved: the comparison would be vacuous"
    return math.sqrt(diff / moved)


def assert_same_adam_trajectory(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    rel: float = ADAM_TRAJECTORY_REL,
) -> None:
    """``a`` and ``b`` are the same AdamW trajectory from ``start``, up to fp32 rounding."""
    ratio = relative_distance(a, b, start)
    log = os.environ.get("VIDALIGN_NUMERICS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"adam trajectory\tratio={ratio:.3e}\ttol={rel:.0e}\n")
    assert ratio <= rel, (
        f"weights differ by {ratio:.3e} of the distance they travelled (allowed {rel:.0e}): "
        "more than fp32 summation order explains"
    )


# --- one fp32 evaluation against another -------------------------------------
#
# Two evaluations of the same formula in fp32 that differ only in the order of
# their sums (another process or thread count, another batch composition or
# chunking, BLAS blocking, a fused kernel against an unfused one) differ by at
# most ~n * u * sum|x_i| per accumulated result (Higham, "Accuracy and Stability
# of Numerical Algorithms", 3.1), u = 2^-24 the unit roundoff.  Through a whole
# network the errors of successive layers add, so ``terms`` is the number of
# roundings accumulated along the deepest path (sum of the reduction lengths of
# the layers on it, forward and backward), and the magnitude of the compared
# values stands in for sum|x_i|.  A defect (a missing factor, a wrong sample or
# draw, a term dropped) moves values by a fraction of their own magnitude;
# these bounds stay at 1e-5..1e-3 of it.
#
# Set VIDALIGN_NUMERICS_LOG=path to append every comparison's measured
# difference and bound to that file (to re-measure on another machine).

FP32_U = 2.0**-24
"""Unit roundoff of float32 (half of torch.finfo(torch.float32).eps): 6.0e-8."""

# Accumulated roundings along the deepest path of the tests' tiny pipeline
# (registry preset "tiny"): VAE encoder (widths 8/16, 3x3 convs: reductions of
# <= 144, ~1e3 along it), UNet (widths 32/64, skip concats up to 128 channels:
# 3x3 convs reduce 36..1152 terms, ~1.3e4 from conv_in to conv_out with the
# attention and motion linears), the loss's mean over 4x8x16x16 latents:
# ~2e4 roundings.  Their worst case, 2e4 x u = 1.2e-3 of the loss, would not
# tell one noise draw's loss from another's (the tiny teacher's losses are
# 1.1 +- 0.03 and two draws' can be 5e-4 apart), so losses use the random-walk
# size of those roundings, u x sqrt(2e4) = u x 141, at 10 standard deviations.
TINY_TEACHER_LOSS_TERMS = 1_500
"""Per-sample denoising losses: 1.5e3 x u = 9e-5 of max|loss| (~1e-4 abs at 1.1)."""
# The gradient w.r.t. the encoder's weights adds the backward pass through the
# UNet (~1.3e4 again), W_proj (d_v = 32) and the tiny CLIP encoder (32 wide,
# 2 layers, 8x8x3 patches: ~1e3).
TINY_TEACHER_GRAD_TERMS = 40_000
"""Features' or encoder weights' gradients: 40k x u = 2.4e-3 of max|grad| (the worst
case; a gradient defect -- a draw, a sample or a 1/K factor wrong -- is >= 1/3 of it)."""

# The tiny VLMs (students' tiny presets: CLIP/ViT towers and Llama/Qwen LMs 32
# wide, MLP 64, 2 layers each, 8x8x3 patches, sequences of ~200 tokens): along
# the deepest path to the logits, patch embedding (192) + per layer q.k (16),
# attention x values (<= 200), out projection (32), MLP (32 + 64), then the
# projector and LM head (32 each): ~1.5e3 roundings.
TINY_VLM_TERMS = 2_000
"""Tiny VLM features, logits or losses: 2e3 x u = 1.2e-4 of max|value|."""

Values = torch.Tensor | dict[str, torch.Tensor]


def _flat(values: Values) -> torch.Tensor:
    if isinstance(values, dict):
        return torch.cat([v.detach().double().flatten() for _, v in sorted(values.items())])
    return torch.as_tensor(values).detach().double().flatten()


def max_abs(values: Values) -> float:
    """Largest |value| of a tensor or of a dict of tensors."""
    flat = _flat(values)
    return flat.abs().max().item() if flat.numel() else 0.0


def max_abs_diff(a: Values, b: Values) -> float:
    """Largest elementwise |a - b| (dicts: same keys, compared per key)."""
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and a, (
            sorted(a),
            sorted(b),
        )
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.shape == flat_b.shape, (flat_a.shape, flat_b.shape)
    return (flat_a - flat_b).abs().max().item()


def fp32_atol(magnitude: float, terms: int) -> float:
    """Absolute bound for two fp32 evaluations differing in sum order: terms x u x magnitude."""
    return terms * FP32_U * magnitude


def assert_fp32_close(
    actual: Values,
    expected: Values,
    *,
    terms: int,
    what: str = "values",
    magnitude: float | None = None,
) -> float:
    """|actual - expected| <= terms x u x max|expected| elementwise; returns the bound.

    ``terms`` is the accumulated-roundings count of the computation (see above);
    the magnitude is the reference's largest |value|, which must be non-zero
    (a comparison of zeros proves nothing).  Pass ``magnitude`` when the summands
    can be larger than the compared results (means of tokens: max|token|, not
    max|mean|), since the rounding errors scale with the summands.
    """
    if magnitude is None:
        magnitude = max_abs(expected)
    assert magnitude > 0, f"{what}: the reference is all zeros, the comparison would be vacuous"
    tol = fp32_atol(magnitude, terms)
    diff = max_abs_diff(actual, expected)
    log = os.environ.get("VIDALIGN_NUMERICS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{what}\tdiff={diff:.3e}\ttol={tol:.3e}\tmax={magnitude:.3e}\tterms={terms}\n")
    assert diff <= tol, (
        f"{what}: max abs diff {diff:.3e} > {tol:.3e} "
        f"(= {terms} terms x u 6e-8 x max|value| {magnitude:.3e}): more than fp32 sum order explains"
    )
    return tol


TINY_TEACHER_GRAD_NORM_TERMS = 2_000
"""A gradient's norm sums its ~4e4-rounding entries' errors in quadrature:
10 sigma of u x sqrt(4e4) -> 2e3 x u = 1.2e-4 of the norm."""


def trajectory_scalar_atol(
    reference: list[float], *, terms: int, decimals: int | None = None
) -> float:
    """Bound on a per-step scalar (loss, grad norm) of two runs of one AdamW trajectory.

    Step 1 sees the same weights, so the scalars differ by the recomputation's
    rounding: terms x u x max|value|.  Later steps see weights that differ by
    at most ADAM_TRAJECTORY_REL of the distance they travelled (above), and the
    scalar moved by max|x_k - x_1| over that distance, so to first order it
    differs by at most ADAM_TRAJECTORY_REL of that span.  Values logged with
    ``decimals`` digits carry half a unit of the last digit each.
    """
    assert reference, "no steps to compare"
    magnitude = max(abs(x) for x in reference)
    span = max(abs(x - reference[0]) for x in reference)
    rounding = 10.0**-decimals if decimals is not None else 0.0
    return fp32_atol(magnitude, terms) + ADAM_TRAJECTORY_REL * span + rounding


def assert_same_trajectory_scalars(
    actual: list[float],
    expected: list[float],
    *,
    terms: int,
    decimals: int | None = None,
    what: str = "losses",
) -> float:
    """Per step, |actual - expected| <= trajectory_scalar_atol(expected); returns the bound."""
    assert len(actual) == len(expected) and expected, (actual, expected)
    tol = trajectory_scalar_atol(list(expected), terms=terms, decimals=decimals)
    diff = max(abs(a - b) for a, b in zip(actual, expected, strict=True))
    log = os.environ.get("VIDALIGN_NUMERICS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{what}\tdiff={diff:.3e}\ttol={tol:.3e}\tvalues={list(expected)}\n")
    assert diff <= tol, f"{what}: {actual} vs {expected}: max diff {diff:.3e} > {tol:.3e}"
    return tol
