"""``vidalign plan``: the shipped paper configs load with the real config classes and plan, the
parameter counts are the published models' sizes, and the per-GPU terms follow the formulas
of ``vidalign.plan`` (the activation estimate against measured memory:
tests/e2e/test_memory_plan.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vidalign.config import load_config, resolve_config_class
from vidalign.errors import InvalidInput
from vidalign.plan import GiB, Inputs, detect_job, format_plan, plan
from vidalign_cli.main import PLAN_JOBS

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"

# config file -> (job, ranks, total parameters, trainable parameters)
PAPER_CONFIGS = {
    # SD1.5 UNet 859,520,964 + motion modules 453,209,280 (= diffusers' UNetMotionModel.from_unet2d)
    # + VAE 83,653,863 + CLIP-L text 123,060,480; trainable: W_proj 1024 x 768 + 768 = 787,200 and
    # LoRA r=16 on the 296 to_q/to_k/to_v/to_out.0 of that UNetMotionModel, 8,022,016.
    "stage1-animatediff.yaml": ("stage1", 1, 1_528_253_803, 8_809_216),
    # CLIP ViT-L/14 video tower, 303,179,776; its last layer (12,596,224) and post-norm (2,048)
    # cannot reach F_V (feature layer -2) and are frozen.
    "stage2-video-llava-7b.yaml": ("stage2", 1, 303_179_776, 290_581_504),
    # Video-LLaVA-7B (7,366,279,168) + LoRA r=16 on q/k/v/o of 32 layers: 128 x 16 x 8192.
    "stage3-video-llava-7b.yaml": ("stage3", 1, 7_366_279_168 + 16_777_216, 16_777_216),
    # Qwen2.5-VL-7B (8,292,166,656) + the aligner over 8 x 8 x 8 cells at width 64.
    "sft-qwen2.5-vl-7b.yaml": ("sft", 8, 8_292_166_656 + 70_272, 8_292_166_656 + 70_272),
    # CogVideoX1.5-5B transformer 5,570,676,352 + T5-XXL encoder 4,762,310,656 + VAE 215,583,907.
    "priors-cogvideox1.5-5b.yaml": ("priors", 1, 10_548_570_915, 0),
}


def load(name: str, *sets: str):
    job = PAPER_CONFIGS[name][0]
    return load_config(resolve_config_class(PLAN_JOBS[job]), PAPER / name, list(sets))


def test_every_paper_config_is_shipped_and_tested():
    assert {p.name for p in PAPER.glob("*.yaml")} == set(PAPER_CONFIGS)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_load_with_the_real_classes_and_plan(name):
    job, ranks, total, trainable = PAPER_CONFIGS[name]
    assert detect_job(yaml.safe_load((PAPER / name).read_text())) == job
    result = plan(job, load(name), ranks=ranks)
    assert (result.params_total, result.params_trainable) == (total, trainable)
    assert result.total == sum(value for _, value in result.rows()[:-1])
    assert result.activations > 0 and result.weights > 0
    assert result.total < 80 * GiB, format_plan(result)  # each fits one 80 GB GPU
    text = format_plan(result)
    for row in ("weights", "gradients", "optimizer state", "activations (estimate)", "total"):
        assert row in text


def test_the_tiny_configs_jobs_are_told_from_their_keys():
    for job in ("stage1", "stage2", "stage3", "sft", "features"):
        data = yaml.safe_load((ROOT / "configs" / f"{job}-tiny.yaml").read_text())
        assert detect_job(data) == job
    with pytest.raises(InvalidInput, match="--job"):
        detect_job({"nothing": 1})


def _zero(config, stage: int, bucket: int = 1000, persist: int = 0):
    return dataclasses.replace(config, deepspeed=SimpleNamespace(
        enabled=True, zero_stage=stage, reduce_bucket_size=bucket,
        param_persistence_threshold=persist))


def test_weights_gradients_and_optimizer_follow_precision_zero_and_ranks():
    # stage 2: 303.2 M parameters, 290.6 M of them trainable (float32 master weights)
    config = load("stage2-video-llava-7b.yaml", "train.batch_size=8")
    total, p_t = 303_179_776, 290_581_504
    frozen = total - p_t

    plain = plan("stage2", config, ranks=1)
    assert plain.weights == 4 * total  # stage 2 loads the encoder in float32
    assert (plain.gradients, plain.optimizer, plain.buffers) == (4 * p_t, 8 * p_t, 0)
    ddp = plan("stage2", config, ranks=8)
    assert ddp.buffers == 4 * p_t  # DDP's flat gradient buckets
    assert ddp.activations < plain.activations  # one clip per rank instead of eight

    ranks = 8
    for stage in (1, 2, 3):
        zero = plan("stage2", _zero(config, stage), ranks=ranks)
        wrapped = 2 * (p_t + frozen)  # DeepSpeed bf16 casts the wrapped module
        assert zero.weights == (wrapped // ranks if stage == 3 else wrapped)
        assert zero.gradients == 4 * p_t // (ranks if stage >= 2 else 1)
        assert zero.optimizer == 12 * p_t // ranks  # moments + float32 master copy
        assert zero.buffers >= 1000 * 2  # the reduce bucket in bf16 (+ ZeRO-3's gathered layer)
        assert zero.zero_stage == stage
    # ZeRO-3 keeps parameters under param_persistence_threshold elements whole on every rank
    whole = plan("stage2", _zero(config, 3, persist=100_000), ranks=ranks)
    assert 2 * total // ranks < whole.weights < 2 * total // ranks + 2 * 1_000_000
    fp32 = plan("stage2", _zero(load("stage2-video-llava-7b.yaml", "train.precision=fp32",
                                     "train.batch_size=8"), 2), ranks=ranks)
    assert fp32.weights == 4 * total and fp32.optimizer == 8 * p_t // ranks


def test_half_precision_and_checkpointing_shrink_activations():
    fp32 = plan("stage3", load("stage3-video-llava-7b.yaml", "train.precision=fp32"))
    bf16 = plan("stage3", load("stage3-video-llava-7b.yaml"))
    assert bf16.weights < fp32.weights * 0.51 and bf16.activations < fp32.activations * 0.6
    assert "gradient_checkpointing" in {f.name for f in dataclasses.fields(load(
        "stage3-video-llava-7b.yaml").train)}
    ckpt = plan("stage3", load("stage3-video-llava-7b.yaml", "train.gradient_checkpointing=true"))
    assert ckpt.activations < bf16.activations / 4
    longer = plan("stage3", load("stage3-video-llava-7b.yaml"), inputs=Inputs(text_tokens=512))
    assert longer.activations > bf16.activations


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(InvalidInput, match="must divide by --ranks"):
        plan("sft", load("sft-qwen2.5-vl-7b.yaml"), ranks=3)


def vidalign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidalign_cli.main", *args],
                          capture_output=True, text=True, timeout=300)


def test_the_command_prints_the_plan():
    sft = str(PAPER / "sft-qwen2.5-vl-7b.yaml")
    proc = vidalign("plan", "--config", sft, "--ranks", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sft: qwen2.5-vl-7b")
    assert "8 rank(s), bf16, DeepSpeed ZeRO-2" in proc.stdout
    assert "parameters: 8.29 B total, 8.29 B trainable" in proc.stdout
    total = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["total"]]
    assert len(total) == 1 and float(total[0][1]) > 0, proc.stdout
    bad = vidalign("plan", "--config", sft, "--ranks", "3", "--job", "sft",
                   "--set", "train.precision=fp32")
    assert bad.returncode == 2 and "must divide by --ranks" in bad.stderr


def test_a_local_teacher_is_in_the_stage2_process():
    config = load_config(resolve_config_class(PLAN_JOBS["stage2"]),
                         ROOT / "configs" / "stage2-tiny.yaml")
    local = plan("stage2", config)
    remote = plan("stage2", dataclasses.replace(
        config, teacher=dataclasses.replace(config.teacher, address="127.0.0.1:50051")))
    assert "tiny-animatediff in this process" in local.what
    assert local.params_trainable == remote.params_trainable
    assert local.params_total > remote.params_total and local.total > remote.total
    assert local.weights > remote.weights and local.activations > remote.activations
