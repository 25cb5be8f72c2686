"""The ``deepspeed`` config section of stage 2, SFT and stage 3: defaults, validation,
resume checks, what the ZeRO engine does without DeepSpeed at stages 1 and 2.

Nothing here imports DeepSpeed (the runs are in tests/e2e/test_zero.py, in
child processes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vidalign.config import ConfigError, load_config
from vidalign.errors import FailedPrecondition, InvalidInput
from vidalign_trainer.common import Dist
from vidalign_trainer.sft import SFTConfig, run_sft
from vidalign_trainer.stage2 import Stage2Config, run_stage2
from vidalign_trainer.stage3 import Stage3Config, run_stage3
from vidalign_trainer.zero import (
    FORMAT,
    DeepSpeedConfig,
    DeepSpeedStage12Config,
    ZeroEngine,
    engine_config,
    require_plain_state,
)

ROOT = Path(__file__).resolve().parents[2]
JOBS = [(Stage2Config, "stage2-tiny.yaml"), (SFTConfig, "sft-tiny.yaml"),
        (Stage3Config, "stage3-tiny.yaml")]
ZERO3_JOBS = JOBS[1:]


@pytest.mark.parametrize(("cls", "name"), JOBS)
def test_the_tiny_configs_document_the_section_disabled(cls, name):
    path = ROOT / "configs" / name
    assert yaml.safe_load(path.read_text())["deepspeed"]["enabled"] is False
    config = load_config(cls, path)
    assert config.deepspeed == type(config.deepspeed)() and not config.deepspeed.enabled
    assert cls().deepspeed == type(config.deepspeed)()  # the default: off
    on = load_config(cls, path, ["deepspeed.enabled=true", "deepspeed.zero_stage=1"])
    assert on.deepspeed.enabled and on.deepspeed.zero_stage == 1


@pytest.mark.parametrize("stage", [0, 4])
def test_unsupported_zero_stages_are_refused_by_name(stage):
    with pytest.raises(InvalidInput, match=rf"deepspeed\.zero_stage: expected one of \[1, 2, 3\], got {stage}$"):
        DeepSpeedConfig(zero_stage=stage)
    with pytest.raises(InvalidInput, match=rf"deepspeed\.zero_stage: expected one of \[1, 2\], got {stage}$"):
        DeepSpeedStage12Config(zero_stage=stage)
    with pytest.raises(InvalidInput, match=r"deepspeed\.reduce_bucket_size"):
        DeepSpeedConfig(reduce_bucket_size=0)
    with pytest.raises(InvalidInput, match=r"deepspeed\.param_persistence_threshold: expected >= 0"):
        DeepSpeedConfig(zero_stage=3, param_persistence_threshold=-1)


def test_stage3_is_refused_with_its_reason_where_a_job_runs_1_and_2_only():
    assert DeepSpeedConfig(zero_stage=3).zero_stage == 3
    with pytest.raises(InvalidInput, match=r"expected one of \[1, 2\], got 3 \(stage 3 partitions"):
        DeepSpeedStage12Config(zero_stage=3)


@pytest.mark.parametrize(("cls", "name"), JOBS)
def test_config_files_and_overrides_name_the_bad_option(cls, name):
    if cls is Stage2Config:
        with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage.*got 3.*stage 3 partitions"):
            load_config(cls, ROOT / "configs" / name, ["deepspeed.zero_stage=3"])
    else:
        config = load_config(cls, ROOT / "configs" / name, ["deepspeed.zero_stage=3",
                                                            "deepspeed.param_persistence_threshold=0"])
        assert config.deepspeed.zero_stage == 3 and config.deepspeed.param_persistence_threshold == 0
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage.*got 4"):
        load_config(cls, ROOT / "configs" / name, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"unknown config key.*deepspeed\.stage"):
        load_config(cls, ROOT / "configs" / name, ["deepspeed.stage=2"])


def test_a_stage_changed_after_loading_is_refused_before_any_work(tmp_path):
    stage2 = Stage2Config()
    stage2.output.dir = str(tmp_path / "stage2")
    stage2.deepspeed.zero_stage = 3
    with pytest.raises(InvalidInput, match=r"deepspeed\.zero_stage"):
        run_stage2(stage2)
    for cls, run in ((SFTConfig, run_sft), (Stage3Config, run_stage3)):
        config = cls()
        config.output.dir = str(tmp_path / cls.__name__)
        config.deepspeed.zero_stage = 4
        with pytest.raises(InvalidInput, match=r"deepspeed\.zero_stage"):
            run(config)
    assert not any(tmp_path.iterdir())  # no run directory, no model loaded


def test_cli_reports_the_bad_stage():
    proc = subprocess.run(
        [sys.executable, "-m", "vidalign_cli.main", "train", "sft",
         "--config", str(ROOT / "configs" / "sft-tiny.yaml"), "--set", "deepspeed.zero_stage=4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "deepspeed.zero_stage" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_config_clips_once_in_fp32():
    config = engine_config(DeepSpeedConfig(zero_stage=1), micro_batch_size=3, grad_clip=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 1
    assert not config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert engine_config(DeepSpeedConfig(), micro_batch_size=1, grad_clip=0)["gradient_clipping"] == 0.0
    assert "stage3_param_persistence_threshold" not in config["zero_optimization"]


def test_engine_config_of_stage3_sets_the_persistence_threshold():
    zero3 = engine_config(DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0),
                          micro_batch_size=1, grad_clip=1.0, precision="bf16")
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert zero3["bf16"]["enabled"] and not zero3["fp16"]["enabled"]
    default = engine_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=1, grad_clip=1.0)
    assert default["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000


def _zero_state(stage=2, world_size=1):
    return {"format": FORMAT, "zero_stage": stage, "world_size": world_size, "ranks": [{}] * world_size}


class _NoEngine:
    def __getattr__(self, name):
        raise AssertionError(f"the engine was used ({name}) although the state was refused")


@pytest.mark.parametrize("stage", [1, 2])
def test_below_stage3_the_weights_are_the_jobs_own_on_rank_0(stage):
    weights = {"model": {"w": torch.ones(2)}}
    main = ZeroEngine(_NoEngine(), config=DeepSpeedConfig(zero_stage=stage), ranks=Dist(),
                      owns_group=False)
    assert main.consolidated(lambda: weights) is weights
    main.consolidate_module()  # nothing to gather, the engine untouched
    with main.gathered():
        pass
    other = ZeroEngine(_NoEngine(), config=DeepSpeedConfig(zero_stage=stage),
                       ranks=Dist(rank=1, world_size=2), owns_group=False)
    assert other.consolidated(lambda: pytest.fail("weights() called off rank 0")) is None


def test_resume_refuses_a_checkpoint_of_another_layout():
    zero = ZeroEngine(_NoEngine(), config=DeepSpeedConfig(), ranks=Dist(), owns_group=False)
    with pytest.raises(FailedPrecondition, match=r"plain torch optimizer state.*deepspeed\.enabled: false"):
        zero.load_optimizer_state({"state": {}, "param_groups": []}, "step-00000002")
    with pytest.raises(FailedPrecondition, match=r"deepspeed\.zero_stage: 1, this run has 2"):
        zero.load_optimizer_state(_zero_state(stage=1), "step-00000002")
    with pytest.raises(FailedPrecondition, match=r"over 2 rank\(s\); this run has 1"):
        zero.load_optimizer_state(_zero_state(world_size=2), "step-00000002")
    # A plain run refuses a ZeRO checkpoint, and takes its own.
    with pytest.raises(FailedPrecondition, match=r"step-00000002 holds a DeepSpeed ZeRO-2"):
        require_plain_state(_zero_state(), "step-00000002")
    plain = {"state": {}, "param_groups": []}
    assert require_plain_state(plain, "step-00000002") is plain
