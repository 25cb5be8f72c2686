"""The tiny teachers' word-level tokenizers hold whole SynthMotion captions, one token per word;
the CogVideoX caption gap is deterministic and paired; saved demo teachers keep their tokenizers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidalign.data.synth import generate
from vidalign.data.synth_vocab import CAPTION_VOCAB_VERSION, CAPTION_WORDS
from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput
from vidalign.motionenhancer import diagnostics
from vidalign.motionenhancer.cogvideox import COGVIDEOX_MODELS, load_cogvideox, tiny_t5_tokenizer
from vidalign.motionenhancer.diagnostics import caption_gap
from vidalign.vda.tokenizer import TINY_MODEL_MAX_LENGTH, tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO_ASSETS = REPO / "assets" / "demo"
WORD = re.compile(r"\w+|[^\w\s]")
"""A caption's words and punctuation marks: what each tokenizer should make one token each."""


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """400 SynthMotion captions (16 frames: up to 4 reversals) and 50 toy ones."""
    synth = [c.caption for c in generate(400, seed=0, frames=16, size=32)]
    return synth + [c.caption for c in moving_squares(50, frames=8, size=32, seed=0)]


@pytest.fixture(scope="module")
def longest(captions) -> str:
    return max(captions, key=lambda c: len(WORD.findall(c)))


def test_the_word_list_covers_every_caption_word(captions, longest):
    used = {w.lower() for c in captions for w in WORD.findall(c) if w.isalnum()}
    assert used <= set(CAPTION_WORDS), sorted(used - set(CAPTION_WORDS))
    assert len(set(CAPTION_WORDS)) == len(CAPTION_WORDS)
    assert all(w == w.lower() and w.isalnum() for w in CAPTION_WORDS)
    # The bound the windows are sized for: 4 objects, a 3-action actor (cogvideox.py).
    assert len(WORD.findall(longest)) == 70


def test_the_word_list_is_versioned():
    """Editing the list changes trained encoders' ids: it must come with a version bump."""
    digest = hashlib.sha256(" ".join(CAPTION_WORDS).encode()).hexdigest()[:12]
    assert (CAPTION_VOCAB_VERSION, len(CAPTION_WORDS), digest) == (1, 59, "cf6c34bf7c83")


def _words(text: str) -> list[tuple[str, tuple[int, int]]]:
    return [(m.group(), m.span()) for m in WORD.finditer(text)]


def test_t5_caption_words_are_single_tokens_with_word_spans(captions, longest):
    tok = tiny_t5_tokenizer()
    assert tok.model_max_length == COGVIDEOX_MODELS["tiny-cogvideox"].max_text_len == 96
    for caption in captions:
        enc = tok(caption, return_offsets_mapping=True, add_special_tokens=False)
        assert [tuple(span) for span in enc["offset_mapping"]] == [s for _, s in _words(caption)]
        assert tok.unk_token_id not in enc["input_ids"]
    # The longest caption through the teacher's own encoding: nothing cut, every word one
    # eligible token for MTTI (real and not special) whose span is that word.
    teacher = load_cogvideox("tiny-cogvideox")
    encoded = teacher.encode_prompt(longest)
    words = _words(longest)
    n = len(words)
    assert n + 1 <= teacher.spec.max_text_len - 20  # </s>, and room to spare
    assert int(encoded.attention_mask.sum()) == n + 1
    eligible = (encoded.attention_mask[0].bool() & ~encoded.special[0]).nonzero().flatten().tolist()
    assert eligible == list(range(n))
    assert [longest[a:b] for a, b in encoded.offsets[0][:n]] == [w for w, _ in words]
    pieces = tok.convert_ids_to_tokens(encoded.input_ids[0, : n + 1].tolist())
    assert pieces[-1] == "</s>" and "▁slides" in pieces  # the actor's motion, now in the window


def test_t5_falls_back_to_characters():
    tok = tiny_t5_tokenizer(32)
    text = "Zebras leap, 7 times!"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    # "times" is a word; the rest is one token per character, a word start marked "▁".
    assert pieces == ["▁Z", "e", "b", "r", "a", "s", "▁l", "e", "a", "p", ",", "▁7", "▁times", "!"]
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text.replace(" ", "")
    assert tok.decode(enc["input_ids"]) == text
    # Character pieces keep the ids of the first, character-only tokenizer (a prefix of this one).
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>", "▁"]) == [0, 1, 2, 3]
    assert len(tok) == 302


def test_clip_caption_words_are_single_tokens(captions, longest):
    tok = tiny_clip_tokenizer()
    assert tok.model_max_length == TINY_MODEL_MAX_LENGTH == 77
    assert len(tok) == 691  # 512 byte tokens + 177 merged + BOS/EOS
    for caption in captions:
        pieces = tok.tokenize(caption)
        assert pieces == [w.lower() + "</w>" for w in WORD.findall(caption)], caption
    ids = tok(longest, padding="max_length", max_length=tok.model_max_length).input_ids
    n = len(WORD.findall(longest))
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[n + 1] == tok.eos_token_id
    assert n + 2 <= 77  # the longest caption (72 with BOS/EOS) fits the window, nothing cut


def test_clip_falls_back_to_bytes():
    tok = tiny_clip_tokenizer()
    text = "Zebras leap über 7 squares"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # An unlisted word takes sub-word pieces, a listed one stays one token.
    *pieces, last = tok.tokenize("squares left")
    assert len(pieces) > 1 and "".join(pieces) == "squares</w>" and last == "left</w>"


_BUILD = """
import json, sys
from vidalign.motionenhancer.cogvideox import tiny_t5_tokenizer
from vidalign.vda.tokenizer import tiny_clip_tokenizer
text = sys.argv[1]
print(json.dumps({"clip": tiny_clip_tokenizer()(text).input_ids,
                  "t5": tiny_t5_tokenizer()(text).input_ids}))
"""


def test_tokenizers_are_deterministic_across_processes(tmp_path, longest):
    text = longest + " Zebras leap über 7 squares."
    ours = {"clip": tiny_clip_tokenizer()(text).input_ids, "t5": tiny_t5_tokenizer()(text).input_ids}
    env = {**os.environ, "VIDALIGN_CACHE": str(tmp_path / "fresh"), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _BUILD, text], env=env, capture_output=True, text=True, timeout=600,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ours
    # The other process wrote its own cache: the same files, byte for byte.
    (fresh,) = (tmp_path / "fresh" / "tokenizers").iterdir()
    (mine,) = (Path(os.environ["VIDALIGN_CACHE"]) / "tokenizers").iterdir()
    assert fresh.name == mine.name and fresh.name.startswith("clip-words-v2-")
    for name in ("vocab.json", "merges.txt"):
        assert (fresh / name).read_bytes() == (mine / name).read_bytes(), name


@pytest.mark.skipif(not DEMO_ASSETS.is_dir(), reason="no demo assets (make demo-assets)")
def test_saved_demo_teachers_keep_their_tokenizers():
    from vidalign.vda import load_teacher

    cogvideox = load_cogvideox("tiny-cogvideox", repo=str(DEMO_ASSETS / "cogvideox"))
    # The word-level tokenizer and 96-token window it was pretrained with, read from its files.
    preset = load_cogvideox("tiny-cogvideox")
    assert cogvideox.spec.max_text_len == 96 and len(cogvideox.tokenizer) == len(preset.tokenizer)
    assert cogvideox.tokenizer.get_vocab() == preset.tokenizer.get_vocab()
    encoded = cogvideox.encode_prompt("a red bar slides left")
    assert encoded.embeds.shape == (1, 96, 32) and int(encoded.attention_mask.sum()) == 5 + 1  # words + EOS
    assert load_cogvideox(str(DEMO_ASSETS / "cogvideox")).spec.max_text_len == 96
    animatediff = load_teacher("tiny-animatediff", base=str(DEMO_ASSETS / "animatediff" / "base"))
    vocab = animatediff.tokenizer.get_vocab()
    assert len(vocab) == 103 and animatediff.tokenizer.model_max_length == 128
    assert animatediff.encode_text(["a red bar slides left"]).shape[1] == 128


# --- the caption gap ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gap_inputs():
    clips = generate(3, seed=5, frames=16, size=32)
    return torch.stack([torch.from_numpy(c.video) for c in clips]), [c.caption for c in clips]


def test_caption_gap_runs_and_is_deterministic(gap_inputs):
    teacher = load_cogvideox("tiny-cogvideox")
    videos, texts = gap_inputs
    gap = caption_gap(teacher, videos, texts, timesteps=[200, 800], seeds=[0, 1])
    assert [g.timestep for g in gap.per_timestep] == [200, 800] and gap.clips == 3
    for g in gap.per_timestep:
        assert all(loss > 0 for loss in (g.own_loss, g.other_loss, g.swapped_loss))
        # The random-init teacher reads its text: a different caption changes the loss.
        assert g.other_loss != g.own_loss and g.swapped_loss != g.own_loss
    again = caption_gap(teacher, videos, texts, timesteps=[200, 800], seeds=[0, 1])
    assert again == gap  # same noise, same numbers
    summary = gap.to_dict()
    assert summary["swapped_gap"] == pytest.approx(
        sum(row["swapped_gap"] for row in summary["per_timestep"]) / 2
    )
    # A clip's noise depends on (seed, clip, timestep) only: dropping a timestep keeps the other.
    assert caption_gap(teacher, videos, texts, timesteps=[800], seeds=[0, 1]).per_timestep == (
        gap.per_timestep[1],
    )


def test_caption_gap_is_paired(gap_inputs, monkeypatch):
    """With the same text under all three captions the gaps vanish: only the text differs."""
    teacher = load_cogvideox("tiny-cogvideox")
    videos, texts = gap_inputs
    monkeypatch.setattr(diagnostics, "swap_motion_words", lambda caption: caption)
    gap = caption_gap(teacher, videos, [texts[0]] * 3, timesteps=[500], seeds=[0])
    # Identical batch rows: equal up to the kernels' row-position effects (none measured).
    assert gap.other_gap == pytest.approx(0.0, abs=1e-6)
    assert gap.swapped_gap == pytest.approx(0.0, abs=1e-6)


def test_caption_gap_validates_its_inputs(gap_inputs):
    teacher = load_cogvideox("tiny-cogvideox")
    videos, texts = gap_inputs
    with pytest.raises(InvalidInput, match="at least 2 clips"):
        caption_gap(teacher, videos[:1], texts[:1])
    with pytest.raises(InvalidInput, match="timesteps"):
        caption_gap(teacher, videos, texts, timesteps=[1000])
    with pytest.raises(InvalidInput, match="seeds"):
        caption_gap(teacher, videos, texts, seeds=[])
    with pytest.raises(InvalidInput, match="states no direction"):
        caption_gap(teacher, videos[:2], ["a red bar", "a blue ring"])
