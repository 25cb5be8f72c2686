"""`scripts/demo_assets.py --work DIR`: a build killed mid-phase and run again resumes from its
newest checkpoint and writes exactly the model an uninterrupted build writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--only", "cogvideox", "--checkpoint-every", "5", "--size", "clips=16",
        "--size", "cogvideox_steps=40", "--size", "teacher_batch=2"]


def build(out: Path, work: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo_assets.py"), "--out", str(out),
         "--work", str(work), *ARGS],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def model_files(out: Path) -> dict[str, str]:
    files = json.loads((out / "MANIFEST.json").read_text())["files"]
    return {k: v for k, v in files.items() if k.startswith("cogvideox/")}


@pytest.mark.slow
def test_a_killed_asset_build_resumes_to_the_same_model(tmp_path):
    finish(build(tmp_path / "whole", tmp_path / "whole-work"))

    proc = build(tmp_path / "resumed", tmp_path / "work")
    checkpoints = tmp_path / "work" / "cogvideox" / "checkpoints"
    deadline = time.monotonic() + 900
    while not any(checkpoints.glob("step-*/MANIFEST.json")):  # a committed checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(p.name for p in checkpoints.glob("step-*"))
    assert killed_at and killed_at[-1] != "step-00000040", killed_at  # killed mid-phase
    assert not (tmp_path / "resumed" / "cogvideox").exists()  # nothing half-written shipped

    finish(build(tmp_path / "resumed", tmp_path / "work"))
    whole, resumed = model_files(tmp_path / "whole"), model_files(tmp_path / "resumed")
    assert whole and resumed == whole  # bit-identical weights and configs
    summary = json.loads((tmp_path / "resumed" / "MANIFEST.json").read_text())["summary"]
    expected = json.loads((tmp_path / "whole" / "MANIFEST.json").read_text())["summary"]
    # The losses of all 40 steps, read back from the phase's log across the two processes.
    for key in ("loss_first_50", "loss_last_50"):
        assert summary["cogvideox"][key] == expected["cogvideox"][key], key


def test_a_bad_size_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo_assets.py"), "--out", str(tmp_path),
         "--size", "cogvideox_steps=many"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--size 'cogvideox_steps=many': 'many' is not a int" in proc.stderr
