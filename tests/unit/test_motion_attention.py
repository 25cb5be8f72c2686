"""Streaming attention capture: stock-equal output, exact statistics, processor restore.

Both capture methods are tested on the CPU: ``fused`` (the default here: the flash
kernel's logsumexp) and ``chunked`` (the default on devices without that kernel).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from vidalign.errors import InvalidInput
from vidalign.motionenhancer import attention as attention_module
from vidalign.motionenhancer.attention import (
    CPU_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    AttentionStats,
    _rope,
    _split_heads,
    auto_chunk_size,
    capture_attention,
)
from vidalign.motionenhancer.cogvideox import load_cogvideox

from ..support.numerics import FP32_U, assert_fp32_close

# The tiny CogVideoX (2 layers, 2 heads of 16, 32 wide, FF 128, <= 8 + 16 x 4 = 72 tokens):
# per layer q.k (16) + softmax over <= 72 keys + attention x values (72) + projections (32)
# + FF (32 + 128) ~ 350 roundings, ~700 through both; the streamed statistics add chunked
# log-sum-exps and sums over <= 64 x 64 vision cells (cascade-summed). 1e3 x u = 6e-5 of
# the largest compared value. A statistic taken over the wrong rows, keys or chunk
# boundary is off by a fraction of its own size.
ATTENTION_TERMS = 1_000

TEXT_LEN = 8
METHODS = ("fused", "chunked")


def entry_rtol(dim: int, span: float, n_keys: int, lse_max: float) -> float:
    """Per-entry relative bound between the capture and the full map, for ONE attention call.

    Both compute x = q.k / sqrt(d) (sqrt(d) a power of two here: exact) with d-term dot
    products, each within d u X of exact (X = ``span`` = max_ij sum_t |q_it k_jt| / sqrt(d)):
    2 d u X apart. A row normaliser lse = log sum_j e^x_j moves with the x by <= d u X
    (lse is 1-Lipschitz in the max norm), with the N_k exps and the positive N_k-term sum
    by <= (2 N_k + 1) u (the flash kernel rescales its running sum once per key block:
    <= N_k more roundings), with the max shift and the log by 2 u |lse|; two sides:
    2 d u X + (4 N_k + 2) u + 4 u L (L = max|lse|). An entry e^(x - lse) (the full map:
    e^(x - max) / sum) adds the subtraction, u |x - lse| <= u (X + L) per side, and the exp
    and division roundings: relative difference <= u ((4 d + 2) X + 4 N_k + 6 L + 5).
    The same number bounds the lse difference in absolute terms; a row mass (a sum of
    N_v entries on the full map's side) adds N_v u.
    """
    return FP32_U * ((4 * dim + 2) * span + 4 * n_keys + 6 * lse_max + 5)


def _transformer(rope: bool, layers: int = 2) -> CogVideoXTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=layers,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=rope,
        )
    return model.eval()


@pytest.fixture(scope="module")
def teacher():
    return load_cogvideox("tiny-cogvideox")


@pytest.fixture(scope="module", params=[True, False], ids=["rope", "sincos"])
def model(request, teacher):
    if request.param:
        return teacher.transformer, teacher
    return _transformer(rope=False), None


def _inputs(frames: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, 8, 8, generator=g)
    text = torch.randn(batch, TEXT_LEN, 32, generator=g)
    return latents, text


def _forward(transformer, teacher, latents, text):
    rotary = teacher.rotary_emb(latents) if teacher is not None else None
    with torch.no_grad():
        return transformer(
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=torch.tensor([300] * len(latents)),
            image_rotary_emb=rotary,
        ).sample


class _Naive:
    """Test helper: materialises each call's full softmax map of the captured element."""

    def __init__(self, index: int = -1, memory: bool = False) -> None:
        self.maps: list[torch.Tensor] = []
        self.lses: list[torch.Tensor] = []
        self.spans: list[float] = []
        self.index, self.memory = index, memory

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_split_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k = _rope(q, text_len, image_rotary_emb), _rope(k, text_len, image_rotary_emb)
        half = len(x) // 2 if self.memory else len(x)
        kk, vv = k[:half], v[:half]
        if self.memory:
            kk, vv = torch.cat([kk, k[half:]], dim=2), torch.cat([vv, v[half:]], dim=2)
        logits = q[:half] @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = logits.softmax(-1)
        i = self.index % half
        self.maps.append(probs[i])
        self.lses.append(logits.logsumexp(-1)[i])
        span = q[i].abs() @ kk[i].abs().transpose(-1, -2) / math.sqrt(q.shape[-1])
        self.spans.append(span.max().item())
        out_main = probs @ vv
        if self.memory:
            out_ref = F.scaled_dot_product_attention(q[half:], k[half:], v[half:])
            out_main = torch.cat([out_main, out_ref])
        out = out_main.transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        enc, hid = out.split([text_len, hidden_states.size(1)], dim=1)
        return hid, enc


def _expected(maps, lses, frames: int, spatial: int):
    full = torch.stack(maps).mean(0)  # (H, N, N_keys): averaged over layers and calls
    L, Nv = TEXT_LEN, frames * spatial
    f, s, f2 = torch.meshgrid(
        torch.arange(frames), torch.arange(spatial), torch.arange(frames), indexing="ij"
    )
    same = full[:, L + f * spatial + s, L + f2 * spatial + s]  # (H, F, S, F)
    return {
        "same_location": same.permute(0, 2, 1, 3),
        "row_vision_mass": full[:, L:, L : L + Nv].sum(-1),
        "text_to_vision": full[:, :L, L : L + Nv],
        "lse": torch.stack(lses).mean(0),
        # a sum of N_v row masses: compared per row, as float32 sums differ in the 7th digit
        "vision_mass": full[:, L:, L : L + Nv].sum((1, 2)) / Nv,
    }


@pytest.mark.parametrize("method", METHODS)
def test_output_equals_stock_processor(model, method: str) -> None:
    transformer, teacher = model
    latents, text = _inputs(frames=3)
    assert all(
        isinstance(p, CogVideoXAttnProcessor2_0) for p in transformer.attn_processors.values()
    )
    stock = _forward(transformer, teacher, latents, text)
    with capture_attention(transformer, AttentionStats(), chunk_size=7, method=method):
        ours = _forward(transformer, teacher, latents, text)
    # Exact: every output, the captured element's too, is the model's own SDPA (fused: the
    # CPU flash kernel that F.scaled_dot_product_attention runs, called for its logsumexp).
    assert torch.equal(ours, stock), (ours - stock).abs().max().item()


@pytest.mark.parametrize(
    ("method", "frames", "chunk"),
    [
        ("fused", 1, 0),
        ("fused", 3, 13),
        ("chunked", 1, 5),
        ("chunked", 3, 13),
        ("chunked", 4, 1000),
        ("chunked", 2, 1),
        ("chunked", 3, 0),
    ],
)
def test_streaming_stats_equal_full_map(model, method: str, frames: int, chunk: int) -> None:
    transformer, teacher = model
    latents, text = _inputs(frames=frames)
    naive = _Naive()
    originals = dict(transformer.attn_processors)
    transformer.set_attn_processor(naive)
    try:
        for step in range(2):  # two "timesteps": averaged over layers and calls
            _forward(transformer, teacher, latents + step, text)
    finally:
        transformer.set_attn_processor(originals)
    stats = AttentionStats()
    with capture_attention(transformer, stats, chunk_size=chunk, method=method):
        for step in range(2):
            _forward(transformer, teacher, latents + step, text)
    assert stats.layer_calls == 4 and stats.forwards == 2
    assert stats.grid is not None and stats.grid.frames == frames and stats.grid.spatial == 16
    expected = _expected(naive.maps, naive.lses, frames, 16)
    for name, value in expected.items():
        got = getattr(stats, name) / (16 * frames if name == "vision_mass" else 1)
        assert got.shape == value.shape, name
        # Streamed vs full map through two layers (the second layer's inputs carry the
        # first one's output roundings): u x 1e3 x max|statistic|; measured <= 1/129 of
        # the bound (both methods). One call alone, entrywise: entry_rtol, below.
        assert_fp32_close(got, value, terms=ATTENTION_TERMS, what=f"streamed {name}")


def _assert_entries_close(stats: AttentionStats, naive: _Naive, frames: int, n_keys: int) -> None:
    """One attention call: every statistic within ``entry_rtol`` of the full map's, entrywise."""
    assert stats.layer_calls == 1 and len(naive.maps) == 1
    expected = _expected(naive.maps, naive.lses, frames, 16)
    lse_max = expected["lse"].abs().max().item()
    rtol = entry_rtol(16, naive.spans[0], n_keys, lse_max)
    assert rtol < 1e-4  # a defect (a wrong row, key or chunk boundary) is off by O(1)
    for name in ("same_location", "row_vision_mass", "text_to_vision"):
        got, want = getattr(stats, name), expected[name]
        tol = rtol + (16 * frames * FP32_U if name == "row_vision_mass" else 0.0)
        assert got.shape == want.shape, name
        assert (want > 0).all(), name
        worst = ((got - want).abs() / want).max().item()
        # measured <= 14.4 u relative (8.6e-7) against bounds of 365-606 u here
        assert worst <= tol, f"{name}: relative difference {worst:.2e} > {tol:.2e}"
    worst = (stats.lse - expected["lse"]).abs().max().item()
    assert worst <= rtol, f"lse: difference {worst:.2e} > {rtol:.2e}"


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "sincos"])
@pytest.mark.parametrize(("method", "chunk"), [("fused", 0), ("chunked", 5), ("chunked", 0)])
@pytest.mark.parametrize("frames", [1, 3])
def test_one_call_entries_within_derived_bound(
    teacher, rope: bool, method: str, chunk: int, frames: int
) -> None:
    transformer = _transformer(rope=rope, layers=1)
    owner = teacher if rope else None
    latents, text = _inputs(frames=frames)
    naive = _Naive()
    transformer.set_attn_processor(naive)
    _forward(transformer, owner, latents, text)
    transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    stats = AttentionStats()
    with capture_attention(transformer, stats, chunk_size=chunk, method=method):
        _forward(transformer, owner, latents, text)
    _assert_entries_close(stats, naive, frames, n_keys=TEXT_LEN + 16 * frames)


@pytest.mark.parametrize("method", METHODS)
def test_one_call_memory_entries_within_derived_bound(teacher, method: str) -> None:
    transformer = _transformer(rope=True, layers=1)
    latents, text = _inputs(frames=2, batch=4)
    naive = _Naive(memory=True)
    transformer.set_attn_processor(naive)
    _forward(transformer, teacher, latents, text)
    transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    stats = AttentionStats()
    stats.memory = True
    with capture_attention(transformer, stats, chunk_size=9, method=method):
        _forward(transformer, teacher, latents, text)
    _assert_entries_close(stats, naive, 2, n_keys=2 * (TEXT_LEN + 32))


@pytest.mark.parametrize("method", METHODS)
def test_cross_stream_memory_stats_equal_full_map(teacher, method: str) -> None:
    transformer = teacher.transformer
    latents, text = _inputs(frames=2, batch=4)
    naive = _Naive(memory=True)
    originals = dict(transformer.attn_processors)
    transformer.set_attn_processor(naive)
    try:
        expected_out = _forward(transformer, teacher, latents, text)
    finally:
        transformer.set_attn_processor(originals)
    stats = AttentionStats()
    stats.memory = True
    with capture_attention(transformer, stats, chunk_size=9, method=method):
        out = _forward(transformer, teacher, latents, text)
    # vs the helper's materialised probs @ v: measured 3.6e-7 (bound 1.3e-4)
    assert_fp32_close(out, expected_out, terms=ATTENTION_TERMS, what="memory output")
    expected = _expected(naive.maps, naive.lses, 2, 16)
    expected["vision_mass"] *= 32
    for name, value in expected.items():
        assert_fp32_close(getattr(stats, name), value, terms=ATTENTION_TERMS, what=f"memory {name}")
    # the block is a sub-block of rows normalised over text, own and reference keys
    assert (stats.row_vision_mass < 1).all()


def test_processors_restored_also_on_error(teacher) -> None:
    transformer = teacher.transformer
    before = dict(transformer.attn_processors)
    with capture_attention(transformer, AttentionStats()):
        assert all(
            type(p).__name__ == "StreamingAttnProcessor"
            for p in transformer.attn_processors.values()
        )
    assert dict(transformer.attn_processors) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_attention(transformer, AttentionStats()),
    ):
        raise RuntimeError("boom")
    assert dict(transformer.attn_processors) == before
    assert not transformer._forward_pre_hooks


def test_grid_change_and_empty_stats_rejected(teacher) -> None:
    transformer = teacher.transformer
    stats = AttentionStats()
    with pytest.raises(InvalidInput, match="nothing captured"):
        _ = stats.same_location
    with capture_attention(transformer, stats):
        _forward(transformer, teacher, *_inputs(frames=2))
        with pytest.raises(InvalidInput, match="token grid"):
            _forward(transformer, teacher, *_inputs(frames=3))
    for bad in (-1, True, 2.0):
        with (
            pytest.raises(InvalidInput, match="chunk_size"),
            capture_attention(transformer, AttentionStats(), chunk_size=bad),
        ):
            pass
    with (
        pytest.raises(InvalidInput, match="method"),
        capture_attention(transformer, AttentionStats(), method="dense"),
    ):
        pass


def test_auto_chunk_size_follows_the_budget() -> None:
    cpu = torch.device("cpu")
    # CogVideoX-5B at 49 frames with cross-stream memory: 48 heads, 35,552 keys
    assert auto_chunk_size(48, 17_776, 35_552, cpu) == MIN_CHUNK_ROWS
    rows = auto_chunk_size(2, 100_000, 4_672, cpu)
    assert rows == CPU_CHUNK_BYTES // (4 * 2 * 4_672) and rows > MIN_CHUNK_ROWS
    assert 4 * 2 * rows * 4_672 <= CPU_CHUNK_BYTES
    assert auto_chunk_size(2, 72, 72, cpu) == 72  # a short query: one chunk
    assert auto_chunk_size(2, 1, 10**9, cpu) == 1


def test_fused_falls_back_or_refuses_where_unavailable(teacher, monkeypatch) -> None:
    transformer = teacher.transformer
    latents, text = _inputs(frames=2)
    with capture_attention(transformer, (fused := AttentionStats()), method="fused"):
        _forward(transformer, teacher, latents, text)
    monkeypatch.setattr(attention_module, "fused_available", lambda device, dtype: False)
    with capture_attention(transformer, (auto := AttentionStats())):
        _forward(transformer, teacher, latents, text)  # auto: the chunked method
    for name in ("same_location", "row_vision_mass", "text_to_vision", "lse"):
        assert_fp32_close(
            getattr(auto, name), getattr(fused, name), terms=ATTENTION_TERMS, what=name
        )
    with (
        pytest.raises(InvalidInput, match="fused"),
        capture_attention(transformer, AttentionStats(), method="fused"),
    ):
        _forward(transformer, teacher, latents, text)


def test_bfloat16_model_captures_in_float32(teacher) -> None:
    transformer = _transformer(rope=True, layers=1).to(torch.bfloat16)
    latents, text = (x.to(torch.bfloat16) for x in _inputs(frames=2))
    results = {}
    for method in METHODS:
        stats = AttentionStats()
        with capture_attention(transformer, stats, method=method):
            _forward(transformer, teacher, latents, text)
        results[method] = stats
        assert stats.text_to_vision.dtype == torch.float32
    for name in ("same_location", "row_vision_mass", "text_to_vision"):
        a, b = getattr(results["fused"], name), getattr(results["chunked"], name)
        # the same bfloat16 q, k cast to float32 on both sides: entry_rtol's terms, with
        # X <= 4 (after the LayerNorms, unit weights, |q|, |k| <= sqrt(16): |q| |k| / 4)
        # and |lse| <= X + log(N_k) < 8
        rtol = entry_rtol(16, 4.0, TEXT_LEN + 32, 8.0)
        assert ((a - b).abs() / b).max().item() <= rtol, name


def test_disabled_stats_capture_nothing(teacher) -> None:
    stats = AttentionStats()
    stats.enabled = False
    with capture_attention(teacher.transformer, stats):
        _forward(teacher.transformer, teacher, *_inputs(frames=2))
    assert stats.layer_calls == 0
