"""Stage 2 on SynthMotion, and its mismatched-clip control: what the teacher is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidalign.config import load_config
from vidalign.data.synth import generate, write_dataset
from vidalign.teacher.client import LocalTeacher
from vidalign_trainer.common import DataConfig, open_dataset
from vidalign_trainer.stage2 import Stage2Config, run_stage2

ROOT = Path(__file__).resolve().parents[2]


class Recording:
    """A teacher that remembers the sample ids and captions of each loss request."""

    def __init__(self, inner: LocalTeacher) -> None:
        self.inner, self.requests = inner, []

    def info(self):
        return self.inner.info()

    def denoising_loss(self, request):
        self.requests.append((list(request.sample_ids), list(request.captions or [])))
        return self.inner.denoising_loss(request)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(generate(6, seed=21, frames=8, size=32), root)
    return root


def _config(adapter: Path, synth_dir: Path, out: Path, mismatch: bool) -> Stage2Config:
    return load_config(Stage2Config, ROOT / "configs" / "stage2-tiny.yaml", [
        f"teacher.adapter={adapter}", f"output.dir={out}", "train.steps=3", "train.batch_size=2",
        "data.kind=synth", f"data.path={synth_dir}", "data.num_clips=0", "data.frames=8",
        f"train.mismatch={str(mismatch).lower()}",
    ])


@pytest.mark.parametrize("mismatch", [False, True], ids=["matched", "mismatched"])
def test_stage2_sends_the_teacher_the_right_clips(adapter_paths, synth_dir, tmp_path, mismatch):
    adapter = adapter_paths["tiny-animatediff"]
    config = _config(adapter, synth_dir, tmp_path / "run", mismatch)
    data = open_dataset(config.data)
    assert len(data) == 6 and data.static_captions[0]
    teacher = Recording(LocalTeacher("tiny-animatediff", adapters=[adapter]))
    losses = run_stage2(config, teacher=teacher)
    assert len(losses) == 3
    assert len(teacher.requests) == 3
    for step, (ids, captions) in enumerate(teacher.requests):
        picks = data.order(step, 2, config.train.seed)
        expected = [(i + 3) % 6 for i in picks] if mismatch else picks
        assert ids == [data.ids[i] for i in expected]
        assert captions == [data.static_captions[i] for i in expected]
    assert (tmp_path / "run" / "encoder" / "MANIFEST.json").is_file()


def test_synth_data_config_needs_a_path():
    with pytest.raises(ValueError, match=r"data\.path"):
        DataConfig(kind="synth")
    with pytest.raises(ValueError, match="expected one of"):
        DataConfig(kind="webvid")
