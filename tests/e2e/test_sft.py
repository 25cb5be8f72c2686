"""MotionEnhancer SFT end to end on tiny models: priors on disk -> SFT -> L_align falls; resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vidalign.data.toy import moving_squares
from vidalign.motionenhancer import extract_priors, load_cogvideox
from vidalign.motionenhancer.align import AttentionAligner
from vidalign.motionenhancer.io import write_priors_set
from vidalign.store import open_store, read_manifest
from vidalign.students.videollm import load_videollm
from vidalign_trainer.sft import (
    AlignConfig,
    DataConfig,
    OutputConfig,
    SFTConfig,
    TrainConfig,
    run_sft,
)

CLIPS = DataConfig(num_clips=3, frames=16, size=32, seed=0, tasks=["caption", "qa"])


@pytest.fixture(scope="module")
def priors_dir(tmp_path_factory):
    """A committed priors set for the toy clips, in the layout `priors extract` writes."""
    root = tmp_path_factory.mktemp("priors")
    teacher = load_cogvideox("tiny-cogvideox")
    items = {}
    for clip in moving_squares(
        CLIPS.num_clips, frames=CLIPS.frames, size=CLIPS.size, seed=CLIPS.seed
    ):
        items[clip.clip_id] = (extract_priors(teacher, clip.video, clip.caption, steps=1), clip.caption)
    write_priors_set(str(root), items)
    return root


def _config(out, priors, steps=20, every=10) -> SFTConfig:
    return SFTConfig(
        student="tiny-videollava",
        priors=str(priors),
        data=CLIPS,
        align=AlignConfig(weight=1.0, hidden=16),
        train=TrainConfig(
            steps=steps,
            batch_size=2,
            lr_vision=1e-4,
            lr_projector=1e-3,
            lr_llm=1e-3,
            lr_aligner=3e-3,
        ),
        output=OutputConfig(dir=str(out), checkpoint_every=every, keep_latest_k=3),
    )


def test_sft_lowers_l_align_and_commits_the_model(priors_dir, tmp_path):
    result = run_sft(_config(tmp_path / "run", priors_dir))
    # L_align over the training set (caption examples carry it; QA examples CE only).
    assert result.eval_start["align"] > 0
    assert result.eval_end["align"] < 0.9 * result.eval_start["align"]
    # Without the aligner (the VLM's own rows): reported, not asserted; at lambda = 1 the
    # toy run's fall is carried mostly by the aligner (rows are distributions: L_align ~ 1/N).
    assert result.eval_end["align_raw"] > 0
    assert result.eval_end["ce"] < result.eval_start["ce"]
    counts = result.param_counts
    assert (
        counts["aligner"]
        == AttentionAligner.param_bound(128, 16)
        < 0.1 * sum(counts[k] for k in ("vision", "projector", "llm"))
    )
    assert all(counts[k] > 0 for k in ("vision", "projector", "llm"))
    model = tmp_path / "run" / "model"
    assert (model / "aligner.safetensors").is_file() and (model / "config.json").is_file()
    manifest = read_manifest(open_store(str(tmp_path / "run")), "model")
    assert manifest is not None and manifest.meta["eval_end"] == result.eval_end
    # The committed model loads back as a VideoLLM with the trained weights.
    back = load_videollm("tiny-videollava", path=str(model))
    trained = dict(result.videollm.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in back.model.named_parameters())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {"ce", "align", "loss", "lr"} <= json.loads(lines[0]).keys()


def test_killed_sft_resumes_exactly(priors_dir, tmp_path):
    full = run_sft(_config(tmp_path / "a", priors_dir, steps=6, every=3))
    out = tmp_path / "b"
    run_sft(_config(out, priors_dir, steps=6, every=3))
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # killed after step 3's checkpoint
    resumed = run_sft(_config(out, priors_dir, steps=6, every=3), resume=True)
    assert len(resumed.losses) == 3
    # Same process, same thread count, same shapes, weights and optimizer state restored
    # bit for bit: the resumed steps are the same fp32 computation, so they agree exactly
    # (an elementwise 1e-6 on Adam-updated weights would be both weaker and fragile).
    for a, b in zip(full.losses[3:], resumed.losses, strict=True):
        assert a["loss"] == b["loss"]
    for (n, p), (m, q) in zip(
        full.videollm.model.named_parameters(),
        resumed.videollm.model.named_parameters(),
        strict=True,
    ):
        assert n == m and torch.equal(p, q), n
