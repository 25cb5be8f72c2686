"""bf16 / fp16 on CPU: two-step runs of every stage, DeepSpeed's bf16 section, and the remote
loss and gradient of a half-precision teacher against float32.

fp32 keeps the exactness tests (tests/integration/test_remote_gradient.py: the remote
gradient equals in-process autograd); here the comparisons are bounds on the half types'
rounding, derived below and measured on the tiny presets.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from vidalign.config import load_config
from vidalign.data.toy import moving_squares
from vidalign.precision import precision_dtype
from vidalign.students import load_student
from vidalign.teacher.client import LocalTeacher, RemoteDenoisingLoss
from vidalign.vda import Adapter, load_teacher
from vidalign.vda.adapter import file_digest
from vidalign.video import sample_frames
from vidalign_trainer.features import FeaturesConfig, extract_features
from vidalign_trainer.sft import SFTConfig, run_sft
from vidalign_trainer.stage1 import Stage1Config, run_stage1
from vidalign_trainer.stage2 import Stage2Config, run_stage2
from vidalign_trainer.stage3 import Stage3Config, run_stage3

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Bounds of a half-precision teacher against float32, on the same request. Inputs of every
# matmul and convolution are rounded to the half type (unit roundoff u = 2^-9 for bf16,
# 2^-12 for fp16) while products accumulate in float32.
# - The loss is a mean of ~10^4 squared errors, so independent roundings average out: a
#   bound of 2u_bf16 = 3.9e-3 relative (two roundings' worth, the worst case for one
#   element) covers both types; measured: 3.3e-4 (bf16), 5.0e-5 (fp16).
# - dL/dF_V goes back through every layer, where per-layer relative errors of ~u add up
#   over the UNet's ~20 matmul layers and the W_proj/attention path: 20 u_bf16 = 4%.
#   Bound: 5% relative (Frobenius), cosine >= 0.998; measured: 1.1% / 0.99981 (bf16),
#   1.3% / 0.99988 (fp16). A wrong gradient (wrong sign, a missing term, another sample's)
#   has cosine far below 0.99.
LOSS_REL = 2 * 2.0**-8
GRAD_REL = 0.05
GRAD_COS = 0.998


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_remote_loss_and_gradient_of_a_half_teacher_are_within_the_bound_of_fp32(precision, tmp_path):
    clips = moving_squares(4, frames=12, size=32, seed=5)
    video = torch.stack([torch.from_numpy(c.video) for c in clips])
    encoder = load_student("tiny-videollava")
    reference = load_teacher("tiny-animatediff")
    adapter = Adapter.create(d_v=encoder.d_v, cond_dim=reference.cond_dim,
                             teacher_family=reference.family, seed=1)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    pixels = sample_frames(video, reference.frames, reference.resolution)
    features = encoder(encoder.preprocess(video)).detach()

    def remote(dtype: str):
        teacher = LocalTeacher("tiny-animatediff", device="cpu", dtype=precision_dtype(dtype),
                               adapters=[str(path)])
        criterion = RemoteDenoisingLoss(teacher, adapter_id=file_digest(path), num_draws=2,
                                        timestep_range=(0, 1000))
        f = features.clone().requires_grad_(True)
        loss = criterion(f, pixels=pixels, captions=[c.static_caption for c in clips],
                         sample_ids=[c.clip_id for c in clips], seed=3)
        loss.sum().backward()
        return loss.detach(), f.grad

    loss32, grad32 = remote("fp32")
    loss, grad = remote(precision)
    assert ((loss - loss32).abs() / loss32.abs()).max() <= LOSS_REL
    assert ((grad.float() - grad32).norm() / grad32.norm()) <= GRAD_REL
    cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(1), grad32.flatten(1), dim=1)
    assert cosine.min() >= GRAD_COS


# Two steps of each stage in bf16: finite losses, and the first step's loss (same weights,
# same batch) within 1% of the float32 run's. The student's forward is a few layers deep with
# float32 accumulation; measured differences are 2e-5 to 4e-4 relative. 1% is 2.5 u_bf16
# per layer over the deepest path, and a wrong cast (e.g. weights left in bf16 for AdamW, or
# a loss computed on bf16 logits without float32 reduction) still passes it, which is why
# the master-weight test below checks the dtypes directly.
FIRST_STEP_REL = 0.01


def _first_losses(run, precision: str) -> list[float]:
    losses = run(precision)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    return losses


@pytest.mark.slow
def test_two_step_bf16_runs_of_every_stage(tmp_path, adapter_paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["data.num_clips=4"]
    features = tmp_path / "features"
    extract_features(load_config(FeaturesConfig, CONFIGS / "features-tiny.yaml",
                                 [*data, f"output.dir={features}"]))

    def stage1(precision):
        config = load_config(Stage1Config, CONFIGS / "stage1-tiny.yaml", [
            *data, f"features={features}", f"output.dir={tmp_path / ('s1' + precision)}",
            "train.steps=2", "eval.num_clips=0", f"train.precision={precision}"])
        return run_stage1(config).losses

    def stage2(precision):
        config = load_config(Stage2Config, CONFIGS / "stage2-tiny.yaml", [
            *data, f"teacher.adapter={adapter_paths['tiny-animatediff']}",
            f"output.dir={tmp_path / ('s2' + precision)}", "train.steps=2",
            f"train.precision={precision}"])
        return run_stage2(config)

    def stage3(precision):
        config = load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml", [
            *data, "encoder=", f"output.dir={tmp_path / ('s3' + precision)}", "train.steps=2",
            f"train.precision={precision}"])
        return run_stage3(config).losses

    def sft(precision):
        config = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [
            f"output.dir={tmp_path / ('sft' + precision)}", "train.steps=2",
            f"train.precision={precision}"])
        return [r["loss"] for r in run_sft(config).losses]

    for name, run in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3), ("sft", sft)):
        half = _first_losses(run, "bf16")
        full = _first_losses(run, "fp32")
        assert abs(half[0] - full[0]) <= FIRST_STEP_REL * abs(full[0]), (name, half, full)


def test_half_runs_keep_float32_master_weights_and_half_frozen_ones():
    from vidalign_trainer.stage3 import apply_lora, load_student_for_stage3

    config = load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml",
                         ["encoder=", "train.precision=bf16"])
    llm = load_student_for_stage3(config)
    apply_lora(llm, config.lora, seed=0)
    from vidalign.precision import keep_trainable_fp32

    keep_trainable_fp32(llm.model)
    dtypes = {p.dtype for p in llm.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in llm.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}


@pytest.mark.slow
def test_deepspeed_bf16_section_trains_sft_with_fp32_master_weights():
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [
            f"output.dir={tmp}/z", "train.steps=2", "train.precision=bf16", "deepspeed.enabled=true"])
        losses = [r["loss"] for r in run_sft(config).losses]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_precision_names_agree_between_trainer_and_teacher():
    from vidalign.errors import InvalidInput

    assert precision_dtype("bf16") == precision_dtype("bfloat16") == torch.bfloat16
    assert precision_dtype("fp16") == precision_dtype("float16") == torch.float16
    with pytest.raises(InvalidInput, match="fp32, bf16, fp16"):
        precision_dtype("int8")
    with pytest.raises(ValueError, match=r"train\.precision"):
        load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml", ["train.precision=fp8"])


@pytest.mark.slow
def test_gradient_checkpointing_changes_memory_not_numbers(tmp_path, adapter_paths):
    """Recomputed activations are the same float32 operations on the same inputs: every
    step's loss and grad norm equal the run without checkpointing, exactly."""
    def run(job, flag):
        out = tmp_path / f"{job}-{flag}"
        if job == "stage3":
            config = load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml", [
                "data.num_clips=4", "encoder=", f"output.dir={out}", "train.steps=2",
                f"train.gradient_checkpointing={flag}"])
            run_stage3(config)
        elif job == "stage2":
            config = load_config(Stage2Config, CONFIGS / "stage2-tiny.yaml", [
                "data.num_clips=4", f"teacher.adapter={adapter_paths['tiny-animatediff']}",
                f"output.dir={out}", "train.steps=2", f"train.gradient_checkpointing={flag}"])
            run_stage2(config)
        else:
            config = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [
                f"output.dir={out}", "train.steps=2", f"train.gradient_checkpointing={flag}"])
            run_sft(config)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        import json

        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]

    for job in ("stage2", "stage3", "sft"):
        assert run(job, "true") == run(job, "false"), job


def test_fp16_scales_the_loss_and_resumes_with_the_scale(tmp_path):
    """fp16 without DeepSpeed: a GradScaler scales the loss, its state is checkpointed, and a
    run resumed from step 1 repeats the uninterrupted run's losses exactly (same fp16 ops)."""
    def config(out, steps):
        return load_config(Stage3Config, CONFIGS / "stage3-tiny.yaml", [
            "data.num_clips=4", "encoder=", f"output.dir={out}", f"train.steps={steps}",
            "train.precision=fp16", "output.checkpoint_every=1"])

    whole = run_stage3(config(tmp_path / "whole", 3)).losses
    run_stage3(config(tmp_path / "cut", 1))
    rest = run_stage3(config(tmp_path / "cut", 3), resume=True).losses
    assert rest == whole[1:]
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000003" / "scaler.pt", weights_only=False)
    assert state["scale"] > 1  # the loss was scaled (GradScaler starts at 2^16)


@pytest.mark.slow
def test_deepspeed_fp16_sft_keeps_l_align_finite(tmp_path):
    """fp16 flushes the aligner's eps (1e-8) to 0; its log-space residual stays float32."""
    config = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [
        f"output.dir={tmp_path / 'z'}", "train.steps=2", "train.precision=fp16", "deepspeed.enabled=true"])
    losses = run_sft(config).losses
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["align"]) for r in losses)
