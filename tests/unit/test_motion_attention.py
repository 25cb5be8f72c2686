"""Streaming attention capture: stock-equal output, exact statistics, processor restore."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from vidalign.errors import InvalidInput
from vidalign.motionenhancer.attention import AttentionStats, _rope, _split_heads, capture_attention
from vidalign.motionenhancer.cogvideox import load_cogvideox

from ..support.numerics import assert_fp32_close

# The tiny CogVideoX (2 layers, 2 heads of 16, 32 wide, FF 128, <= 8 + 16 x 4 = 72 tokens):
# per layer q.k (16) + softmax over <= 72 keys + attention x values (72) + projections (32)
# + FF (32 + 128) ~ 350 roundings, ~700 through both; the streamed statistics add chunked
# log-sum-exps and sums over <= 64 x 64 vision cells (cascade-summed). 1e3 x u = 6e-5 of
# the largest compared value. A statistic taken over the wrong rows, keys or chunk
# boundary is off by a fraction of its own size.
ATTENTION_TERMS = 1_000

TEXT_LEN = 8


def _transformer(rope: bool) -> CogVideoXTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
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
        self.maps.append(probs[self.index % half])
        self.lses.append(logits.logsumexp(-1)[self.index % half])
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


def test_output_equals_stock_processor(model) -> None:
    transformer, teacher = model
    latents, text = _inputs(frames=3)
    assert all(
        isinstance(p, CogVideoXAttnProcessor2_0) for p in transformer.attn_processors.values()
    )
    stock = _forward(transformer, teacher, latents, text)
    with capture_attention(transformer, AttentionStats(), chunk_size=7):
        ours = _forward(transformer, teacher, latents, text)
    # Chunked vs stock SDPA: u x 1e3 x max|out|; measured 3.6e-7 (bound 1.2e-4).
    assert_fp32_close(ours, stock, terms=ATTENTION_TERMS, what="output vs stock")


@pytest.mark.parametrize(("frames", "chunk"), [(1, 5), (3, 13), (4, 1000), (2, 1)])
def test_streaming_stats_equal_full_map(model, frames: int, chunk: int) -> None:
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
    with capture_attention(transformer, stats, chunk_size=chunk):
        for step in range(2):
            _forward(transformer, teacher, latents + step, text)
    assert stats.layer_calls == 4 and stats.forwards == 2
    assert stats.grid is not None and stats.grid.frames == frames and stats.grid.spatial == 16
    expected = _expected(naive.maps, naive.lses, frames, 16)
    for name, value in expected.items():
        got = getattr(stats, name) / (16 * frames if name == "vision_mass" else 1)
        assert got.shape == value.shape, name
        # Streamed vs full map: u x 1e3 x max|statistic|; measured <= 1/160 of
        # the bound (same_location 1.1e-8 vs 3.9e-6).
        assert_fp32_close(got, value, terms=ATTENTION_TERMS, what=f"streamed {name}")


def test_cross_stream_memory_stats_equal_full_map(teacher) -> None:
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
    with capture_attention(transformer, stats, chunk_size=9):
        out = _forward(transformer, teacher, latents, text)
    assert_fp32_close(out, expected_out, terms=ATTENTION_TERMS, what="memory output")  # measured 3.6e-7 (bound 1.3e-4)
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
    with (
        pytest.raises(InvalidInput, match="chunk_size"),
        capture_attention(transformer, AttentionStats(), chunk_size=0),
    ):
        pass


def test_disabled_stats_capture_nothing(teacher) -> None:
    stats = AttentionStats()
    stats.enabled = False
    with capture_attention(teacher.transformer, stats):
        _forward(teacher.transformer, teacher, *_inputs(frames=2))
    assert stats.layer_calls == 0
