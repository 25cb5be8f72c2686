"""`vidalign vda run`: the whole recipe per student family, skipping committed steps, resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load

from vidalign.config import load_config
from vidalign.run import RunDir
from vidalign.store import open_store, read_artifact_file
from vidalign.students import load_student
from vidalign_trainer.vda import VDAConfig, run_vda

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
FAST = ["stage1.train.steps=2", "stage2.train.steps=2", "stage3.train.steps=2",
        "stage1.output.checkpoint_every=1", "stage2.output.checkpoint_every=1",
        "stage3.output.checkpoint_every=1", "data.num_clips=4", "eval.synth_n=2"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["videollava", "qwen2.5-vl", "internvl3", "llava-next-video"])
def test_full_run_per_family(family, tmp_path):
    config = load_config(VDAConfig, ROOT / "configs" / "vda" / f"tiny-{family}.yaml",
                         [f"store={tmp_path / 'run'}", *FAST])
    status = run_vda(config)
    assert status == {"features": "ran", "stage1": "ran", "stage2": "ran", "stage3": "ran",
                      "eval/baseline": "ran", "eval/vda": "ran"}
    store = open_store(config.store)
    # Stage 2 trained the encoder: its weights moved from the student's own.
    trained = load(read_artifact_file(store, "stage2/encoder", "encoder.safetensors"))
    initial = load_student(config.student).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    for variant in ("baseline", "vda"):
        result = json.loads(read_artifact_file(store, f"eval/{variant}", "motionbench.json"))
        assert result["n"] == 2 * 6
    # A second run finds every step committed and does nothing.
    assert set(run_vda(config).values()) == {"done"}


def test_killed_run_resumes_and_skips_finished_steps(tmp_path):
    store = tmp_path / "run"
    cmd = [sys.executable, "-m", "vidalign_cli.main", "vda", "run",
           "--config", str(ROOT / "configs" / "vda" / "ablation-stages12.yaml"),
           "--set", f"store={store}", "--set", "stage2.train.steps=30", "--set", "eval=null",
           *[arg for item in ("stage1.train.steps=2", "stage1.output.checkpoint_every=1",
                              "stage2.output.checkpoint_every=1", "data.num_clips=4")
             for arg in ("--set", item)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    stage2 = RunDir(str(store / "stage2"))
    deadline = time.monotonic() + 240
    try:
        while len(stage2.metrics()) < 2:  # killed inside stage 2
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "features: done" in rerun.stdout and "stage1: done" in rerun.stdout
    assert "stage2: ran" in rerun.stdout
    assert [m["step"] for m in stage2.metrics()] == list(range(1, 31))
    assert '"resumed"' in rerun.stderr


def test_pooling_and_conditioning_reach_the_features_stage1_and_stage2():
    """One ``pooling`` for the features and stage 2 (a mismatch would be refused at stage 2's
    start); ``conditioning`` reaches stage 1's adapter; a section setting its own pooling that
    disagrees is a config error, not silently overridden."""
    from vidalign_trainer.vda import VDAConfig, stage_configs

    configs = stage_configs(VDAConfig(pooling="grid:4", conditioning="spatial"))
    assert configs["features"].pooling == configs["stage2"].pooling == "grid:4"
    assert configs["stage1"].adapter.conditioning == "spatial"
    default = stage_configs(VDAConfig())
    assert default["stage2"].pooling == "frame" and default["stage1"].adapter.conditioning == "frame"
    with pytest.raises(ValueError, match=r"stage2.pooling 'grid:2' differs from pooling 'frame'"):
        VDAConfig(stage2={"pooling": "grid:2"})
