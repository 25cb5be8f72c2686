"""MotionEnhancer end to end on SynthMotion: data synth -> priors extract -> SFT that aligns."""

from __future__ import annotations

from vidalign.config import load_config
from vidalign.data.synth import generate, write_dataset
from vidalign_teacher.priors import ExtractConfig, extract_dataset_priors
from vidalign_trainer.sft import SFTConfig, run_sft


def test_synth_priors_sft(tmp_path):
    data = tmp_path / "synth"
    write_dataset(generate(2, seed=3, frames=16, size=64), data)
    priors = extract_dataset_priors(ExtractConfig(data=str(data), out=str(tmp_path / "priors"),
                                                  device="cpu", steps=1))
    config = load_config(SFTConfig, None, [
        "data.kind=synth", f"data.path={data}", "data.num_clips=2", "data.frames=8", "data.size=32",
        "data.tasks=[caption, qa]", f"priors={priors}", "train.steps=3", "train.batch_size=2",
        f"output.dir={tmp_path / 'sft'}", "output.checkpoint_every=3",
    ])
    result = run_sft(config)
    assert len(result.losses) == 3
    # Caption examples carry a prior (aligned); QA examples train on cross-entropy only.
    assert result.eval_start["align"] > 0
    assert all(step["ce"] > 0 for step in result.losses)
