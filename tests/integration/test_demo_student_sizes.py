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


@pytest.fixture(scope="module")
def student_64(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("assets-64")
    sizes = replace(demo_assets.QUICK, student_size=64, student_patch=16)
    return out, demo_assets.build(out, sizes, only=["videollm"])


def test_a_64_px_student_is_made_at_64_px(student_64):
    from vidalign.students.videollm import load_videollm

    out, manifest = student_64
    assert manifest["summary"]["videollm"]["sizes"]["student_size"] == 64
    llm = load_videollm("tiny-videollava", path=str(out / "videollm" / "model"))
    assert llm.encoder.image_size == 64
    video = torch.zeros(1, 16, 64, 64, 3, dtype=torch.uint8)
    assert torch.isfinite(llm.loss(video, ["How many objects are in the video?"], ["3 (A)"]))


def test_the_demo_feeds_a_64_px_student_at_64_and_the_32_px_teacher_at_32(student_64, tmp_path):
    from vidalign.data.synth import generate, write_dataset
    from vidalign.store import open_store, read_manifest
    from vidalign_cli.demo import DemoConfig, student_view_size, vda_configs
    from vidalign_trainer.features import extract_features, load_features
    from vidalign_trainer.stage1 import run_stage1

    out, _ = student_64
    student, teacher = out / "videollm", REPO / "assets" / "demo" / "animatediff"
    config = DemoConfig(stage1_steps=1, batch_size=2)
    assert student_view_size(config, student) == 64 and config.size == 32
    train = tmp_path / "train"
    write_dataset(generate(2, seed=5, frames=16, size=64), train)
    stages = vda_configs(tmp_path / "vda", config, train, teacher_weights=teacher,
                         student_weights=student)
    extract_features(stages["features"])
    features = load_features(stages["features"].output.dir)
    assert features.source["data"]["size"] == 64  # the student's view
    assert features.tokens == 8 * 16  # its 8 frames x 4 x 4 tokens, as at 32 px
    result = run_stage1(stages["stage1"])
    assert len(result.losses) == 1 and result.losses[0] > 0
    # The teacher encoded the same clips at its own 32 px.
    key = read_manifest(open_store(stages["stage1"].output.dir), "latents").meta["key"]
    assert (key["resolution"], key["data"]["size"]) == (32, 64)


def test_instruct_data_chooses_whose_questions_tune_the_student(demo_assets, tmp_path):
    # QUICK makes 16 pretraining clips; 8 static clips tell the two sources apart.
    # SynthMotion asks nine questions of every clip.
    sizes = replace(demo_assets.QUICK, static_clips=8)
    for source, clips in (("static", 8), ("pretraining", 16)):
        manifest = demo_assets.build(tmp_path / source, replace(sizes, instruct_data=source),
                                     only=["videollm"])
        info = manifest["summary"]["videollm"]
        assert (info["instruct_data"], info["instruct_examples"]) == (source, 9 * clips)
    # A bad value stops `--size` before anything is built.
    with pytest.raises(ValueError, match="instruct_data: expected 'static' or 'pretraining', got 'frames'"):
        demo_assets.override(sizes, ["instruct_data=frames"])
