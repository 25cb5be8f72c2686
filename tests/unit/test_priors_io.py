"""Priors survive a round trip to disk; foreign files are refused by name."""

import pytest
import torch

from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput
from vidalign.motionenhancer import extract_priors, load_cogvideox
from vidalign.motionenhancer.io import load_priors, save_priors


def test_round_trip(tmp_path):
    teacher = load_cogvideox("tiny-cogvideox")
    clip = moving_squares(1, frames=9, size=32, seed=2)[0]
    priors = extract_priors(teacher, clip.video, clip.caption, steps=2)
    save_priors(priors, tmp_path / "p.safetensors", prompt=clip.caption, meta={"clip_id": clip.clip_id})
    back, prompt = load_priors(tmp_path / "p.safetensors")
    assert prompt == clip.caption
    assert torch.equal(back.prior, priors.prior) and torch.equal(back.head_scores, priors.head_scores)
    assert back.selected_heads == priors.selected_heads
    assert [(t.index, t.span, t.text) for t in back.selected_tokens] == [
        (t.index, t.span, t.text) for t in priors.selected_tokens
    ]
    assert all(clip.caption[t.span[0] : t.span[1]] == t.text for t in back.selected_tokens)
    assert back.metadata["clip_id"] == clip.clip_id


def test_foreign_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(InvalidInput, match=r"x\.safetensors"):
        load_priors(tmp_path / "x.safetensors")
