"""Real encoded videos through every stage: prepare -> shard -> features -> stage 1 -> stage 2
(gRPC teacher) -> stage 3 -> eval, and shard -> priors extract -> SFT, with broken files among
them; and stage 2 killed mid-epoch with decoding workers, resumed exactly.

The set (tests/support/videos.py) holds h264, vp9 and mpeg4 clips of several sizes, frame rates
and lengths, plus truncated, zero-byte, damaged-payload and too-short files. Every run must list
exactly the broken files in its ``skipped.jsonl``, each with its reason, and train on the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vidalign.config import load_config
from vidalign.data.benchmarks import load_benchmark
from vidalign.store import open_store, read_artifact_file
from vidalign_trainer.features import FeaturesConfig, extract_features, load_features
from vidalign_trainer.sft import SFTConfig, run_sft
from vidalign_trainer.stage1 import Stage1Config, run_stage1
from vidalign_trainer.stage2 import Stage2Config, run_stage2
from vidalign_trainer.stage3 import Stage3Config, run_stage3

from ..support.teacher_process import Stage2Process, TeacherProcess
from ..support.videos import make_video_set

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def vidalign(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "vidalign_cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def skipped(run_dir: Path) -> dict[str, str]:
    """clip id -> reason, over every rank's skipped file of a run."""
    out = {}
    for path in sorted(run_dir.glob("skipped*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            assert entry["file"] and entry["line"] and entry["reason"], entry
            out[entry["id"]] = entry["reason"]
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_video_set(tmp_path_factory.mktemp("real-videos"))


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory):
    """`data prepare` on the OpenVid CSV (every clip), then `data shard` of the subset."""
    root = tmp_path_factory.mktemp("data")
    n = len(videos.files)
    vidalign("data", "prepare", "--csv", str(videos.openvid_csv), "--video-dir", str(videos.video_dir),
             "--n", str(n), "--out", str(root / "openvid"))
    out = json.loads(vidalign("data", "shard", "--source", f"records:{root / 'openvid' / 'subset'}",
                              "--out", str(root / "shards"), "--clips-per-shard", "4"))
    assert out["clips"] == n and out["files"] == -(-n // 4)
    return root / "shards"


def data_section(path: Path, **extra) -> dict:
    # One clip in two of this set is broken on purpose: the fraction must let the runs go on.
    return {"kind": "shards", "path": str(path), "num_clips": 0, "frames": 8, "size": 32,
            "workers": 2, "max_skip_fraction": 0.9, **extra}


def epoch_steps(videos, batch_size: int) -> int:
    """Steps that read every clip at least once (one epoch), so every broken file is met."""
    return -(-len(videos.files) // batch_size)


@pytest.mark.slow
def test_vda_recipe_on_real_videos(videos, shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = {f.name for f in videos.broken}
    valid = {f.name for f in videos.valid}

    features = tmp_path / "features"
    extract_features(load_config(FeaturesConfig, CONFIGS / "features-tiny.yaml", [
        f"output.dir={features}", f"data={json.dumps(data_section(shards))}",
    ]))
    assert set(load_features(str(features)).ids()) == valid
    assert set(skipped(features)) == broken

    stage1 = tmp_path / "stage1"
    run_stage1(load_config(Stage1Config, CONFIGS / "stage1-tiny.yaml", [
        f"features={features}", f"output.dir={stage1}", f"data={json.dumps(data_section(shards))}",
        "train.steps=2", "eval.num_clips=2",
    ]))
    reasons = skipped(stage1)
    assert set(reasons) == broken and all("no F_V" in r for r in reasons.values())

    adapter = stage1 / "adapter" / "adapter.safetensors"
    teacher = TeacherProcess(tmp_path, adapter).wait_serving()
    stage2 = tmp_path / "stage2"
    try:
        losses = run_stage2(load_config(Stage2Config, CONFIGS / "stage2-tiny.yaml", [
            f"teacher.address={teacher.address}", f"teacher.adapter={adapter}",
            f"output.dir={stage2}", f"data={json.dumps(data_section(shards))}",
            f"train.steps={epoch_steps(videos, 2)}",
        ]))
    finally:
        teacher.kill()
    assert len(losses) == epoch_steps(videos, 2) and all(loss > 0 for loss in losses)
    assert set(skipped(stage2)) == broken

    stage3 = tmp_path / "stage3"
    run_stage3(load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml", [
        f"encoder={stage2 / 'encoder'}", f"output.dir={stage3}",
        f"data={json.dumps({**data_section(shards), 'tasks': ['caption']})}",
        f"train.steps={epoch_steps(videos, 2)}",
    ]))
    assert set(skipped(stage3)) == broken

    evaluated = tmp_path / "eval"
    result = json.loads(vidalign(
        "eval", "--bench", "motionbench", "--data", str(videos.motionbench_meta), "--student",
        "tiny-videollava", "--encoder", str(stage2 / "encoder"), "--lora", str(stage3 / "lora"),
        "--frames", "8", "--max-new-tokens", "2", "--out", str(evaluated),
    ).splitlines()[-1])
    # The 3-frame clip is readable (evaluation repeats frames); the others cannot be decoded.
    unreadable = {f.name for f in videos.broken if f.broken != "short"}
    questions = [json.loads(line) for line in (evaluated / "motionbench.skipped.jsonl").read_text().splitlines()]
    assert {Path(q["file"]).name for q in questions} == unreadable
    asked = load_benchmark("motionbench", videos.motionbench_meta).items
    assert {q["uid"] for q in questions} == {i.uid for i in asked if i.video_path.name in unreadable}
    assert result["unreadable_videos"] == len(questions) and result["n"] == len(asked)
    assert all(q["reason"] and not q["reason"].startswith("'") for q in questions)


@pytest.mark.slow
def test_motionenhancer_recipe_on_real_videos(videos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = {f.path.stem for f in videos.broken}  # QA sets name clips by their file's stem
    motion = tmp_path / "motion-shards"
    vidalign("data", "shard", "--source", f"motionbench:{videos.motionbench_meta}",
             "--source", f"motionvid:{videos.motionvid_json}", "--out", str(motion))
    priors = tmp_path / "priors"
    vidalign("priors", "extract", "--bench", "shards", "--data", str(motion), "--out", str(priors),
             "--teacher-model", "tiny-cogvideox", "--device", "cpu", "--steps", "1",
             "--max-skip-fraction", "0.9", timeout=600)
    assert set(skipped(priors)) == broken
    index = json.loads(read_artifact_file(open_store(str(priors)), "index", "index.json"))
    assert {c["id"] for c in index["clips"]} == {f.path.stem for f in videos.valid}

    sft = tmp_path / "sft"
    result = run_sft(load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [
        f"priors={priors}", f"output.dir={sft}",
        f"data={json.dumps({**data_section(motion), 'tasks': ['qa']})}",
        "train.steps=4", "train.eval_examples=4",
    ]))
    assert len(result.losses) == 4
    assert set(skipped(sft)) <= broken and skipped(sft)


@pytest.mark.slow
def test_stage2_killed_mid_epoch_with_two_workers_resumes_exactly(videos, shards, tmp_path, adapter_paths):
    adapter = adapter_paths["tiny-animatediff"]
    steps = epoch_steps(videos, 2) + 2  # into the second epoch
    sets = [f"data={json.dumps(data_section(shards))}", "output.checkpoint_every=1"]
    whole = Stage2Process(tmp_path / "whole", "local", adapter, steps, *sets)
    assert whole.finish() == 0, whole.log_text()[-3000:]

    killed = Stage2Process(tmp_path / "killed", "local", adapter, steps, *sets)
    killed.wait_steps(3)
    killed.kill()
    assert killed.steps_done() < steps
    resumed = Stage2Process(tmp_path / "killed", "local", adapter, steps, *sets, resume=True)
    assert resumed.finish() == 0, resumed.log_text()[-3000:]
    assert resumed.losses() == whole.losses()
    assert set(skipped(tmp_path / "killed")) == {f.name for f in videos.broken}
