"""VDA stage 2 end to end: trains the encoder only, checkpoints, resumes exactly, CLI works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidalign.config import load_config
from vidalign.students import load_student
from vidalign_trainer.stage2 import Stage2Config, run_stage2

from ..conftest import STUDENT

ROOT = Path(__file__).resolve().parents[2]


def config(adapter: Path, out: Path, steps: int, address: str = "local") -> Stage2Config:
    return load_config(
        Stage2Config,
        ROOT / "configs" / "stage2-tiny.yaml",
        [
            f"teacher.address={address}",
            f"teacher.adapter={adapter}",
            f"output.dir={out}",
            f"train.steps={steps}",
            "train.lr=1e-3",
            "output.checkpoint_every=2",
            "data.num_clips=6",
        ],
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stage2_trains_the_encoder_and_resumes_exactly(adapter_paths, tmp_path):
    adapter = adapter_paths["tiny-animatediff"]
    full = tmp_path / "full"
    losses = run_stage2(config(adapter, full, 4))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert [m["step"] for m in metrics(full)] == [1, 2, 3, 4]
    steps = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]

    # Only the encoder is trained, and it did move.
    initial = load_student(STUDENT).state_dict()
    final = torch.load(full / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=False)
    assert final["state"], "the optimizer never stepped"
    from safetensors.torch import load_file

    trained = load_file(full / "checkpoints" / "step-00000004" / "encoder.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    # Stop after step 2, resume to step 4: the same losses and the same weights.
    part = tmp_path / "part"
    first = run_stage2(config(adapter, part, 2))
    second = run_stage2(config(adapter, part, 4), resume=True)
    assert first + second == losses
    resumed = load_file(part / "checkpoints" / "step-00000004" / "encoder.safetensors")
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


def test_cli_trains_against_the_grpc_teacher(teacher_servers, adapter_paths, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "vidalign_cli.main", "train", "stage2",
        "--config", str(ROOT / "configs" / "stage2-tiny.yaml"),
        "--set", f"teacher.address={teacher_servers['tiny-animatediff']}",
        "--set", f"teacher.adapter={adapter_paths['tiny-animatediff']}",
        "--set", f"output.dir={out}", "--set", "train.steps=3", "--set", "data.num_clips=4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    # One structured JSON log line per step.
    steps = [json.loads(line) for line in proc.stderr.splitlines() if '"stage2_step"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3] and all("loss" in s for s in steps)


def test_cli_reports_config_and_teacher_errors(adapter_paths, tmp_path):
    base = [sys.executable, "-m", "vidalign_cli.main", "train", "stage2",
            "--config", str(ROOT / "configs" / "stage2-tiny.yaml")]
    bad_key = subprocess.run([*base, "--set", "train.stepz=3"], capture_output=True, text=True, timeout=120)
    assert bad_key.returncode == 2 and "unknown config key(s) train.stepz" in bad_key.stderr
    dead = subprocess.run(
        [*base, "--set", "teacher.address=127.0.0.1:1", "--set", "teacher.timeout_s=2", "--set", "teacher.wait_s=1",
         "--set", f"teacher.adapter={adapter_paths['tiny-animatediff']}",
         "--set", f"output.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert dead.returncode == 2, dead.stderr[-2000:]
    assert "127.0.0.1:1" in dead.stderr and "UNAVAILABLE" in dead.stderr


def test_frames_for_the_diffusion_model_are_a_switch(adapter_paths, tmp_path):
    from vidalign.teacher.client import LocalTeacher

    frames: list[int] = []

    class Recording(LocalTeacher):
        def denoising_loss(self, request):
            frames.append(request.pixels.shape[1])
            return super().denoising_loss(request)

    adapter = adapter_paths["tiny-animatediff"]
    teacher = Recording("tiny-animatediff", adapters=[adapter])
    cfg = config(adapter, tmp_path / "frames", 1)
    cfg.teacher.frames = 5
    run_stage2(cfg, teacher=teacher)
    assert frames == [5]
    cfg = config(adapter, tmp_path / "default", 1)
    run_stage2(cfg, teacher=teacher)
    assert frames == [5, teacher.info().frames]


def test_grid_features_train_through_a_spatial_adapter_and_other_pooling_is_refused(tmp_path):
    """F_V pooled to 2 x 2 per frame (pooling grid:2) through a "spatial" adapter fitted to 4
    tokens per frame: stage 2 runs; F_V pooled per frame is refused before the first step."""
    from vidalign.errors import InvalidInput
    from vidalign.teacher.client import LocalTeacher
    from vidalign.vda import Adapter, load_teacher

    teacher = load_teacher("tiny-animatediff")
    adapter = Adapter.create(d_v=load_student(STUDENT).d_v, cond_dim=teacher.cond_dim,
                             teacher_family=teacher.family, teacher=teacher, conditioning="spatial",
                             frame_tokens=4)
    with torch.no_grad():  # a fitted W_proj: a fresh one is zero and passes no gradient
        adapter.proj.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "spatial.safetensors"
    adapter.save(path)
    local = LocalTeacher("tiny-animatediff", adapters=[path])
    cfg = config(path, tmp_path / "grid", 2)
    cfg.pooling = "grid:2"
    losses = run_stage2(cfg, teacher=local)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    cfg = config(path, tmp_path / "frame", 1)
    with pytest.raises(InvalidInput, match=r"pooling: 'frame' gives 1 F_V tokens per frame, but the "
                                           r"adapter .* was fitted to 4"):
        run_stage2(cfg, teacher=local)
