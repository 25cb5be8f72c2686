"""A stage-2 process killed mid-run (SIGKILL, no clean exit) and resumed from the
store gives the same per-step losses and final encoder weights as an
uninterrupted run — on both store backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load

from vidalign.run import RunDir
from vidalign.store import open_store, read_artifact_file
from vidalign_trainer.stage2 import run_stage2

from .test_stage2 import ROOT, config

STEPS = 8


def overrides(adapter, out):
    return [
        f"teacher.adapter={adapter}", f"output.dir={out}", f"train.steps={STEPS}",
        "train.lr=1e-3", "output.checkpoint_every=2", "data.num_clips=6",
    ]


def test_killed_run_resumes_exactly(store_uri, adapter_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    adapter = adapter_paths["tiny-animatediff"]
    full_uri, killed_uri = f"{store_uri}/full", f"{store_uri}/killed"
    run_stage2(config(adapter, full_uri, STEPS))
    expected = [m["loss"] for m in RunDir(full_uri).metrics()]
    assert len(expected) == STEPS

    cmd = [sys.executable, "-m", "vidalign_cli.main", "train", "stage2",
           "--config", str(ROOT / "configs" / "stage2-tiny.yaml")]
    for item in overrides(adapter, killed_uri):
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_run = RunDir(killed_uri)
    deadline = time.monotonic() + 240
    try:
        while len(killed_run.metrics()) < 3:  # past the step-2 checkpoint, before the end
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "stage 2 made no progress"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = len(killed_run.metrics())
    assert 3 <= done_before_kill < STEPS

    resumed = run_stage2(config(adapter, killed_uri, STEPS), resume=True)
    history = [m["loss"] for m in RunDir(killed_uri).metrics()]
    assert history == expected  # the same loss at every step, no step twice
    assert [round(x, 6) for x in resumed] == expected[STEPS - len(resumed):] and len(resumed) < STEPS

    def encoder(uri):
        return load(read_artifact_file(open_store(uri), "encoder", "encoder.safetensors"))

    a, b = encoder(full_uri), encoder(killed_uri)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
