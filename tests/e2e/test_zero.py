"""Stage 2 and SFT under DeepSpeed ZeRO-2 train as plain torch does, and resume exactly.

Each DeepSpeed run happens in a child process (``_zero_worker.py``, or the CLI;
DeepSpeed and ``torch.distributed`` set up process-global state); the plain
torch reference runs here, in-process, from the same seed and config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidalign.config import load_config
from vidalign.students import load_student
from vidalign.vda import Adapter
from vidalign_trainer.sft import GROUPS, SFTConfig, cosine_with_warmup, run_sft
from vidalign_trainer.stage2 import Stage2Config, run_stage2

from ..conftest import STUDENT
from ..support.numerics import (
    TINY_TEACHER_GRAD_NORM_TERMS,
    TINY_TEACHER_LOSS_TERMS,
    TINY_VLM_TERMS,
    assert_same_adam_trajectory,
    assert_same_trajectory_scalars,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_zero_worker.py")
# A cold TORCH_EXTENSIONS_DIR makes DeepSpeed compile its CPU shm-comm op (~70 s on 2 cores).
TIMEOUT_S = 400


def _env(threads: int = 2) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "DS_BUILD_OPS": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")
        ),
        "PYTHONUNBUFFERED": "1",
    }
    # A world of one unless the child is started by torchrun (which sets its own).
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's rank-to-rank connections on loopback
    return env


def _child(cmd: list[str], log: Path, *, threads: int = 2, expect: int = 0) -> str:
    """Run ``cmd`` (bounded; its whole process group killed on timeout); its output."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, env=_env(threads),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker, its ranks, a compiler
            proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    if proc.returncode != expect:
        tail = "\n".join(text.splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd[:6])}...: exit {proc.returncode}, expected {expect}:\n{tail}")
    return text


def _worker(job: str, config: Path, sets: list[str], result: Path, *, resume: bool = False,
            ranks: int = 1) -> None:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd = [*launcher, str(WORKER), job, "--config", str(config), "--result", str(result)]
    for item in sets:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    _child(cmd, result.with_suffix(".log"), threads=1 if ranks > 1 else 2)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _kill_after(out: Path, step: int) -> None:
    """What a job killed after committing checkpoint ``step`` leaves: later ones gone."""
    for path in (out / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)


# --- stage 2 --------------------------------------------------------------------

STAGE2 = ROOT / "configs" / "stage2-tiny.yaml"


def stage2_sets(adapter: Path, out: Path, steps: int, address: str = "local") -> list[str]:
    # grad_clip below every step's gradient norm: clipping acts on each step.
    return [
        f"teacher.address={address}", f"teacher.adapter={adapter}", f"output.dir={out}",
        f"train.steps={steps}", "train.lr=1e-3", "train.grad_clip=0.01",
        "output.checkpoint_every=2", "data.num_clips=6",
    ]


def _context_adapter(adapter_paths, tmp_path: Path) -> Path:
    """The session's tiny-animatediff adapter (same W_proj) with "context" conditioning.

    grad_clip and the gaps measured below were calibrated on that shared-context route.
    Under the default "frame" each F_V token conditions one teacher frame instead of all
    8, and the encoder's gradient norms (0.002-0.004) fall below grad_clip 0.01.
    """
    source = Adapter.load(adapter_paths["tiny-animatediff"])
    adapter = Adapter(**{**source._fields(), "conditioning": "context"})
    adapter.proj.load_state_dict(source.proj.state_dict())
    path = tmp_path / "context-adapter.safetensors"
    adapter.save(path)
    return path


def _encoder(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:08d}" / "encoder.safetensors")


def test_stage2_zero2_equals_plain_torch_and_resumes_exactly(adapter_paths, tmp_path):
    adapter = _context_adapter(adapter_paths, tmp_path)
    plain_out, zero_out = tmp_path / "plain", tmp_path / "zero"
    plain = run_stage2(load_config(Stage2Config, STAGE2, stage2_sets(adapter, plain_out, 4)))
    assert all(m["grad_norm"] > 0.01 for m in _metrics(plain_out))  # clipping acted

    sets = [*stage2_sets(adapter, zero_out, 4), "deepspeed.enabled=true"]
    _worker("stage2", STAGE2, sets, tmp_path / "zero.json")
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert zero["optimizer"] == "DeepSpeedZeroOptimizer" and zero["zero_stage"] == 2
    assert zero["world_size"] == 1 and zero["gradient_clipping"] == 0.01
    # ZeRO's flat buffers vs per-parameter tensors: one AdamW trajectory up to fp32 sum
    # order. Per step u x 1.5e3 x |loss| + 1e-3 of the loss's span (support/numerics.py):
    # bound 1.4e-4, measured 1.2e-7 (1,150x headroom). A skipped optimizer step moves the
    # losses by 1.0e-3 (7x the bound); clipping twice or not at all changes the steps by O(1).
    assert_same_trajectory_scalars(
        zero["losses"], plain, terms=TINY_TEACHER_LOSS_TERMS, what="stage2 zero2 losses"
    )
    # DeepSpeed clipped once, as clip_grad_norm_ does: the same norms before clipping.
    # A norm carries u x 2e3 (10 sigma of its entries' 4e4 roundings) x |norm|, + 1e-3 of its
    # change over the run, + 1e-6 for the 6-decimal metrics: bound 1.8e-5, measured 0 (the
    # 6-decimal values agree). Gradients averaged wrong by a factor 2 move the norms by 3.7e-2
    # (2,000x the bound; the weights cannot show it: clipping and Adam are scale-free); a
    # skipped step by 8.2e-3; a norm taken after clipping would read 0.01.
    assert_same_trajectory_scalars(
        [m["grad_norm"] for m in _metrics(zero_out)], [m["grad_norm"] for m in _metrics(plain_out)],
        terms=TINY_TEACHER_GRAD_NORM_TERMS, decimals=6, what="stage2 zero2 grad norms",
    )

    # Only the encoder's trainable parameters moved, as in the plain run.
    student = load_student(STUDENT)
    initial = student.state_dict()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    trained = _encoder(zero_out, 4)
    assert trained.keys() == initial.keys() and trainable and trainable < trained.keys()
    assert all(torch.equal(trained[k], initial[k]) for k in trained.keys() - trainable)
    assert all(not torch.equal(trained[k], initial[k]) for k in trainable)
    # ||zero - plain|| / ||plain - initial|| <= 1e-3 (support/numerics.py): measured 7.3e-7
    # (1,400x headroom); a skipped step leaves the weights 0.49 of their displacement away.
    assert_same_adam_trajectory(trained, _encoder(plain_out, 4), initial)

    # Killed after step 2's checkpoint; --resume repeats steps 3 and 4 exactly.
    full = zero["losses"]
    _kill_after(zero_out, 2)
    _worker("stage2", STAGE2, sets, tmp_path / "resumed.json", resume=True)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["losses"] == full[2:]
    assert _max_diff(_encoder(zero_out, 4), trained) == 0.0
    assert [m["step"] for m in _metrics(zero_out)] == [1, 2, 3, 4]

    # A ZeRO checkpoint holds every rank's optimizer partition: a plain run refuses it.
    cli = [sys.executable, "-m", "vidalign_cli.main", "train", "stage2", "--config", str(STAGE2)]
    for item in stage2_sets(adapter, zero_out, 6):
        cli += ["--set", item]
    text = _child([*cli, "--resume"], tmp_path / "refused.log", expect=2)
    assert "holds a DeepSpeed ZeRO-2 optimizer state" in text
    assert "deepspeed.enabled: true" in text


@pytest.mark.slow
def test_stage2_zero2_two_ranks_under_torchrun(teacher_servers, adapter_paths, tmp_path):
    """Each rank its half of the batch and its own teacher calls; equal to one process."""
    adapter = adapter_paths["tiny-animatediff"]
    address = teacher_servers["tiny-animatediff"]
    single = run_stage2(
        load_config(Stage2Config, STAGE2, stage2_sets(adapter, tmp_path / "single", 4, address))
    )
    out = tmp_path / "ddp"
    sets = [*stage2_sets(adapter, out, 4, address), "deepspeed.enabled=true"]
    _worker("stage2", STAGE2, sets, tmp_path / "zero.json", ranks=2)
    ranks = [json.loads((tmp_path / f"zero-rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the global mean, on every rank
    # Same bounds as above (two ranks' halves vs one batch): losses measured 1.2e-7 (bound
    # 1.4e-4), weights 9.6e-6 of their displacement (bound 1e-3, 100x headroom). A rank whose
    # gradient is not all-reduced trains on its half alone: O(1) of the displacement.
    assert_same_trajectory_scalars(
        ranks[0]["losses"], single, terms=TINY_TEACHER_LOSS_TERMS, what="stage2 zero2 2-rank losses"
    )
    assert_same_adam_trajectory(
        _encoder(out, 4), _encoder(tmp_path / "single", 4), load_student(STUDENT).state_dict()
    )

    # Resume under 2 ranks: each takes its own optimizer partition back.
    _kill_after(out, 2)
    _worker("stage2", STAGE2, sets, tmp_path / "resumed.json", resume=True, ranks=2)
    resumed = json.loads((tmp_path / "resumed-rank0.json").read_text())
    assert resumed["losses"] == ranks[0]["losses"][2:]


# --- SFT --------------------------------------------------------------------------

SFT = ROOT / "configs" / "sft-tiny.yaml"
SFT_STEPS = 4


def sft_sets(out: Path) -> list[str]:
    return [
        f"output.dir={out}", f"train.steps={SFT_STEPS}", "output.checkpoint_every=2",
        "output.save_model=false", "data.num_clips=2", "prior_steps=1",
    ]


def test_sft_zero2_equals_plain_torch_with_each_groups_learning_rate(tmp_path):
    plain_out, zero_out = tmp_path / "plain", tmp_path / "zero"
    config = load_config(SFTConfig, SFT, sft_sets(plain_out))
    plain = [step["loss"] for step in run_sft(config).losses]
    assert any(m["grad_norm"] > config.train.grad_clip for m in _metrics(plain_out))

    sets = [*sft_sets(zero_out), "deepspeed.enabled=true"]
    _worker("sft", SFT, sets, tmp_path / "zero.json")
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert zero["optimizer"] == "DeepSpeedZeroOptimizer" and zero["zero_stage"] == 2
    assert zero["gradient_clipping"] == config.train.grad_clip
    # The tiny VLM's losses and grad norms: u x 2e3 terms (its depth) x |value| + 1e-3 of
    # their change over the run (+ 1e-6 for the 6-decimal norms): bounds 6.7e-4 (losses) and
    # 1.5e-3 (norms), both measured 0. A skipped step moves them by 7.5e-2 and 0.26 (> 100x
    # the bounds), gradients averaged wrong by 2 the norms by 4.1; a group on another learning
    # rate moves the losses by O(1e-2) within 4 steps.
    assert_same_trajectory_scalars(zero["losses"], plain, terms=TINY_VLM_TERMS, what="sft zero2 losses")
    assert_same_trajectory_scalars(
        [m["grad_norm"] for m in _metrics(zero_out)], [m["grad_norm"] for m in _metrics(plain_out)],
        terms=TINY_VLM_TERMS, decimals=6, what="sft zero2 grad norms",
    )

    # After each step, the engine's optimizer holds the job's param groups, each with its
    # own learning rate on the warmup-cosine schedule, and decay on matrices only.
    base = {
        "vision": config.train.lr_vision, "projector": config.train.lr_projector,
        "llm": config.train.lr_llm, "aligner": config.train.lr_aligner,
    }
    reference = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": base[k]} for k in GROUPS]
    )
    schedule = cosine_with_warmup(reference, SFT_STEPS, config.train.warmup_ratio)
    assert len(zero["param_groups"]) == SFT_STEPS
    for step, groups in enumerate(zero["param_groups"]):
        reference.step()  # no gradients: a no-op, in the order the scheduler expects
        schedule.step()
        expected = {k: g["lr"] for k, g in zip(GROUPS, reference.param_groups, strict=True)}
        assert {g["name"] for g in groups} == set(GROUPS)
        assert {g["weight_decay"] for g in groups} == {config.train.weight_decay, 0.0}
        for g in groups:
            # Exact: both sides are LambdaLR's base_lr * factor(step), the same float64
            # expression (math.cos included) in both processes, carried through JSON by repr.
            assert g["lr"] == expected[g["name"]], (step, g)
    first = {g["name"]: g["lr"] for g in zero["param_groups"][0]}
    assert first == base  # distinct per group, and not yet decayed
    assert [m["lr"] for m in _metrics(zero_out)] == [m["lr"] for m in _metrics(plain_out)]

    # Killed after step 2's checkpoint: AdamW's partitioned state and the schedule resume.
    _kill_after(zero_out, 2)
    _worker("sft", SFT, sets, tmp_path / "resumed.json", resume=True)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["losses"] == zero["losses"][2:]
    assert resumed["param_groups"] == zero["param_groups"][2:]
