"""Motion-aware Head Selection (MotionEnhancer §4.2, docs/papers.md).

Per head h, on its video-to-video attention block A (N_v x N_v, N_v = F * S,
video token j = frame j // S, location j % S), averaged over layers and
timesteps:

* M, the same-location mask: the entries A[(f, s), (f', s)], kept by the
  streaming capture as ``same_location[h, s, f, f']`` (S x F x F, f = f' included).
* tau = mean attention value of the map = (sum of all entries) / N_v^2. The sum
  of all entries is the sum of the row masses (``vision_mass``), so tau needs no
  map either. The capture keeps the model's softmax, normalised over all keys
  (text included), so a row's mass on the video keys is below 1 and
  tau = vision_mass / N_v^2 (= 1 / N_v only if rows were renormalised to the block).
* DFC = mass inside M / mass outside M, with outside = vision_mass - inside:
  a head that concentrates on one location across frames scores high.
* TCS: in every row f of every A_s (A_s[f, f'] = A[(f, s), (f', s)]) take the
  maximal contiguous runs of entries > tau; the row's value is the mean run length
  (0 where it has none); TCS is the mean over all S * F rows.
* DSR = (# entries of M above tau) / (# entries of M) = fraction over S F^2.

Each metric is z-scored across heads (population std; a metric constant across
heads contributes 0), combined as a weighted sum (default weights 1, 1, 1) and
the top ``ratio`` of heads (default 0.5, at least one) are selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vidalign.errors import InvalidInput
from vidalign.papers import ME_HEAD_RATIO, ME_MHS_WEIGHTS

METRICS = ("dfc", "tcs", "dsr")
DEFAULT_WEIGHTS = dict(ME_MHS_WEIGHTS)


@dataclass
class MHSResult:
    tau: torch.Tensor
    """(H,) mean value of each head's video-to-video map."""
    dfc: torch.Tensor
    tcs: torch.Tensor
    dsr: torch.Tensor
    z: dict[str, torch.Tensor]
    """Per metric, (H,) z-scores across heads."""
    score: torch.Tensor
    """(H,) weighted sum of the z-scores."""
    selected: list[int]
    """Selected head indices, best first."""
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


def top_count(ratio: float, n: int) -> int:
    """How many of ``n`` items a ``ratio`` keeps: round half up, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidInput(f"ratio: expected a value in (0, 1], got {ratio!r}")
    if n < 1:
        raise InvalidInput(f"n: expected at least one candidate, got {n}")
    return max(1, min(n, math.floor(ratio * n + 0.5)))


def zscore(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    std = x.std(unbiased=False)
    if not torch.isfinite(std) or std <= eps:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def run_stats(above: torch.Tensor) -> torch.Tensor:
    """Mean length of the maximal runs of True along the last dim (0 where there are none)."""
    starts = above[..., :1].long().sum(-1) + (above[..., 1:] & ~above[..., :-1]).long().sum(-1)
    lengths = above.long().sum(-1)
    return torch.where(
        starts > 0, lengths / starts.clamp(min=1), torch.zeros_like(lengths, dtype=torch.float32)
    )


def head_metrics(
    same_location: torch.Tensor, vision_mass: torch.Tensor, eps: float = 1e-12
) -> dict[str, torch.Tensor]:
    """tau, DFC, TCS, DSR per head from (H, S, F, F) same-location maps and (H,) block masses."""
    if same_location.ndim != 4 or same_location.shape[2] != same_location.shape[3]:
        raise InvalidInput(
            f"same_location: expected shape (H, S, F, F), got {tuple(same_location.shape)}"
        )
    heads, spatial, frames, _ = same_location.shape
    if vision_mass.shape != (heads,):
        raise InvalidInput(
            f"vision_mass: expected shape ({heads},), got {tuple(vision_mass.shape)}"
        )
    same = same_location.float()
    n_vision = spatial * frames
    tau = vision_mass.float() / n_vision**2
    inside = same.sum(dim=(1, 2, 3))
    outside = (vision_mass.float() - inside).clamp(min=0.0)
    above = same > tau.view(heads, 1, 1, 1)
    return {
        "tau": tau,
        "dfc": inside / outside.clamp(min=eps),
        "tcs": run_stats(above).mean(dim=(1, 2)),
        "dsr": above.float().mean(dim=(1, 2, 3)),
    }


def select_heads(
    same_location: torch.Tensor,
    vision_mass: torch.Tensor,
    *,
    ratio: float = ME_HEAD_RATIO,
    weights: dict[str, float] | None = None,
) -> MHSResult:
    """Score heads by z(DFC) + z(TCS) + z(DSR) (weights configurable), keep the top ``ratio``."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if set(weights) - set(METRICS):
        raise InvalidInput(f"weights: expected keys among {METRICS}, got {sorted(weights)}")
    metrics = head_metrics(same_location, vision_mass)
    z = {name: zscore(metrics[name]) for name in METRICS}
    score = sum(weights.get(name, 0.0) * z[name] for name in METRICS)
    assert isinstance(score, torch.Tensor)
    k = top_count(ratio, score.numel())
    order = torch.argsort(score, descending=True, stable=True)
    return MHSResult(
        tau=metrics["tau"],
        dfc=metrics["dfc"],
        tcs=metrics["tcs"],
        dsr=metrics["dsr"],
        z=z,
        score=score,
        selected=[int(i) for i in order[:k]],
        weights=weights,
    )
