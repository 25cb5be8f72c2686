"""Comparing two training runs that should be the same run up to float rounding."""

from __future__ import annotations

import math

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
    assert ratio <= rel, (
        f"weights differ by {ratio:.3e} of the distance they travelled (allowed {rel:.0e}): "
        "more than fp32 summation order explains"
    )
