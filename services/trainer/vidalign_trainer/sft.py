"""MotionEnhancer SFT: CE + lambda * L_align, the whole VLM trainable (docs/papers.md).

    priors  <- CogVideoX text-to-vision attention after MHS/MTTI (one file per clip)
    A_vlm   = text-to-vision attention of the VLM, mean over heads and layers, rows of the
              tokens covering each selected word (vidalign.motionenhancer.align, forward hooks)
    L       = CE(reply tokens) + lambda * mean_s || Aligner(A_vlm[s]) - prior[s] ||^2   (lambda = 1)

Trainable, each with its own learning rate: the vision tower, the merger /
multimodal projector, the LLM (with ``lm_head``) and the aligner (a 3-layer
MLP, hidden width ``align.hidden``). AdamW, weight decay 0.1 on matrices (none
on biases and norm weights), linear warmup over ``ceil(warmup_ratio * steps)``
steps then cosine to 0.

Data: the toy clips (``vidalign.data.toy``) or a SynthMotion directory
(``data.kind: synth``), each with a caption pair ("Describe the video." ->
caption; the caption is the teacher's prompt, so its selected tokens are found
inside the reply) and optionally QA pairs (CE only: the caption is not in that
conversation; SynthMotion's multiple-choice questions, each with the prompt the
evaluation gives; the target is the option's text then its letter, ``ANSWER_FORMAT``
of ``vidalign.data.synthset``). Priors come from the
priors set that ``vidalign priors extract`` wrote for the same clips
(``vidalign.motionenhancer.io.load_priors_set``), or, with ``priors: ""``, are
extracted in-process with ``teacher`` (tests and the CPU demo).

Output: checkpoints (trainable weights, aligner, optimizer, scheduler, RNG)
under ``<out>/checkpoints``; resume repeats an uninterrupted run; the final
model as the store artifact ``<out>/model`` (``save_pretrained`` + tokenizer
+ ``aligner.safetensors``); mean CE / L_align over the training set before
and after training in ``<out>/model``'s manifest meta and the result.

One process trains with plain torch AdamW; under ``torchrun`` each rank takes
its slice of every batch and DDP averages the gradients. With
``deepspeed.enabled: true`` the VLM and the aligner are wrapped, with this AdamW (its parameter groups and their learning rates)
and the warmup-cosine schedule, in a DeepSpeed ZeRO-1/2/3 engine
(``vidalign_trainer.zero``; DeepSpeed clips to ``train.grad_clip`` and steps the
schedule; at stage 3 the VLM and the aligner are partitioned over the ranks, and
the checkpoints and ``<out>/model`` gathered whole), with plain ``python`` (one rank; the losses equal the plain run's,
tested to 1e-5 relative), ``torchrun`` or the ``deepspeed`` launcher. Under N
ranks each rank trains on its 1/N slice of every batch (``train.batch_size``
must divide by N) and the gradients (and the logged losses) are averaged over
the ranks; CE and L_align are means within each rank's slice (over its reply
tokens, its aligned rows), so this equals one process on the whole batch only
where the slices hold as many of them. Rank 0 logs, checkpoints and commits; checkpoints then hold every rank's ZeRO optimizer state, so a resume
needs the same ``deepspeed`` settings and number of ranks (refused otherwise).

The loop, resume, checkpoints, metrics and ranks are ``vidalign_trainer.loop``'s.

Run: ``vidalign train sft --config configs/sft-tiny.yaml [--resume]``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidalign.checkpoint import Checkpoint
from vidalign.errors import InvalidInput
from vidalign.log import get_logger
from vidalign.motionenhancer.align import (
    AttentionAligner,
    PriorItem,
    VisionGrid,
    align_loss,
    build_align_batch,
    motion_sft_loss,
    vision_grid,
)
from vidalign.papers import (
    ME_ALIGN_WEIGHT,
    ME_LR_LLM,
    ME_LR_MERGER,
    ME_LR_VISION,
    ME_WARMUP_RATIO,
    ME_WEIGHT_DECAY,
)
from vidalign.precision import (
    autocast,
    enable_gradient_checkpointing,
    keep_trainable_fp32,
    precision_dtype,
)
from vidalign.store import commit_artifact
from vidalign.students.videollm import VideoLLM, load_videollm
from vidalign_trainer.common import (
    ClipData,
    InstructionBatch,
    InstructionDataConfig,
    Instructions,
    epoch_order,
)
from vidalign_trainer.loop import Built, Context, Job, LoopConfig, StepOutput, StudentSection, fit
from vidalign_trainer.loop import OutputConfig as BaseOutputConfig
from vidalign_trainer.zero import DeepSpeedConfig

log = get_logger("vidalign.sft")

GROUPS = ("vision", "projector", "llm", "aligner")


@dataclass(kw_only=True)
class DataConfig(InstructionDataConfig):
    num_clips: int = 4
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    """``caption`` (aligned: the caption is the teacher's prompt) and/or ``qa`` (CE only: the
    caption is not in that conversation)."""


@dataclass(kw_only=True)
class AlignConfig:
    weight: float = ME_ALIGN_WEIGHT
    """lambda of CE + lambda * L_align (the paper: 1)."""
    hidden: int = 64
    """Aligner MLP hidden width; its size is 2 N h + h^2 + 2 h + N for N grid cells."""

    def __post_init__(self) -> None:
        if self.weight < 0 or self.hidden < 1:
            raise ValueError("align.weight must be >= 0 and align.hidden >= 1")


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """SFT's ``train`` section: each component has its own learning rate."""

    steps: int = 30
    lr_vision: float = ME_LR_VISION
    """Learning rate of the vision tower."""
    lr_projector: float = ME_LR_MERGER
    """Learning rate of the merger / multimodal projector."""
    lr_llm: float = ME_LR_LLM
    """Learning rate of the LLM (with ``lm_head``)."""
    lr_aligner: float = 1e-4
    """Learning rate of the aligner MLP."""
    weight_decay: float = ME_WEIGHT_DECAY
    """AdamW weight decay on matrices (none on biases and norm weights)."""
    warmup_ratio: float = ME_WARMUP_RATIO
    """Linear warmup over ``ceil(warmup_ratio * steps)`` steps, then cosine to 0."""
    eval_examples: int = 0
    """Examples of the evaluation before the first and after the last step: the first N of
    the set in order (0: all of them; a real set wants a few hundred)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        lrs = (self.lr_vision, self.lr_projector, self.lr_llm, self.lr_aligner)
        if min(lrs) < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("train.lr_* must be >= 0 and 0 <= train.warmup_ratio < 1")
        if self.eval_examples < 0:
            raise ValueError(f"train.eval_examples must be >= 0, got {self.eval_examples}")


@dataclass(kw_only=True)
class OutputConfig(BaseOutputConfig):
    dir: str = "runs/sft"
    checkpoint_every: int = 10
    keep_latest_k: int = 2
    save_model: bool = True
    """Commit ``<dir>/model`` (the whole fine-tuned VLM + aligner)."""


@dataclass(kw_only=True)
class SFTConfig(StudentSection):
    device: str = "cpu"
    """Device of the VLM (``cuda`` picks ``cuda:LOCAL_RANK`` under torchrun)."""
    priors: str = ""
    """Priors set (store URI or dir) written by ``vidalign priors extract`` over the same clips;
    empty: extract the priors in-process with ``teacher``."""
    teacher: str = "tiny-cogvideox"
    """CogVideoX of in-process extraction."""
    prior_steps: int = 2
    """DDIM inversion / denoising steps of in-process extraction (the paper: 5)."""
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """``enabled: true``: train through a DeepSpeed ZeRO engine (``vidalign_trainer.zero``)."""


# --------------------------------------------------------------------------------------------
# Data


def load_clip_priors(config: SFTConfig, data: ClipData) -> dict[str, PriorItem]:
    """Priors by clip id: from the priors set at ``priors`` or extracted in-process."""
    from vidalign.motionenhancer.io import load_priors_set

    out: dict[str, PriorItem] = {}
    if config.priors:
        priors_set = load_priors_set(config.priors)
        have = set(priors_set.ids)
        for clip_id in data.ids:
            if clip_id in have:  # a clip extraction skipped trains on CE alone
                priors, prompt = priors_set.get(clip_id)
                out[clip_id] = _item(priors, prompt)
        if not out:
            raise InvalidInput(f"priors {config.priors}: none of the data's clips has priors")
        if len(out) < len(data.ids):
            log.warning("sft_clips_without_priors", priors=config.priors, clips=len(data.ids),
                        without=len(data.ids) - len(out), first=next(i for i in data.ids if i not in out))
        return out
    if not data.in_memory:
        raise InvalidInput(
            f"priors: data.kind {config.data.kind} is read from files; extract its priors first "
            "(`vidalign priors extract`) and give that set as `priors`"
        )
    from vidalign.motionenhancer import extract_priors, load_cogvideox

    if config.prior_steps < 1:
        raise InvalidInput("prior_steps: expected an int >= 1")
    teacher = load_cogvideox(config.teacher, device=config.device)
    for record in data.records:
        priors = extract_priors(teacher, record.pixels, record.caption, steps=config.prior_steps)
        out[record.id] = _item(priors, record.caption)
    return out


def _item(priors, prompt: str) -> PriorItem:
    return PriorItem(
        tokens=list(priors.selected_tokens),
        prior=priors.prior,
        text=prompt,
        frames_used=int(priors.metadata.get("frames_used", 0) or 0),
    )


class MotionSFTData(Instructions):
    """Instruction examples with each clip's attention prior (None: CE only)."""

    def __init__(self, config: DataConfig) -> None:
        super().__init__(config)
        self.priors: dict[str, PriorItem] = {}

    def with_priors(self, batch: InstructionBatch) -> list[PriorItem | None]:
        return [self.priors.get(clip_id) for clip_id in batch.ids]


# --------------------------------------------------------------------------------------------
# Model pieces


def build_optimizer(
    llm: VideoLLM, aligner: AttentionAligner, config: TrainConfig
) -> tuple[torch.optim.AdamW, dict[str, int]]:
    """AdamW with one (decay, no-decay) pair of param groups per component (the family's)."""
    groups = llm.param_groups()
    groups["aligner"] = list(aligner.named_parameters())
    lrs = {
        "vision": config.lr_vision,
        "projector": config.lr_projector,
        "llm": config.lr_llm,
        "aligner": config.lr_aligner,
    }
    param_groups_: list[dict] = []
    counts = {}
    for key in GROUPS:
        params = groups[key]
        counts[key] = sum(p.numel() for _, p in params)
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        for ps, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
            if ps:
                param_groups_.append(
                    {"params": ps, "lr": lrs[key], "weight_decay": wd, "name": key}
                )
    return torch.optim.AdamW(param_groups_), counts


def cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SFTStep(torch.nn.Module):
    """The trainable modules (VLM, aligner) with ``CE + lambda * L_align`` as forward.

    What the ZeRO engine wraps: its forward is the engine's. Returns the loss and
    (detached) CE and L_align.
    """

    def __init__(
        self, llm: VideoLLM, aligner: AttentionAligner, grid: VisionGrid, weight: float,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model = llm.model
        self.aligner = aligner
        self.llm = llm  # not a Module: a plain attribute
        self.grid = grid
        self.weight = weight
        self.precision = precision

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(self.precision, self.llm.device):
            out = motion_sft_loss(self.llm, self.aligner, batch, self.grid, weight=self.weight)
        return out.loss.float(), out.ce.detach().float(), out.align.detach().float()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head / embed_tokens) are saved once each name; load_state_dict handles both.
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(
    llm: VideoLLM,
    aligner: AttentionAligner,
    data: MotionSFTData,
    grid: VisionGrid,
    batch_size: int,
    weight: float,
    limit: int = 0,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean CE and L_align over the training set's first ``limit`` examples (0: all), in
    order (eval mode).

    ``align_raw`` is L_align without the aligner (the VLM rows against the prior):
    how much of the alignment the VLM itself carries.
    """
    was = llm.model.training
    llm.model.eval()
    ce = al = raw = 0.0
    n = 0
    for examples in data.batches(batch_size, limit):
        batch = build_align_batch(llm, examples.video, examples.prompts, examples.targets,
                                  data.with_priors(examples), grid)
        with autocast(precision, llm.device):
            out = motion_sft_loss(llm, aligner, batch, grid, weight=weight)
        size = len(examples.ids)
        ce += float(out.ce) * size
        al += float(out.align) * size
        raw += float(align_loss(out.rows, batch.prior, batch.mask)) * size
        n += size
    llm.model.train(was)
    return {"ce": ce / n, "align": al / n, "align_raw": raw / n}


@dataclass
class SFTResult:
    losses: list[dict[str, float]]
    """Per step run by this call: ``loss``, ``ce``, ``align``."""
    eval_start: dict[str, float]
    """Mean CE / L_align over the training set before the first step of this call."""
    eval_end: dict[str, float]
    videollm: VideoLLM
    aligner: AttentionAligner
    param_counts: dict[str, int]


class SFT(Job):
    """The whole VLM and the aligner, CE + lambda * L_align (module docstring)."""

    name = "sft"
    digits = 8  # L_align is ~1e-3 and moves in the 6th decimal

    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        config = self.config
        self.ctx = ctx
        llm = self.llm = load_videollm(config.student, device=str(ctx.device), path=config.student_path(),
                                       dtype=precision_dtype(config.train.precision))
        self.grid = grid = vision_grid(llm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            self.aligner = aligner = AttentionAligner(grid.size, config.align.hidden).to(ctx.device)
        model = llm.model
        for name, p in model.named_parameters():
            if "image_tower" in name:  # Video-LLaVA's image tower never sees a video
                p.requires_grad_(False)
        keep_trainable_fp32(model)  # master weights; the frozen image tower keeps the half type
        if config.train.gradient_checkpointing:
            # L_align's capture hooks then stay in place through the backward pass, which
            # recomputes them with each layer (vidalign.motionenhancer.align).
            enable_gradient_checkpointing(model)
        if checkpoint is not None:
            saved = checkpoint.weights("model")
            if saved.keys() != trainable_state(model).keys():
                raise InvalidInput(f"checkpoint {checkpoint.name}: model weights do not match this config")
            model.load_state_dict(saved, strict=False)
            aligner.load_state_dict(checkpoint.weights("aligner"))
        optimizer, self.counts = build_optimizer(llm, aligner, config.train)
        scheduler = cosine_with_warmup(optimizer, config.train.steps, config.train.warmup_ratio)
        self.data = MotionSFTData(config.data)
        self.data.priors = load_clip_priors(config, self.data.data)
        self.skips = self.data.data.skip_log(ctx.run.store, ctx.ranks)
        return Built(SFTStep(llm, aligner, grid, config.align.weight, config.train.precision),
                     optimizer, scheduler, info={
            "student": config.student,
            "examples": len(self.data),
            "grid": (grid.frames, grid.height, grid.width),
            "params": self.counts,
        })

    def _evaluate(self) -> dict[str, float]:
        return evaluate(self.llm, self.aligner, self.data, self.grid, self.config.train.batch_size,
                        self.config.align.weight, self.config.train.eval_examples,
                        self.config.train.precision)

    def on_start(self, start: int) -> None:
        self.eval_start = self._evaluate()
        log.info("sft_eval", step=start, **self.eval_start)
        self.llm.model.train()
        train = self.config.train
        plan = [self.ctx.local(epoch_order(len(self.data), step, train.batch_size, train.seed),
                               train.batch_size) for step in range(start, train.steps)]
        self.batches = self.data.feed(plan, self.skips)

    def step(self, model, step: int) -> StepOutput:
        examples = next(self.batches)
        batch = build_align_batch(self.llm, examples.video, examples.prompts, examples.targets,
                                  self.data.with_priors(examples), self.grid)
        loss, ce, align = model(batch)
        return StepOutput(loss, metrics={"ce": ce, "align": align})

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"model": trainable_state(self.llm.model), "aligner": self.aligner.state_dict()}

    def close(self) -> None:
        if getattr(self, "batches", None) is not None:
            self.batches.close()
        if getattr(self, "llm", None) is not None:
            from vidalign.motionenhancer.align import release_capture

            release_capture(self.llm.model)

    def on_end(self) -> None:
        self.eval_end = self._evaluate()
        self.llm.model.eval()
        log.info("sft_eval", step=self.config.train.steps, **self.eval_end)

    def export(self, final: Checkpoint) -> None:
        config, grid = self.config, self.grid
        if not config.output.save_model:
            return
        meta = {
            "student": config.student,
            "grid": [grid.frames, grid.height, grid.width],
            "aligner_hidden": config.align.hidden,
            "eval_start": self.eval_start,
            "eval_end": self.eval_end,
        }
        with tempfile.TemporaryDirectory(prefix="vidalign-sft-") as tmp:
            self.llm.model.save_pretrained(tmp)
            self.llm.tokenizer.save_pretrained(tmp)
            save_file(
                {k: v.contiguous() for k, v in self.aligner.state_dict().items()},
                Path(tmp) / "aligner.safetensors",
            )
            files = {str(p.relative_to(tmp)): p for p in Path(tmp).rglob("*") if p.is_file()}
            commit_artifact(self.ctx.run.store, "model", files, producer=self.producer,
                            config_digest=self.ctx.config_digest, step=final.step, meta=meta)


def run_sft(config: SFTConfig, *, resume: bool = False) -> SFTResult:
    """MotionEnhancer SFT; returns the step losses, the train-set evaluations and the models."""
    job = SFT(config)
    result = fit(job, resume=resume)
    return SFTResult(
        losses=result.values,
        eval_start=job.eval_start,
        eval_end=job.eval_end,
        videollm=job.llm,
        aligner=job.aligner,
        param_counts={**job.counts, "aligner": sum(p.numel() for p in job.aligner.parameters())},
    )
