"""MotionEnhancer alignment: token mapping, hooked attention vs eager, prior grids, aligner."""

from __future__ import annotations

import pytest
import torch

from vidalign.data.toy import moving_squares
from vidalign.motionenhancer.align import (
    AttentionAligner,
    PriorItem,
    VisionGrid,
    align_loss,
    build_align_batch,
    capture_text_to_vision,
    covering_tokens,
    frame_positions,
    map_selected_tokens,
    prior_to_grid,
    render_with_offsets,
    vision_grid,
)
from vidalign.motionenhancer.mtti import SelectedToken
from vidalign.students.videollm import load_videollm, tiny_tokenizer

from ..support.numerics import TINY_VLM_TERMS, assert_fp32_close

TEXT = "The red ball's bouncing, then stops."


def _bpe_tokenizer():
    """A BPE trained on the fly (whitespace + punctuation pre-tokenizer): real subwords."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the red ball is bouncing", "balls bounce and stop", "then it stops", "red balls"]
    corpus += ["The ball's, bounced."]
    # A small vocabulary: "bouncing" -> "bounc" "in" "g", "stops" -> "stop" "s".
    tok.train_from_iterator(
        corpus * 20, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _t5_tokens(text: str) -> list[SelectedToken]:
    """Every non-special token of the tiny T5 tokenizer, as the priors store them."""
    from vidalign.motionenhancer import tiny_t5_tokenizer

    enc = tiny_t5_tokenizer()(text, return_offsets_mapping=True, add_special_tokens=False)
    return [
        SelectedToken(i, (a, b), text[a:b], 0.0)
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a
    ]


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_t5_tokens_map_to_the_vlm_tokens_covering_the_same_characters(which):
    tok = tiny_tokenizer("tiny-videollava") if which == "char" else _bpe_tokenizer()
    prefix = "USER: <video>\nDescribe. ASSISTANT: "
    vlm_text = prefix + TEXT + "</s>"
    offsets = tok(vlm_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    tokens = _t5_tokens(TEXT)
    assert "".join(t.text for t in tokens) == TEXT.replace(" ", "")
    mapped = map_selected_tokens(tokens, TEXT, vlm_text, len(prefix), offsets)
    for token, cover in zip(tokens, mapped, strict=True):
        a, b = token.span
        assert cover, token
        # The covering tokens span the token's characters, and each one touches them.
        assert offsets[cover[0]][0] <= len(prefix) + a and offsets[cover[-1]][1] >= len(prefix) + b
        assert all(
            offsets[i][0] < len(prefix) + b and offsets[i][1] > len(prefix) + a for i in cover
        )
    # Punctuation: "'" and "," and "." map to tokens holding exactly those characters (or a piece with them).
    for ch in "',.":
        k = next(i for i, t in enumerate(tokens) if t.text == ch)
        assert all(ch in vlm_text[offsets[i][0] : offsets[i][1]] for i in mapped[k])


def test_word_spans_map_to_subwords():
    tok = _bpe_tokenizer()
    enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    start = TEXT.index("bouncing")
    words = [SelectedToken(0, (start - 1, start + 8), " bouncing", 1.0)]  # leading space trimmed
    (cover,) = map_selected_tokens(words, TEXT, TEXT, 0, offsets)
    assert "".join(TEXT[offsets[i][0] : offsets[i][1]] for i in cover) == "bouncing"
    assert len(cover) == 3  # "bounc" "in" "g"
    (stops,) = map_selected_tokens(
        [SelectedToken(0, (TEXT.index("stops"), len(TEXT)), "stops.", 1.0)], TEXT, TEXT, 0, offsets
    )
    assert "".join(TEXT[offsets[i][0] : offsets[i][1]] for i in stops) == "stops."
    assert covering_tokens([(0, 0), (0, 3), (3, 5)], 2, 4) == [1, 2]


@pytest.mark.parametrize("student", ["tiny-videollava", "tiny-qwen2.5-vl", "tiny-internvl3"])
def test_render_locates_prompt_and_target(student):
    llm = load_videollm(student)
    video = torch.from_numpy(moving_squares(1, frames=8, size=32, seed=0)[0].video)[None]
    _, video_text = llm._video_inputs(video)
    prompt, target = "What's moving?", TEXT
    r = render_with_offsets(llm, prompt, target, video_text)
    text = r.head + r.reply
    assert r.head[r.prompt_offset : r.prompt_offset + len(prompt)] == prompt
    assert r.reply[r.target_offset : r.target_offset + len(target)] == target
    ids = llm.build_inputs(video, [prompt], [target])["input_ids"][0].tolist()
    assert ids == r.ids and len(r.offsets) == len(ids)
    b = len(r.head) + r.target_offset + TEXT.index("ball")
    cover = covering_tokens(r.offsets, b, b + 4)
    assert "".join(text[r.offsets[i][0] : r.offsets[i][1]] for i in cover) == "ball"


def _eager_rows(llm, inputs, queries, keys):
    llm.model.set_attn_implementation("eager")
    try:
        out = llm.model(**inputs, output_attentions=True)
    finally:
        llm.model.set_attn_implementation("sdpa")
    att = torch.stack(out.attentions).mean((0, 2))  # layers, heads -> (B, L, L)
    rows = torch.stack([att[b][queries[b].clamp_min(0)][:, keys[b]] for b in range(len(att))])
    return rows * (queries >= 0).unsqueeze(-1), out.loss


@pytest.mark.parametrize(
    "student", ["tiny-videollava", "tiny-qwen2.5-vl", "tiny-internvl3", "tiny-llava-next-video"]
)
def test_hooked_rows_equal_eager_attention_and_carry_gradients(student):
    llm = load_videollm(student)
    clips = moving_squares(2, frames=16, size=32, seed=1)
    videos = torch.stack([torch.from_numpy(c.video) for c in clips])
    inputs = llm.build_inputs(videos, ["Describe the video.", "Go?"], [c.caption for c in clips])
    length = inputs["input_ids"].shape[1]
    second = int(inputs["attention_mask"][1].sum())  # shorter row: right padding after it
    queries = torch.tensor([[length - 1, length - 7, 2], [second - 1, second - 4, -1]])
    keys = torch.stack([(r == llm.video_token_id).nonzero().flatten() for r in inputs["input_ids"]])
    assert keys.shape[1] == vision_grid(llm).n_tokens
    with capture_text_to_vision(llm.model, queries, keys, inputs["attention_mask"]) as cap:
        out = llm.model(**inputs)
    assert llm.config.text_config._attn_implementation == "sdpa"  # the model itself was not eager
    expected, eager_loss = _eager_rows(llm, inputs, queries, keys)
    assert cap.layers == llm.config.text_config.num_hidden_layers
    # The capture is a forward hook that returns nothing: the hooked forward is the plain
    # sdpa forward, bit for bit (same kernels, same inputs, same process).
    assert torch.equal(out.loss, llm.model(**inputs).loss)
    # sdpa vs eager: the same model summed in another order, whose hidden states drift apart
    # along the LM's depth; the hook recomputes softmax(q k^T) from sdpa's. TINY_VLM_TERMS
    # (2e3) x u x max|value| (support/numerics.py). Measured <= 9.3e-10 on rows of max
    # 5e-3..1.2e-2 (bounds 5.9e-7..1.4e-6) and 0 on losses of 4.9 (bound 5.8e-4), across the
    # 4 families. A wrong query or key index, a missing causal/padding mask, or a layer not
    # averaged moves rows by O(their own size).
    assert_fp32_close(cap.attention, expected, terms=TINY_VLM_TERMS, what=f"{student} rows")
    assert_fp32_close(out.loss, eager_loss, terms=TINY_VLM_TERMS, what=f"{student} eager loss")
    assert cap.attention[1, 2].abs().sum() == 0  # padded query row
    cap.attention[:, :2].sum().backward()
    q_proj = next(
        m for n, m in llm.model.named_modules() if n.endswith("layers.0.self_attn.q_proj")
    )
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0


def test_prior_resampled_onto_each_family_grid():
    prior = torch.zeros(2, 4, 4, 4)
    prior[0, 3, 0, 0] = 1.0  # last token frame, top-left
    prior[1] = 1.0
    for g in (
        VisionGrid(8, 4, 4, 136, tuple(range(128)), 1, 8),
        VisionGrid(4, 2, 2, 16, tuple(range(16)), 2, 8),
    ):
        rows = prior_to_grid(prior, g)
        assert rows.shape == (2, g.size)
        # Rows x / sum(x): the sum of n = g.size terms carries <= n u, each quotient u more,
        # and summing the quotients n u again: 2n + 1 roundings of 1 (worst case; measured
        # 0, bound 1.5e-5 for n = 128). A lost or doubled cell moves a sum by >= 1/n.
        assert_fp32_close(rows.sum(-1), torch.ones(2), terms=2 * g.size + 1, what="grid row sums")
        grid0 = rows[0].view(g.frames, g.height, g.width)
        assert grid0[-1, 0, 0] == grid0.max() and grid0[0].sum() == 0
        # A constant prior: linear resampling on three axes (a product and a sum each, so 6
        # roundings) then the normalisation above (n + 1): measured 0, bound 6.3e-8 of 1/128.
        # A wrong interpolation weight (not summing to 1) moves cells by O(1/n).
        uniform = torch.full((g.size,), 1.0 / g.size)
        assert_fp32_close(rows[1], uniform, terms=g.size + 7, what="uniform prior on the grid")
    # Frame positions: a 16-frame clip, the teacher saw 13 frames as 4 token frames.
    g = VisionGrid(4, 2, 2, 16, tuple(range(16)), 2, 8)
    pos = frame_positions(g, clip_frames=16, teacher_frames_used=13, teacher_token_frames=4)
    assert pos.shape == (4,) and pos[0] < pos[1] < pos[2] <= pos[3] <= 3


def test_family_grids():
    sizes = {}
    for name in ("tiny-videollava", "tiny-qwen2.5-vl", "tiny-internvl3", "tiny-llava-next-video"):
        g = vision_grid(load_videollm(name))
        sizes[name] = (g.frames, g.height, g.width, g.n_tokens)
    assert sizes == {
        "tiny-videollava": (8, 4, 4, 8 * 17),  # CLS per frame kept in the sequence, not in the grid
        "tiny-qwen2.5-vl": (4, 2, 2, 16),
        "tiny-internvl3": (8, 2, 2, 32),
        "tiny-llava-next-video": (8, 2, 2, 32),
    }


def test_aligner_is_small_and_starts_as_identity():
    for n, h in ((128, 16), (2048, 64)):
        a = AttentionAligner(n, h)
        count = sum(p.numel() for p in a.parameters())
        assert count == AttentionAligner.param_bound(n, h) == 2 * n * h + h * h + 2 * h + n
    # The tiny default (N = 128 cells, h = 16) is under 10% of the tiny VLM; h = 64 on a
    # 16-frame Qwen2.5-VL-7B grid (8 x 16 x 16 = 2048 cells) is < 300k params (4e-5 of 7B).
    vlm = sum(p.numel() for p in load_videollm("tiny-videollava").model.parameters())
    assert AttentionAligner.param_bound(128, 16) < 0.1 * vlm
    assert AttentionAligner.param_bound(2048, 64) < 300_000
    rows = torch.softmax(torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0)), -1)
    # Zero last layer: the MLP adds exactly 0, so the output is softmax(log rows) = rows up
    # to log's and exp's roundings (relative error u x |log r| <= 15 u for r >= 1e-6 each)
    # and the softmax's normalisation over 128 cells (2 x 128 + 1 roundings): 300 x u x
    # max|row| (0.2): 3.6e-6; measured 1.5e-8. A last layer not zeroed moves rows by O(1).
    assert_fp32_close(AttentionAligner(128, 16)(rows), rows, terms=300, what="identity aligner")


def test_align_loss_uses_only_selected_rows():
    prior = torch.softmax(torch.randn(2, 3, 10), -1)
    vlm = torch.softmax(torch.randn(2, 3, 10), -1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = torch.stack(
        [
            (vlm[0, 0] - prior[0, 0]).pow(2).sum(),
            (vlm[0, 1] - prior[0, 1]).pow(2).sum(),
            (vlm[1, 0] - prior[1, 0]).pow(2).sum(),
        ]
    ).mean()
    # Same squared distances, reduced in another order (a masked sum over 6 rows / count vs a
    # mean of 3): 10 (row sums) + 6 + 1 roundings of |loss| (0.075). Measured 0 (bound 7.6e-8);
    # an unmasked row or a wrong count moves the loss by >= 1/3 of a row's distance.
    assert_fp32_close(align_loss(vlm, prior, mask), expected, terms=17, what="align loss")
    assert align_loss(prior, prior, mask) == 0


def test_align_batch_pools_covering_rows():
    llm = load_videollm("tiny-videollava")
    clip = moving_squares(1, frames=16, size=32, seed=0)[0]
    caption = clip.caption
    words = [caption.index("moves"), caption.index("square")]
    tokens = [
        SelectedToken(
            0, (w, caption.index(" ", w) if " " in caption[w:] else len(caption)), "", 1.0
        )
        for w in words
    ]
    item = PriorItem(tokens=tokens, prior=torch.rand(2, 4, 4, 4), text=caption, frames_used=13)
    grid = vision_grid(llm)
    video = torch.from_numpy(clip.video)[None]
    batch = build_align_batch(
        llm,
        video.expand(2, -1, -1, -1, -1),
        ["Describe the video."] * 2,
        [caption, "right"],
        [item, item],
        grid,
    )
    assert batch.mask.tolist() == [[True, True], [False, False]]  # row 2: caption absent -> CE only
    # Char-level tokenizer: "moves" -> 5 VLM tokens, each with weight 1/5, and they decode to the word.
    picked = batch.queries[0][batch.pool[0, 0] > 0]
    # Exact: 1.0 / 5 in float64 rounded to float32 is float32(0.2), as torch.full stores it.
    assert torch.equal(batch.pool[0, 0][batch.pool[0, 0] > 0], torch.full((5,), 0.2))
    assert llm.tokenizer.decode(batch.inputs["input_ids"][0, picked]) == "moves"
    # Normalised rows of grid.size cells: 2n + 1 roundings of 1 (as in the test above).
    sums = batch.prior[0].sum(-1)
    assert_fp32_close(sums, torch.ones(2), terms=2 * grid.size + 1, what="prior sums")
