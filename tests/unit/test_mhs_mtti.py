"""MHS and MTTI on planted attention patterns."""

from __future__ import annotations

import pytest
import torch

from vidalign.errors import InvalidInput
from vidalign.motionenhancer.mhs import head_metrics, run_stats, select_heads, top_count
from vidalign.motionenhancer.mtti import pool_tokens, select_tokens, token_spans

from ..support.numerics import FP32_U

FRAMES, SPATIAL = 4, 9
NV = FRAMES * SPATIAL


def _same_location(full: torch.Tensor) -> torch.Tensor:
    """(H, N_v, N_v) full maps -> (H, S, F, F) same-location entries."""
    f, s, f2 = torch.meshgrid(
        torch.arange(FRAMES), torch.arange(SPATIAL), torch.arange(FRAMES), indexing="ij"
    )
    return full[:, f * SPATIAL + s, f2 * SPATIAL + s].permute(0, 2, 1, 3)


def _planted(row_mass: float = 0.8) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    frame = torch.arange(NV) // SPATIAL
    loc = torch.arange(NV) % SPATIAL
    temporal = (loc[:, None] == loc[None, :]).float()  # same location, every frame
    spatial = (frame[:, None] == frame[None, :]).float()  # same frame, every location
    uniform = torch.ones(NV, NV)
    maps, kinds = [], []
    for kind, base in (("spatial", spatial), ("temporal", temporal), ("uniform", uniform)) * 2:
        noisy = base + 0.02 * torch.rand(NV, NV, generator=g)
        maps.append(row_mass * noisy / noisy.sum(1, keepdim=True))  # rows: mass on video keys
        kinds.append(kind)
    return torch.stack(maps), kinds


def test_metrics_equal_brute_force_on_full_maps() -> None:
    full = torch.rand(3, NV, NV, generator=torch.Generator().manual_seed(1)) ** 4
    full = 0.7 * full / full.sum(-1, keepdim=True)
    got = head_metrics(_same_location(full), full.sum((1, 2)))
    # The brute force runs in float64 (exact to 1e-16 here); head_metrics' float32 sums are
    # of positive entries, each within (n - 1) u relative for n summands. tau: the mass
    # (n = NV^2 = 1296) and a division: NV^2 u = 7.7e-5. dfc: inside (324 entries), outside =
    # mass - inside (the mass's error grows by mass / outside = 1.1 here) and a division:
    # < 2 NV^2 u = 1.5e-4. Measured: <= 5.6e-8 and 1.8e-7 relative. A mass over a wrong count
    # (N_v (N_v - 1)) moves tau by 2.8%; inside and outside swapped move dfc 60-fold.
    full64 = full.double()
    for h in range(3):
        tau = full64[h].mean()
        mask = torch.zeros(NV, NV, dtype=torch.bool)
        for i in range(NV):
            for j in range(NV):
                mask[i, j] = i % SPATIAL == j % SPATIAL
        inside = full64[h][mask].sum()
        assert got["tau"][h] == pytest.approx(float(tau), rel=NV**2 * FP32_U)
        dfc = float(inside / full64[h][~mask].sum())
        assert got["dfc"][h] == pytest.approx(dfc, rel=2 * NV**2 * FP32_U)
        # DSR and TCS count entries above tau: against head_metrics' own float32 tau, the
        # same comparisons on the same float32 entries, so the counts are exact (a tau a few
        # ulps off could flip an entry lying that close). DSR = count / 324 rounded once in
        # float32 on both sides: equal.
        tau = got["tau"][h]
        assert got["dsr"][h] == (full[h][mask] > tau).float().mean()
        runs_per_row = []
        for s in range(SPATIAL):
            for f in range(FRAMES):
                row = [
                    bool(full[h, f * SPATIAL + s, f2 * SPATIAL + s] > tau) for f2 in range(FRAMES)
                ]
                runs, n = [], 0
                for above in [*row, False]:
                    if above:
                        n += 1
                    elif n:
                        runs.append(n)
                        n = 0
                runs_per_row.append(sum(runs) / len(runs) if runs else 0.0)
        # float32 run-length ratios (u each) averaged over S x F = 36 rows (36 + 1 roundings)
        # against the float64 brute force: 38 u = 2.3e-6 relative; measured <= 2.8e-8. One run
        # miscounted moves it by >= 1/72.
        expected = sum(runs_per_row) / len(runs_per_row)
        assert got["tcs"][h] == pytest.approx(expected, rel=(SPATIAL * FRAMES + 2) * FP32_U)


def test_run_stats() -> None:
    rows = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    assert run_stats(rows).tolist() == [1.5, 0.0, 4.0, 1.0]


def test_temporal_heads_rank_above_spatial_and_uniform() -> None:
    full, kinds = _planted()
    result = select_heads(_same_location(full), full.sum((1, 2)))
    assert {kinds[h] for h in result.selected[:2]} == {"temporal"}
    temporal = [h for h, k in enumerate(kinds) if k == "temporal"]
    others = [h for h, k in enumerate(kinds) if k != "temporal"]
    assert result.score[temporal].min() > result.score[others].max()
    assert len(result.selected) == 3  # top 50% of 6
    # tau is the map mean: row mass / N_v with rows normalised over more than the block.
    # Each entry 0.8 x / rowsum carries (N_v + 3) u, the float32 mass sums N_v^2 of them
    # ((N_v^2 - 1) u) and is divided once: (N_v^2 + N_v + 4) u = 8e-5 relative; measured
    # 6e-8. A mass over the wrong count (N_v (N_v - 1)) is 2.8% off.
    rtol = (NV**2 + NV + 4) * FP32_U
    assert torch.allclose(result.tau, torch.full((6,), 0.8 / NV), rtol=rtol, atol=0)
    only_dsr = select_heads(
        _same_location(full), full.sum((1, 2)), ratio=1 / 3, weights={"dsr": 1.0}
    )
    assert {kinds[h] for h in only_dsr.selected} == {"temporal"}


def test_mhs_validates_inputs() -> None:
    with pytest.raises(InvalidInput, match="same_location"):
        select_heads(torch.zeros(2, 3, 4), torch.zeros(2))
    with pytest.raises(InvalidInput, match="weights"):
        select_heads(torch.zeros(2, 3, 4, 4), torch.ones(2), weights={"foo": 1.0})
    with pytest.raises(InvalidInput, match="ratio"):
        top_count(0.0, 4)
    assert [top_count(0.5, n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]


def test_mtti_keeps_changing_tokens_drops_flat_and_padding() -> None:
    heads, length = 2, 10
    t2v = torch.zeros(heads, length, FRAMES, SPATIAL)
    # tokens 0-2: attention whose per-frame mass changes across frames (pooling over h x w
    # keeps only the per-frame mass: MTTI sees when a token attends, not where)
    for token in range(3):
        for f in range(FRAMES):
            t2v[:, token, f, (f + token) % SPATIAL] = 0.36
            t2v[:, token, f] += 0.02 * (1 + (f % 2))
    # tokens 3-5: the same overall mass, constant over frames
    for token in range(3, 6):
        t2v[:, token] = t2v[:, 0].mean(dim=(1, 2), keepdim=True).expand(-1, FRAMES, SPATIAL)
    t2v[:, 6] = t2v[:, 0].mean()  # </s>: flat, excluded as special
    t2v[:, 7:] = t2v[:, :1] * 5  # padding: strong changing attention, never eligible
    t2v = t2v.reshape(heads, length, NV)
    a_tok = pool_tokens(t2v, [0, 1], FRAMES)
    assert a_tok.shape == (length, FRAMES)
    eligible = torch.tensor([1] * 6 + [0] * 4, dtype=torch.bool)
    result = select_tokens(a_tok, eligible)
    assert result.selected == [0, 1, 2]
    # Tokens 3-5 hold token 0's one-stage float32 mean over its F x S = 36 cells ((36 + 1) u);
    # pooling then averages S cells per frame and F frames, on both sides ((S + F + 2) u
    # each): 2 (F S + F + S + 2) u = 6.1e-6 relative. Measured 1.1e-7. Pooling over the wrong
    # axis or a head left out: O(1).
    rtol = 2 * (NV + FRAMES + SPATIAL + 2) * FP32_U
    assert torch.allclose(result.mean[:3], result.mean[3:6], rtol=rtol, atol=0)
    assert (result.diff[:3] > 0).all() and (result.diff[3:6] == 0).all()
    assert torch.isinf(result.score[6:]).all()
    prompt = "abcdef"
    offsets = [(i, i + 1) for i in range(6)] + [(0, 0)] * 4
    tokens = token_spans(result, offsets, prompt)
    assert [(t.index, t.span, t.text) for t in tokens] == [
        (0, (0, 1), "a"),
        (1, (1, 2), "b"),
        (2, (2, 3), "c"),
    ]
    # weights are configurable: mean only cannot tell flat from changing tokens apart
    only_mean = select_tokens(a_tok, eligible, mean_weight=1.0, diff_weight=0.0, ratio=1.0)
    assert only_mean.selected == list(range(6))


def test_mtti_validates_inputs() -> None:
    with pytest.raises(InvalidInput, match="heads"):
        pool_tokens(torch.zeros(2, 3, 8), [2], 4)
    with pytest.raises(InvalidInput, match="text_to_vision"):
        pool_tokens(torch.zeros(2, 3, 7), [0], 4)
    with pytest.raises(InvalidInput, match="eligible"):
        select_tokens(torch.zeros(3, 4), torch.ones(2))
