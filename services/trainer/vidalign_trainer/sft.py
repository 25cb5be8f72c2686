"""MotionEnhancer SFT: CE + lambda * L_align, the whole VLM trainable (REFERENCE section 1).

    priors  <- CogVideoX text-to-vision attention after MHS/MTTI (one file per clip)
    A_vlm   = text-to-vision attention of the VLM, mean over heads and layers, rows of the
              tokens covering each selected word (vidalign.motion.align, forward hooks)
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
(``vidalign.motion.io.load_priors_set``), or, with ``priors: ""``, are
extracted in-process with ``teacher`` (tests and the CPU demo).

Output: checkpoints (trainable weights, aligner, optimizer, scheduler, RNG)
under ``<out>/checkpoints``; resume repeats an uninterrupted run; the final
model as the store artifact ``<out>/model`` (``save_pretrained`` + tokenizer
+ ``aligner.safetensors``); mean CE / L_align over the training set before
and after training in ``<out>/model``'s manifest meta and the result.

By default one process trains with plain torch AdamW (a ``WORLD_SIZE`` from a
launcher is ignored). With ``deepspeed.enabled: true`` the VLM and the aligner
are wrapped, with this AdamW (its parameter groups and their learning rates)
and the warmup-cosine schedule, in a DeepSpeed ZeRO-1/2 engine
(``vidalign_trainer.zero``; DeepSpeed clips to ``train.grad_clip`` and steps the
schedule), with plain ``python`` (one rank; the losses equal the plain run's,
tested to 1e-5 relative), ``torchrun`` or the ``deepspeed`` launcher. Under N
ranks each rank trains on its 1/N slice of every batch (``train.batch_size``
must divide by N) and the gradients (and the logged losses) are averaged over
the ranks; CE and L_align are means within each rank's slice (over its reply
tokens, its aligned rows), so this equals one process on the whole batch only
where the slices hold as many of them. Rank 0 logs, checkpoints and commits; checkpoints then hold every rank's ZeRO optimizer state, so a resume
needs the same ``deepspeed`` settings and number of ranks (refused otherwise).

Run: ``vidalign train sft --config configs/sft-tiny.yaml [--resume]``
(or ``python -m vidalign_trainer.sft`` with the same arguments).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.checkpoint import rng_state, set_rng_state
from vidalign.config import config_digest, to_dict
from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.motion.align import (
    AttentionAligner,
    PriorItem,
    VisionGrid,
    align_loss,
    build_align_batch,
    motion_sft_loss,
    vision_grid,
)
from vidalign.run import METRICS, RunDir
from vidalign.store import commit_artifact
from vidalign.students.videollm import VideoLLM, load_videollm
from vidalign_trainer.common import DataConfig as ClipDataConfig
from vidalign_trainer.common import Dist, epoch_order, global_mean, init_distributed
from vidalign_trainer.zero import DeepSpeedConfig, ZeroEngine, initialize, require_plain_state

log = get_logger("vidalign.sft")

TASKS = ("caption", "qa")
CAPTION_PROMPT = "Describe the video."
QA_PROMPT = "Which direction does the square move?"
GROUPS = ("vision", "projector", "llm", "aligner")


@dataclass(kw_only=True)
class DataConfig(ClipDataConfig):
    num_clips: int = 4
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    """``caption`` (aligned: the caption is the teacher's prompt) and/or ``qa`` (CE only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise ValueError(
                f"data.tasks: expected a non-empty subset of {list(TASKS)}, got {self.tasks}"
            )


@dataclass(kw_only=True)
class AlignConfig:
    weight: float = 1.0
    """lambda of CE + lambda * L_align (the paper: 1)."""
    hidden: int = 64
    """Aligner MLP hidden width; its size is 2 N h + h^2 + 2 h + N for N grid cells."""

    def __post_init__(self) -> None:
        if self.weight < 0 or self.hidden < 1:
            raise ValueError("align.weight must be >= 0 and align.hidden >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 30
    batch_size: int = 2
    lr_vision: float = 2e-6
    lr_projector: float = 1e-5
    lr_llm: float = 1e-5
    lr_aligner: float = 1e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")
        lrs = (self.lr_vision, self.lr_projector, self.lr_llm, self.lr_aligner)
        if min(lrs) < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("train.lr_* must be >= 0 and 0 <= train.warmup_ratio < 1")


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/sft"
    checkpoint_every: int = 10
    keep_latest_k: int = 2
    save_model: bool = True
    """Commit ``<dir>/model`` (the whole fine-tuned VLM + aligner)."""


@dataclass(kw_only=True)
class SFTConfig:
    student: str = "tiny-videollava"
    student_weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the student; empty: the registry's source."""
    device: str = "cpu"
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


def load_clip_priors(config: SFTConfig, clips: list) -> dict[str, PriorItem]:
    """Priors by clip id: from the priors set at ``priors`` or extracted in-process."""
    from vidalign.motion.io import load_priors_set

    out: dict[str, PriorItem] = {}
    if config.priors:
        priors_set = load_priors_set(config.priors)
        for clip in clips:
            priors, prompt = priors_set.get(clip.clip_id)
            out[clip.clip_id] = _item(priors, prompt)
        return out
    from vidalign.motion import extract_priors, load_cogvideox

    if config.prior_steps < 1:
        raise InvalidInput("prior_steps: expected an int >= 1")
    teacher = load_cogvideox(config.teacher, device=config.device)
    for clip in clips:
        priors = extract_priors(teacher, clip.video, clip.caption, steps=config.prior_steps)
        out[clip.clip_id] = _item(priors, clip.caption)
    return out


def _item(priors, prompt: str) -> PriorItem:
    return PriorItem(
        tokens=list(priors.selected_tokens),
        prior=priors.prior,
        text=prompt,
        frames_used=int(priors.metadata.get("frames_used", 0) or 0),
    )


@dataclass
class SFTClip:
    clip_id: str
    video: np.ndarray
    """uint8 (F, H, W, 3)."""
    caption: str
    qa: list[tuple[str, str]]
    """(prompt, target) pairs."""


def sft_clips(config: DataConfig) -> list[SFTClip]:
    """The clips of the ``data`` section with their caption and QA examples."""
    if config.kind == "synth":
        from vidalign.data.synthset import load_synth_set

        # The evaluation's own prompts (MotionBench's) and answer letters.
        synth = load_synth_set(config.path, num_clips=config.num_clips, frames=config.frames,
                               size=config.size)
        qa: list[list[tuple[str, str]]] = [[] for _ in synth.ids]
        for q in synth.qa:
            qa[q.clip].append((q.prompt, q.target))
        return [
            SFTClip(clip_id, synth.videos[i].numpy(), synth.captions[i], qa[i])
            for i, clip_id in enumerate(synth.ids)
        ]
    return [
        SFTClip(c.clip_id, c.video, c.caption, [(QA_PROMPT, c.direction)])
        for c in moving_squares(config.num_clips, frames=config.frames, size=config.size, seed=config.seed)
    ]


class ToyMotionSFT:
    """(clip, prompt, target, prior) examples; the batch of step s depends on (seed, s) only."""

    def __init__(self, config: DataConfig, priors: dict[str, PriorItem] | None = None) -> None:
        self.clips = sft_clips(config)
        self.videos = torch.stack([torch.from_numpy(c.video) for c in self.clips])
        self.priors = priors or {}
        self.examples: list[tuple[int, str, str]] = []
        for i, clip in enumerate(self.clips):
            if "caption" in config.tasks:
                self.examples.append((i, CAPTION_PROMPT, clip.caption))
            if "qa" in config.tasks:
                self.examples.extend((i, prompt, target) for prompt, target in clip.qa)

    def __len__(self) -> int:
        return len(self.examples)

    def take(
        self, picks: list[int]
    ) -> tuple[torch.Tensor, list[str], list[str], list[PriorItem | None]]:
        rows = [self.examples[i] for i in picks]
        return (
            self.videos[[r[0] for r in rows]],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [self.priors.get(self.clips[r[0]].clip_id) for r in rows],
        )

    def picks(self, step: int, batch_size: int, seed: int) -> list[int]:
        return epoch_order(len(self), step, batch_size, seed)


# --------------------------------------------------------------------------------------------
# Model pieces


def param_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters by group: vision tower, projector / merger, LLM (by module name)."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {
        "vision": [],
        "projector": [],
        "llm": [],
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "merger" in name or "multi_modal_projector" in name:
            groups["projector"].append((name, p))
        elif any(k in name for k in ("visual", "video_tower", "vision_tower", "image_tower")):
            groups["vision"].append((name, p))
        else:
            groups["llm"].append((name, p))
    return groups


def build_optimizer(
    model: torch.nn.Module, aligner: AttentionAligner, config: TrainConfig
) -> tuple[torch.optim.AdamW, dict[str, int]]:
    """AdamW with one (decay, no-decay) pair of param groups per component."""
    groups = param_groups(model)
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
        self, llm: VideoLLM, aligner: AttentionAligner, grid: VisionGrid, weight: float
    ) -> None:
        super().__init__()
        self.model = llm.model
        self.aligner = aligner
        self.llm = llm  # not a Module: a plain attribute
        self.grid = grid
        self.weight = weight

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = motion_sft_loss(self.llm, self.aligner, batch, self.grid, weight=self.weight)
        return out.loss, out.ce.detach(), out.align.detach()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head / embed_tokens) are saved once each name; load_state_dict handles both.
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(
    llm: VideoLLM,
    aligner: AttentionAligner,
    data: ToyMotionSFT,
    grid: VisionGrid,
    batch_size: int,
    weight: float,
) -> dict[str, float]:
    """Mean CE and L_align over the whole training set, in order (eval mode).

    ``align_raw`` is L_align without the aligner (the VLM rows against the prior):
    how much of the alignment the VLM itself carries.
    """
    was = llm.model.training
    llm.model.eval()
    ce = al = raw = 0.0
    n = 0
    for start in range(0, len(data), batch_size):
        picks = list(range(start, min(start + batch_size, len(data))))
        videos, prompts, targets, priors = data.take(picks)
        batch = build_align_batch(llm, videos, prompts, targets, priors, grid)
        out = motion_sft_loss(llm, aligner, batch, grid, weight=weight)
        ce += float(out.ce) * len(picks)
        al += float(out.align) * len(picks)
        raw += float(align_loss(out.rows, batch.prior, batch.mask)) * len(picks)
        n += len(picks)
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


def run_sft(config: SFTConfig, *, resume: bool = False) -> SFTResult:
    """MotionEnhancer SFT; returns the step losses, the train-set evaluations and the models."""
    config.deepspeed.check()
    run = RunDir(config.output.dir)
    bs, weight = config.train.batch_size, config.align.weight
    # Ranks only under DeepSpeed; without it SFT is one process whatever the launcher.
    ranks = init_distributed(config.device) if config.deepspeed.enabled else Dist()
    if bs % ranks.world_size:
        raise InvalidInput(
            f"train.batch_size ({bs}) must be divisible by the {ranks.world_size} ranks"
        )
    device = config.device
    if device.startswith("cuda") and ranks.world_size > 1:
        device = f"cuda:{ranks.local_rank}"
    weights = weights_component(config.student_weights, "model") if config.student_weights else None
    llm = load_videollm(config.student, device=device, path=weights)
    grid = vision_grid(llm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        aligner = AttentionAligner(grid.size, config.align.hidden).to(device)
    model = llm.model
    for name, p in model.named_parameters():
        if "image_tower" in name:  # Video-LLaVA's image tower never sees a video
            p.requires_grad_(False)
    optimizer, counts = build_optimizer(model, aligner, config.train)
    scheduler = cosine_with_warmup(optimizer, config.train.steps, config.train.warmup_ratio)
    zero: ZeroEngine | None = None
    if config.deepspeed.enabled:
        zero = initialize(
            SFTStep(llm, aligner, grid, weight),
            optimizer,
            scheduler,
            config=config.deepspeed,
            ranks=ranks,
            device=torch.device(device),
            micro_batch_size=bs // ranks.world_size,
            grad_clip=config.train.grad_clip,
        )
    try:
        return _train(config, run, llm, grid, aligner, optimizer, scheduler, counts, zero, ranks, resume)
    finally:
        if zero is not None:
            zero.close()


def _train(
    config: SFTConfig,
    run: RunDir,
    llm: VideoLLM,
    grid: VisionGrid,
    aligner: AttentionAligner,
    optimizer: torch.optim.Optimizer,
    scheduler,
    counts: dict[str, int],
    zero: ZeroEngine | None,
    ranks: Dist,
    resume: bool,
) -> SFTResult:
    model = llm.model
    bs, weight = config.train.batch_size, config.align.weight
    rank, world = ranks.rank, ranks.world_size
    checkpointer = run.checkpointer(config.output.keep_latest_k)
    digest = config_digest(config)
    start = 0
    ckpt = checkpointer.latest() if resume else None
    if ckpt is not None:
        if ckpt.meta.get("config_digest") != digest:
            log.warning("resume_config_changed", checkpoint=ckpt.name)
        saved = ckpt.weights("model")
        expected = trainable_state(model).keys()
        if saved.keys() != expected:
            raise InvalidInput(f"checkpoint {ckpt.name}: model weights do not match this config")
        model.load_state_dict(saved, strict=False)
        aligner.load_state_dict(ckpt.weights("aligner"))
        if zero is not None:
            zero.load_optimizer_state(ckpt.state("optimizer"), ckpt.name)
        else:
            optimizer.load_state_dict(require_plain_state(ckpt.state("optimizer"), ckpt.name))
        scheduler.load_state_dict(ckpt.state("scheduler"))
        set_rng_state(ckpt.state("rng"))
        start = ckpt.trainer_state()["step"]
        log.info("resumed", step=start, checkpoint=f"{checkpointer.store.uri}/{ckpt.name}")
    if rank == 0:
        run.start_metrics(ckpt)

    data = ToyMotionSFT(config.data)
    data.priors = load_clip_priors(config, data.clips)
    eval_start = evaluate(llm, aligner, data, grid, bs, weight)
    log.info(
        "sft_start",
        rank=rank,
        world_size=world,
        zero_stage=config.deepspeed.zero_stage if zero is not None else None,
        student=config.student,
        examples=len(data),
        grid=(grid.frames, grid.height, grid.width),
        params=counts,
        start_step=start,
        steps=config.train.steps,
        eval=eval_start,
        output=run.store.uri,
    )
    model.train()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[dict[str, float]] = []
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=config.train.steps,
            initial=start,
            desc="sft",
            unit="step",
            dynamic_ncols=True,
            disable=None if rank == 0 else True,
        ) as bar,
    ):
        for step in range(start, config.train.steps):
            tic = time.perf_counter()
            picks = data.picks(step, bs, config.train.seed)
            per_rank = bs // world
            videos, prompts, targets, priors = data.take(picks[rank * per_rank : (rank + 1) * per_rank])
            batch = build_align_batch(llm, videos, prompts, targets, priors, grid)
            if zero is not None:
                loss, ce, align = zero(batch)
                zero.backward(loss)
                grad_norm = zero.step()  # DeepSpeed clips, steps AdamW and the schedule
                param_groups = zero.param_groups
            else:
                out = motion_sft_loss(llm, aligner, batch, grid, weight=weight)
                loss, ce, align = out.loss, out.ce, out.align
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    trainable, config.train.grad_clip if config.train.grad_clip > 0 else math.inf
                )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                param_groups = optimizer.param_groups
            if world > 1:  # each rank holds the means over its slice
                value, ce_value, align_value = (
                    global_mean(t.detach(), ranks) for t in (loss, ce, align)
                )
            else:
                value, ce_value, align_value = (float(t.detach()) for t in (loss, ce, align))
            if not math.isfinite(value):
                raise FloatingPointError(f"SFT loss is {value} at step {step + 1}")
            rec = {"loss": value, "ce": ce_value, "align": align_value}
            losses.append(rec)
            record = {
                "step": step + 1,
                **{k: round(v, 8) for k, v in rec.items()},
                "grad_norm": round(float(grad_norm), 6),
                "lr": {g["name"]: g["lr"] for g in param_groups},
                "step_s": round(time.perf_counter() - tic, 4),
            }
            if rank == 0:
                run.log_metrics(record)
                log.info("sft_step", **record)
            bar.set_postfix(ce=f"{rec['ce']:.3f}", align=f"{rec['align']:.5f}")
            bar.update(1)
            save = (step + 1) % config.output.checkpoint_every == 0 or step + 1 == config.train.steps
            # Under ZeRO each rank holds a partition of the optimizer state: gathered here.
            zero_state = zero.optimizer_state() if zero is not None and save else None
            if rank == 0 and save:
                checkpointer.save(
                    step + 1,
                    weights={"model": trainable_state(model), "aligner": aligner.state_dict()},
                    state={
                        "optimizer": optimizer.state_dict() if zero is None else zero_state,
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                    },
                    trainer_state={"samples_seen": (step + 1) * bs, "data_seed": config.train.seed},
                    producer="vidalign train sft",
                    config_digest=digest,
                    meta={"config": to_dict(config)},
                    extra_files={METRICS: run.metrics_path},
                )
    eval_end = evaluate(llm, aligner, data, grid, bs, weight)
    model.eval()
    meta = {
        "student": config.student,
        "grid": [grid.frames, grid.height, grid.width],
        "aligner_hidden": config.align.hidden,
        "eval_start": eval_start,
        "eval_end": eval_end,
    }
    if rank == 0 and config.output.save_model:
        with tempfile.TemporaryDirectory(prefix="vidalign-sft-") as tmp:
            model.save_pretrained(tmp)
            llm.tokenizer.save_pretrained(tmp)
            save_file(
                {k: v.contiguous() for k, v in aligner.state_dict().items()},
                Path(tmp) / "aligner.safetensors",
            )
            files = {str(p.relative_to(tmp)): p for p in Path(tmp).rglob("*") if p.is_file()}
            commit_artifact(
                run.store,
                "model",
                files,
                producer="vidalign train sft",
                config_digest=digest,
                step=config.train.steps,
                meta=meta,
            )
    if rank == 0:
        run.publish_metrics()
    log.info("sft_done", steps=config.train.steps, eval=eval_end, model=f"{run.store.uri}/model")
    return SFTResult(
        losses=losses,
        eval_start=eval_start,
        eval_end=eval_end,
        videollm=llm,
        aligner=aligner,
        param_counts={**counts, "aligner": sum(p.numel() for p in aligner.parameters())},
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m vidalign_trainer.sft --config FILE [--set k=v] [--resume]``."""
    import argparse

    from vidalign.config import load_config

    parser = argparse.ArgumentParser(prog="vidalign train sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    run_sft(load_config(SFTConfig, args.config, args.set), resume=args.resume)


if __name__ == "__main__":
    main()
