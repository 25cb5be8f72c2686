"""VDA stage 3 end to end: LoRA on the LLM only, the stage-2 encoder in place, the
adapter in peft's format, and a SIGKILLed run that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidalign.config import load_config
from vidalign.run import RunDir
from vidalign.store import commit_artifact, open_store
from vidalign.students import load_student
from vidalign_trainer.common import Instructions
from vidalign_trainer.stage3 import Stage3Config, load_student_for_stage3, run_stage3

from ..support.numerics import TINY_VLM_TERMS, assert_fp32_close

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "stage3-tiny.yaml"


def overrides(encoder: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"encoder={encoder}",
        f"output.dir={out}",
        f"train.steps={steps}",
        "train.lr=1e-2",
        "output.checkpoint_every=2",
        "data.num_clips=4",
        *extra,
    ]


def config(encoder: str, out: Path, steps: int, *extra: str) -> Stage3Config:
    return load_config(Stage3Config, CONFIG, overrides(encoder, out, steps, *extra))


@pytest.fixture(scope="module")
def stage2_encoder(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A stage-2 encoder artifact (the tiny tower, perturbed) committed to a store."""
    root = tmp_path_factory.mktemp("stage2")
    state = load_student("tiny-videollava").state_dict()
    g = torch.Generator().manual_seed(5)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, root / "encoder.safetensors")
    commit_artifact(
        open_store(str(root / "out")),
        "encoder",
        {"encoder.safetensors": root / "encoder.safetensors"},
        producer="test",
    )
    return str(root / "out" / "encoder"), state


def full_set_loss(llm, cfg: Stage3Config) -> float:
    data = Instructions(cfg.data)
    with torch.no_grad():
        losses = [llm.loss(b.video, b.prompts, b.targets).item() for b in data.batches(4)]
    return sum(losses) / len(losses)


def test_stage3_trains_only_lora_and_the_adapter_loads_in_peft(stage2_encoder, tmp_path):
    from peft import PeftModel

    encoder_uri, encoder_weights = stage2_encoder
    out = tmp_path / "run"
    cfg = config(encoder_uri, out, 24, "output.checkpoint_every=8")
    base = load_student_for_stage3(cfg)
    loss_before = full_set_loss(base, cfg)

    result = run_stage3(cfg)
    llm = result.videollm
    assert len(result.losses) == 24
    assert [m["step"] for m in RunDir(str(out)).metrics()] == list(range(1, 25))

    # The stage-2 encoder is the model's tower.
    for k, v in llm.encoder.state_dict().items():
        assert torch.equal(v, encoder_weights[k]), k

    # Only LoRA moved: every base parameter is bit-identical, every LoRA B left zero.
    base_params = dict(base.model.named_parameters())
    lora_b = 0
    for name, param in llm.model.named_parameters():
        if "lora_" in name:
            assert ".language_model." in name and name.split(".")[-4] in {
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
            }
            lora_b += "lora_B" in name and bool(param.abs().sum() > 0)
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param, base_params.pop(plain)), plain
    assert not base_params, sorted(base_params)[:5]
    assert lora_b == 2 * 4  # 2 layers x q/k/v/o

    # The loss fell on the fixed training set.
    loss_after = full_set_loss(llm, cfg)
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)

    # The committed adapter is peft's own format and reproduces the trained logits.
    adapter = out / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    data = next(Instructions(cfg.data).batches(3))
    expected = llm.logits(data.video, data.prompts, data.targets)
    with torch.no_grad():
        untrained = base.logits(data.video, data.prompts, data.targets)
        base.model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
        loaded = base.logits(data.video, data.prompts, data.targets)
    # peft's loaded LoRA against the trained one: the same weights, possibly other kernels
    # (no_grad, a freshly wrapped model). fp32 u 6e-8 x 2e3 terms (tiny VLM depth) x
    # max|logits| -> 1.2e-4 of it; measured 0. The LoRA's effect on the logits is
    # far above it (the untrained logits are > 1e-3 away), so a lost or misnamed LoRA
    # weight still fails.
    tol = assert_fp32_close(loaded, expected, terms=TINY_VLM_TERMS, what="loaded LoRA logits")
    assert not torch.allclose(untrained, expected, rtol=0, atol=max(1e-3, 10 * tol))


def test_merged_model_matches_the_adapter(stage2_encoder, tmp_path):
    from transformers import VideoLlavaForConditionalGeneration

    encoder_uri, _ = stage2_encoder
    out = tmp_path / "run"
    cfg = config(encoder_uri, out, 2, "output.merge=true")
    base = load_student_for_stage3(cfg)
    llm = run_stage3(cfg).videollm
    data = next(Instructions(cfg.data).batches(2))
    expected = llm.logits(data.video, data.prompts, data.targets)
    base.model = VideoLlavaForConditionalGeneration.from_pretrained(out / "merged").eval()
    # Merging rounds each W + scale * B @ A once (u x |W|) and then runs the plain layers:
    # fp32 u x 2e3 terms (tiny VLM depth) x max|logits| -> 1.2e-4 of it; measured 0 (max|logits| 0.57)
    assert_fp32_close(
        base.logits(data.video, data.prompts, data.targets), expected, terms=TINY_VLM_TERMS,
        what="merged logits",
    )


STEPS = 24


def test_killed_stage3_resumes_exactly(stage2_encoder, tmp_path):
    encoder_uri, _ = stage2_encoder
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stage3(config(encoder_uri, full, STEPS))
    expected = [m["loss"] for m in RunDir(str(full)).metrics()]
    assert len(expected) == STEPS

    cmd = [sys.executable, "-m", "vidalign_cli.main", "train", "stage3", "--config", str(CONFIG)]
    for item in overrides(encoder_uri, killed, STEPS):
        cmd += ["--set", item]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    killed_run = RunDir(str(killed))
    deadline = time.monotonic() + 240
    try:
        while len(killed_run.metrics()) < 3:  # past the step-2 checkpoint, before the end
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "stage 3 made no progress"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(killed_run.metrics()) < STEPS
    assert not (killed / "lora").exists()

    resumed = run_stage3(config(encoder_uri, killed, STEPS), resume=True)
    assert [m["loss"] for m in RunDir(str(killed)).metrics()] == expected  # no step twice
    assert [round(x, 6) for x in resumed.losses] == expected[STEPS - len(resumed.losses) :]
    assert len(resumed.losses) < STEPS

    a = load_file(full / "lora" / "adapter_model.safetensors")
    b = load_file(killed / "lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("student", ["tiny-llava-next-video", "tiny-qwen2.5-vl", "tiny-internvl3"])
def test_stage3_on_other_families(student, tmp_path):
    root = tmp_path / "stage2"
    root.mkdir()
    save_file(load_student(student).state_dict(), root / "encoder.safetensors")
    cfg = config(str(root / "encoder.safetensors"), tmp_path / "run", 2, f"student={student}")
    base = load_student_for_stage3(cfg)
    llm = run_stage3(cfg).videollm
    base_params = dict(base.model.named_parameters())
    lora = [n for n, _ in llm.model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    for name, param in llm.model.named_parameters():
        if "lora_" not in name:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, base_params.pop(plain)), plain
    assert not base_params
    assert (tmp_path / "run" / "lora" / "adapter_model.safetensors").is_file()
