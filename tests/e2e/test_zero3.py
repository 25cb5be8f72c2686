"""SFT and VDA stage 3 under DeepSpeed ZeRO-3: parameters partitioned over the ranks,
checkpoints and committed models whole, a resume that repeats the uninterrupted run.

Each DeepSpeed run is a child process (``_zero_worker.py``, as in test_zero.py);
the plain torch reference runs here, in-process. Every ZeRO-3 run here sets
``deepspeed.param_persistence_threshold: 0``: the tiny models' parameters are all
below DeepSpeed's default threshold (1e5 elements), which would leave them whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidalign.config import load_config
from vidalign_trainer.sft import SFTConfig, run_sft
from vidalign_trainer.stage3 import Stage3Config, run_stage3

from ..support.numerics import (
    TINY_VLM_TERMS,
    assert_same_adam_trajectory,
    assert_same_trajectory_scalars,
)
from .test_zero import ROOT, _kill_after, _metrics, _worker

ZERO3 = ["deepspeed.enabled=true", "deepspeed.zero_stage=3",
         "deepspeed.param_persistence_threshold=0"]
STEPS = 4


def _checkpoint(out: Path, step: int, stem: str) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:08d}" / f"{stem}.safetensors")


def _stems(out: Path, step: int, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A checkpoint's weight files as one dict, ``{stem}/{name}`` (the worker's naming)."""
    return {f"{stem}/{k}": v for stem in stems for k, v in _checkpoint(out, step, stem).items()}


def _shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _result(path: Path) -> dict:
    return json.loads(path.read_text())


def _module(result: Path) -> dict[str, torch.Tensor]:
    return load_file(result.with_name(f"{result.stem}-module.safetensors"))


# --- SFT ----------------------------------------------------------------------------

SFT = ROOT / "configs" / "sft-tiny.yaml"


def sft_sets(out: Path) -> list[str]:
    # Two clips whose captions (seed 2: "... moves left", "... moves right") have the same
    # number of reply tokens (49) and of aligned rows (20): CE and L_align are means within
    # each rank's slice, so two ranks' one-example slices equal one process on both only
    # where the slices hold as many of them. Caption task only: a QA example has no rows.
    return [
        f"output.dir={out}", f"train.steps={STEPS}", "output.checkpoint_every=2",
        "data.num_clips=2", "data.seed=2", "data.tasks=[caption]", "prior_steps=1",
    ]


def _sft_initial(config: SFTConfig) -> dict[str, torch.Tensor]:
    """The trainable weights SFT starts from, ``{stem}/{name}``."""
    from vidalign.motionenhancer.align import AttentionAligner, vision_grid
    from vidalign.students.videollm import load_videollm

    llm = load_videollm(config.student)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        aligner = AttentionAligner(vision_grid(llm).size, config.align.hidden)
    return {**{f"model/{k}": v for k, v in llm.model.state_dict().items()},
            **{f"aligner/{k}": v for k, v in aligner.state_dict().items()}}


@pytest.mark.slow
def test_sft_zero3_two_ranks_equals_one_process_saves_whole_weights_and_resumes(tmp_path):
    plain_out, out = tmp_path / "plain", tmp_path / "zero3"
    config = load_config(SFTConfig, SFT, sft_sets(plain_out))
    plain = [step["loss"] for step in run_sft(config).losses]
    assert any(m["grad_norm"] > config.train.grad_clip for m in _metrics(plain_out))

    sets = [*sft_sets(out), *ZERO3]
    _worker("sft", SFT, sets, tmp_path / "zero.json", ranks=2)
    ranks = [_result(tmp_path / f"zero-rank{r}.json") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and r["zero_stage"] == 3
               for r in ranks)
    # The parameters really were partitioned: each rank held half of every one (rounded up).
    for r in ranks:
        assert r["elements"]["held"] <= r["elements"]["whole"] // 2 + 1_000, r["elements"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the global mean, on every rank

    # Two ranks' one-example slices vs one process on both: one AdamW trajectory up to fp32
    # sum order (support/numerics.py): losses u x 2e3 terms x |loss| + 1e-3 of their change
    # over the run, bound 8.1e-4, measured 4.8e-7 (1,700x headroom); grad norms the same
    # (+ 1e-6 for their 6 decimals), bound 2.0e-3, measured 0 (the 6-decimal values agree).
    # Defects injected into the plain run: optimizer step 3 skipped moves the losses by
    # 4.6e-2 (56x the bound) and the norms by 0.20 (100x); gradients summed instead of
    # averaged over the ranks (doubled) move the norms by 3.1 (1,500x; not the losses or
    # weights: clipping and Adam are scale-free).
    assert_same_trajectory_scalars(ranks[0]["losses"], plain, terms=TINY_VLM_TERMS,
                                   what="sft zero3 2-rank losses")
    assert_same_trajectory_scalars(
        [m["grad_norm"] for m in _metrics(out)], [m["grad_norm"] for m in _metrics(plain_out)],
        terms=TINY_VLM_TERMS, decimals=6, what="sft zero3 2-rank grad norms",
    )

    # The checkpoint holds whole tensors, in plain safetensors: the plain run's names and
    # shapes, and exactly what each rank's module holds after the run (fit made it whole).
    stems = ("model", "aligner")
    saved = _stems(out, STEPS, stems)
    assert _shapes(saved) == _shapes(_stems(plain_out, STEPS, stems))
    for r in range(2):
        _assert_equal(_module(tmp_path / f"zero-rank{r}.json"), saved)
    reference, initial = _stems(plain_out, STEPS, stems), _sft_initial(config)
    # No gradient reaches the video tower's last layer (the features are the layer before):
    # plain AdamW skips a parameter without .grad, DeepSpeed gives it a zero gradient, so
    # its decoupled weight decay shrinks the matrices by prod(1 - lr_t * wd) (Adam's update
    # is 0 / (0 + eps) = 0) and leaves the vectors (no decay) as they were. Each step
    # rounds the factor to fp32 and the product (2u): 8u relative over 4 steps.
    unmoved = {k for k in reference if torch.equal(reference[k], initial[k])}
    assert unmoved and all("video_tower" in k for k in unmoved), sorted(unmoved)
    lrs = [config.train.lr_vision] + [
        next(g["lr"] for g in groups if g["name"] == "vision")
        for groups in ranks[0]["param_groups"][:-1]
    ]
    decay = math.prod(1 - lr * config.train.weight_decay for lr in lrs)
    for k in unmoved:
        expected = initial[k].double() * (decay if initial[k].ndim >= 2 else 1.0)
        torch.testing.assert_close(saved[k].double(), expected, rtol=8 * 2.0**-24, atol=0.0)
    # Measured 3.6u. The rest: ||zero3 - plain|| / ||plain - initial|| <= 1e-3
    # (support/numerics.py): measured 5.4e-7 (1,800x headroom); the skipped step leaves
    # them 0.35 of their displacement away.
    moved = [k for k in reference if k not in unmoved]
    assert_same_adam_trajectory({k: saved[k] for k in moved}, {k: reference[k] for k in moved},
                                initial)

    # The committed model: the plain run's files, names and shapes; loadable without
    # DeepSpeed, holding the checkpoint's weights.
    from vidalign.students.videollm import load_videollm

    model_dir = out / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        p.name for p in (plain_out / "model").iterdir())
    for name in ("model.safetensors", "aligner.safetensors"):
        assert _shapes(load_file(model_dir / name)) == _shapes(load_file(plain_out / "model" / name))
    _assert_equal({f"aligner/{k}": v for k, v in load_file(model_dir / "aligner.safetensors").items()},
                  {k: v for k, v in saved.items() if k.startswith("aligner/")})
    loaded = load_videollm(config.student, path=str(model_dir)).model.state_dict()
    _assert_equal({f"model/{k}": loaded[k] for k in _checkpoint(out, STEPS, "model")},
                  {k: v for k, v in saved.items() if k.startswith("model/")})

    # Killed after step 2's checkpoint; --resume under 2 ranks repeats steps 3 and 4 exactly:
    # each rank takes its slice of the fp32 master weights and of AdamW's moments back.
    _kill_after(out, 2)
    _worker("sft", SFT, sets, tmp_path / "resumed.json", resume=True, ranks=2)
    resumed = _result(tmp_path / "resumed-rank0.json")
    assert resumed["losses"] == ranks[0]["losses"][2:]
    assert resumed["param_groups"] == ranks[0]["param_groups"][2:]
    _assert_equal(_stems(out, STEPS, stems), saved)
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]


# --- VDA stage 3 --------------------------------------------------------------------

STAGE3 = ROOT / "configs" / "stage3-tiny.yaml"


def stage3_sets(out: Path, *extra: str) -> list[str]:
    return [
        "encoder=", f"output.dir={out}", f"train.steps={STEPS}", "train.lr=1e-2",
        "output.checkpoint_every=2", "data.num_clips=4", *extra,
    ]


def _lora_initial(config: Stage3Config) -> dict[str, torch.Tensor]:
    from vidalign_trainer.stage3 import apply_lora, load_student_for_stage3, trainable_state

    llm = load_student_for_stage3(config)
    apply_lora(llm, config.lora, config.train.seed)
    return {f"lora/{k}": v.clone() for k, v in trainable_state(llm.model).items()}


@pytest.mark.slow
def test_stage3_zero3_equals_plain_torch_commits_a_whole_adapter_and_resumes(tmp_path):
    from peft import PeftModel

    from vidalign_trainer.stage3 import load_student_for_stage3

    plain_out, out = tmp_path / "plain", tmp_path / "zero3"
    config = load_config(Stage3Config, STAGE3, stage3_sets(plain_out))
    plain = run_stage3(config).losses
    assert any(m["grad_norm"] > config.train.grad_clip for m in _metrics(plain_out))

    sets = [*stage3_sets(out), *ZERO3]
    _worker("stage3", STAGE3, sets, tmp_path / "zero.json")
    zero = _result(tmp_path / "zero.json")
    assert zero["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero["zero_stage"] == 3
    # Stage 3's loop through the engine: the same AdamW trajectory as plain torch (bounds
    # derived as for SFT): losses bound 7.1e-4, measured 4.8e-7 (1,500x headroom); grad
    # norms bound 2.5e-3, measured 1.0e-6 (one unit of their 6th decimal; 2,500x). Injected
    # into the plain run: a skipped step 3 moves the losses by 2.9e-2 (40x the bound) and
    # the norms by 0.24 (100x); doubled gradients (a sum over 2 ranks) the norms by 2.6
    # (1,000x).
    assert_same_trajectory_scalars(zero["losses"], plain, terms=TINY_VLM_TERMS,
                                   what="stage3 zero3 losses")
    assert_same_trajectory_scalars(
        [m["grad_norm"] for m in _metrics(out)], [m["grad_norm"] for m in _metrics(plain_out)],
        terms=TINY_VLM_TERMS, decimals=6, what="stage3 zero3 grad norms",
    )

    # The LoRA checkpoint: whole, plain safetensors, the plain run's names and shapes, what
    # the module holds after the run; one AdamW trajectory with the plain run's (measured
    # 2.8e-6 of the displacement, bound 1e-3: 360x headroom; the skipped step leaves them
    # 0.35 of it away, doubled gradients 0.16).
    saved = _stems(out, STEPS, ("lora",))
    assert _shapes(saved) == _shapes(_stems(plain_out, STEPS, ("lora",)))
    _assert_equal(_module(tmp_path / "zero.json"), saved)
    assert_same_adam_trajectory(saved, _stems(plain_out, STEPS, ("lora",)), _lora_initial(config))

    # The committed adapter loads with peft, without DeepSpeed, and holds those weights.
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    assert _shapes(adapter) == _shapes(load_file(plain_out / "lora" / "adapter_model.safetensors"))
    base = load_student_for_stage3(config).model
    peft_model = PeftModel.from_pretrained(base, str(out / "lora"))
    _assert_equal({f"lora/{k}": v for k, v in peft_model.state_dict().items() if "lora_" in k},
                  saved)

    # Killed after step 2's checkpoint: --resume repeats steps 3 and 4 exactly.
    _kill_after(out, 2)
    _worker("stage3", STAGE3, sets, tmp_path / "resumed.json", resume=True)
    resumed = _result(tmp_path / "resumed.json")
    assert resumed["losses"] == zero["losses"][2:]
    _assert_equal(_stems(out, STEPS, ("lora",)), saved)


@pytest.mark.slow
def test_stage3_zero3_bf16_checkpoints_whole_and_resumes(tmp_path):
    """DeepSpeed's bf16 section at stage 3: the module (LoRA included) in bf16, the fp32
    master weights' slices in the optimizer state, the resume the same run up to rounding."""
    out = tmp_path / "zero3"
    bf16 = stage3_sets(out, "train.precision=bf16")
    config = load_config(Stage3Config, STAGE3, bf16)
    _worker("stage3", STAGE3, [*bf16, *ZERO3], tmp_path / "zero.json")
    zero = _result(tmp_path / "zero.json")
    assert zero["zero_stage"] == 3 and all(math.isfinite(x) for x in zero["losses"])
    saved = _stems(out, STEPS, ("lora",))
    assert _shapes(saved) == _shapes(_lora_initial(config))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    _assert_equal(_module(tmp_path / "zero.json"), saved)
    optimizer = torch.load(out / "checkpoints" / f"step-{STEPS:08d}" / "optimizer.pt",
                           weights_only=False)
    assert optimizer["zero_stage"] == 3 and optimizer["world_size"] == 1
    assert {t.dtype for t in optimizer["ranks"][0]["fp32_flat_groups"]} == {torch.float32}

    # The bf16 weights a resume loads are overwritten by the fp32 masters, so the resumed
    # run computes the same steps from the same weights, but not bit for bit: CPU bf16
    # kernels accumulate in fp32 in an order that can differ between processes (14 of 15
    # recorded runs were bitwise; a CI run under load differed by 1.1e-5 of its first resumed
    # loss, 4.706485 vs 4.706536). A reordered fp32 sum moves a result by ~n * u32; rounded
    # to bf16, it flips to the neighbouring value (one bf16 ulp) with a probability of about
    # n * u32 / ulp, so the expected change of a mean over many elements is again ~n * u32
    # of it. Hence the fp32 summation-order bounds: TINY_VLM_TERMS on the losses (1.2e-4 of
    # them, ~6e-4 here), ADAM_TRAJECTORY_REL on the fp32 masters' path from step 2. A resume
    # one batch off moves the loss by 0.017 (steps 3 and 4 of that run); one that lost its
    # moments or weights moves the masters by the order of their path.
    def masters(step: int) -> dict[str, torch.Tensor]:
        state = torch.load(out / "checkpoints" / f"step-{step:08d}" / "optimizer.pt",
                           weights_only=False)
        return {str(i): t for i, t in enumerate(state["ranks"][0]["fp32_flat_groups"])}

    resumed_from, uninterrupted = masters(2), masters(STEPS)
    _kill_after(out, 2)
    _worker("stage3", STAGE3, [*bf16, *ZERO3], tmp_path / "resumed.json", resume=True)
    assert_same_trajectory_scalars(_result(tmp_path / "resumed.json")["losses"],
                                   zero["losses"][2:], terms=TINY_VLM_TERMS)
    assert_same_adam_trajectory(masters(STEPS), uninterrupted, resumed_from)
    # And it saves a whole LoRA in bf16 again.
    resumed = _stems(out, STEPS, ("lora",))
    assert _shapes(resumed) == _shapes(saved) and {v.dtype for v in resumed.values()} == {torch.bfloat16}
