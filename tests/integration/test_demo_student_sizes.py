"""`scripts/demo_assets.py`'s student sizes: frame size, patch and tower depth reach the model
it writes, and its token counts stay consistent with them."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_assets():
    spec = importlib.util.spec_from_file_location("demo_assets", REPO / "scripts" / "demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_assets"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_student_config_token_counts_follow_size_and_patch(demo_assets):
    default = demo_assets.student_config(demo_assets.Sizes())
    # The tiny preset: 32 px, 8 px patches: 16 patch tokens; 8 frames x (16 + CLS).
    assert (default.vision_config.image_size, default.image_seq_length, default.video_seq_length) == (32, 16, 136)
    same_grid = demo_assets.student_config(demo_assets.Sizes(student_size=64, student_patch=16, vision_layers=3))
    assert (same_grid.image_seq_length, same_grid.video_seq_length) == (16, 136)
    assert same_grid.vision_config.num_hidden_layers == 3
    finer = demo_assets.student_config(demo_assets.Sizes(student_size=64, student_patch=8))
    assert (finer.image_seq_length, finer.video_seq_length) == (64, 8 * 65)
    with pytest.raises(ValueError, match="not a multiple of student_patch 12"):
        demo_assets.student_config(demo_assets.Sizes(student_size=64, student_patch=12))


def test_a_64_px_student_is_made_at_64_px(demo_assets, tmp_path):
    from vidalign.students.videollm import load_videollm

    sizes = replace(demo_assets.QUICK, student_size=64, student_patch=16)
    manifest = demo_assets.build(tmp_path, sizes, only=["videollm"])
    assert manifest["summary"]["videollm"]["sizes"]["student_size"] == 64
    llm = load_videollm("tiny-videollava", path=str(tmp_path / "videollm" / "model"))
    assert llm.encoder.image_size == 64
    video = torch.zeros(1, 16, 64, 64, 3, dtype=torch.uint8)
    assert torch.isfinite(llm.loss(video, ["How many objects are in the video?"], ["3 (A)"]))
