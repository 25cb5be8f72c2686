"""The training skeleton every trainer job plugs into.

A job (VDA stage 1, 2, 3, MotionEnhancer SFT, pretraining) owns what is its
own: how to build its model and data, one step, and what it exports. This
module owns everything else, once:

    ranks, device          torchrun's rendezvous (``common.init_distributed``)
    resume                 the newest committed checkpoint: the job's weights, then
                           optimizer, scheduler and RNG state; the step to go on from
    wrapping               DDP under several ranks, or a DeepSpeed ZeRO engine
                           (``deepspeed.enabled``), around the job's module
    the loop               backward, clipping, optimizer and scheduler step; the loss
                           and the job's metrics averaged over ranks; a non-finite loss
                           stops the run naming the step
    metrics and progress   one ``metrics.jsonl`` line and one ``<job>_step`` log event
                           per step (rank 0), a progress bar on a terminal; the same
                           numbers as TensorBoard scalars beside metrics.jsonl
                           (``vidalign_trainer.board``)
    checkpoints            every ``output.checkpoint_every`` steps and at the last one;
                           ``output.keep_latest_k`` kept
    export                 the job's artifacts from the final checkpoint (rank 0), then
                           the metrics and event files to the store

The split follows torchtitan's trainer and litgpt's ``setup/main/fit``:

    class Stage3(Job):
        name = "stage3"
        def build(self, ctx, checkpoint): ...   # model, data, optimizer -> Built
        def step(self, model, step): ...        # one batch -> StepOutput(loss, metrics)
        def weights(self): ...                  # what a checkpoint holds
        def export(self, final): ...            # the job's artifacts

    result = fit(Stage3(config), resume=True)

Every source of randomness in a job is a function of (seed, step) (batch order,
the teacher's draws), and the RNG state travels in the checkpoint, so a run
resumed at step k repeats what an uninterrupted run does after step k.
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.checkpoint import Checkpoint, Checkpointer, rng_state, set_rng_state
from vidalign.config import config_digest, to_dict
from vidalign.errors import FailedPrecondition, InvalidInput
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.papers import VDA_LR
from vidalign.precision import precision_name
from vidalign.run import METRICS, RunDir
from vidalign.store import latest_artifact
from vidalign_trainer.board import Board
from vidalign_trainer.common import Dist, global_mean, init_distributed
from vidalign_trainer.zero import ZeroEngine, initialize, require_plain_state

log = get_logger("vidalign.train")


# --- shared config sections ---------------------------------------------------------


@dataclass(kw_only=True)
class LoopConfig:
    """The ``train`` keys every job shares; a job extends it with its own."""

    steps: int = 40
    """Optimizer steps of the whole run (a resumed run goes on to this step)."""
    batch_size: int = 2
    """Examples per step over all ranks; each rank takes ``batch_size / world_size``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Batch order (and the job's draws): a run is a function of its seed."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (vidalign.precision): frozen weights stored in the half type,
    trainable ones kept float32, forward passes under autocast; fp16 scales the loss."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in the backward pass instead of keeping them (the
    student's vision tower and LLM; stage 1: the teacher's UNet): less memory, about a
    third more compute, the same numbers."""

    def __post_init__(self) -> None:
        self.precision = precision_name(self.precision, "train.precision")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"train.steps and train.batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.grad_clip and train.weight_decay must be >= 0")


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """The ``train`` section of a job with one learning rate."""

    lr: float = VDA_LR
    """AdamW learning rate (VDA trains every stage at 1e-5)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class OutputConfig:
    """The ``output`` section every job shares."""

    dir: str = "runs/train"
    """Store URI of the run (a local directory or ``s3://bucket/prefix``): checkpoints/,
    the job's artifacts, metrics.jsonl."""
    checkpoint_every: int = 20
    """Commit a checkpoint every N steps (and always after the last one)."""
    keep_latest_k: int = 3
    """Checkpoints kept; older ones are pruned after each commit."""
    log_every: int = 1
    """Log a ``<job>_step`` event every N steps (and the last); metrics.jsonl gets every step."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_latest_k < 1 or self.log_every < 1:
            raise ValueError(
                "output.checkpoint_every, output.keep_latest_k and output.log_every must be >= 1"
            )


@dataclass(kw_only=True)
class StudentSection:
    """The student fields of a job that loads a VideoLLM (top-level keys)."""

    student: str = "tiny-videollava"
    """Student VideoLLM (``vidalign models list``)."""
    student_weights: str = ""
    """Store URI (or dir) where ``vidalign models pull`` staged the student; empty: the
    registry's source."""

    def student_path(self) -> str | None:
        """The staged model directory, or None for the registry's own source."""
        return weights_component(self.student_weights, "model") if self.student_weights else None


@dataclass(kw_only=True)
class TeacherSection:
    """The ``teacher`` keys of the VDA jobs: which diffusion model, at how many frames."""

    model: str = "tiny-animatediff"
    """Diffusion model (``vidalign models list``, or a pipeline dir); a remote teacher's is
    checked against it."""
    frames: int = 0
    """Frames fed to the diffusion model (VDA: 24); 0: the model's own (what its registry
    entry, or the server, says)."""

    def __post_init__(self) -> None:
        if self.frames < 0:
            raise ValueError(f"teacher.frames must be >= 0, got {self.frames}")


# --- what a job supplies -------------------------------------------------------------


@dataclass
class Context:
    """What the skeleton hands a job when it builds."""

    ranks: Dist
    device: torch.device
    run: RunDir
    config_digest: str

    @property
    def main(self) -> bool:
        return self.ranks.main

    def local(self, items: list[Any], batch_size: int) -> list[Any]:
        """This rank's slice of a global batch of ``batch_size`` items."""
        per_rank = batch_size // self.ranks.world_size
        return items[self.ranks.rank * per_rank : (self.ranks.rank + 1) * per_rank]


@dataclass
class Built:
    """A job's trainable module, its optimizer (and schedule), and what to log at start."""

    module: torch.nn.Module
    """Holds every trainable parameter; what DDP or the ZeRO engine wraps. ``Job.step``
    must run its forward through the wrapper it is handed."""
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    """An LR scheduler stepped once per optimizer step (checkpointed), or None."""
    info: dict[str, Any] = field(default_factory=dict)
    """Fields of the ``<job>_start`` log event."""
    scaler: Any = None
    """fp16 without DeepSpeed: the ``torch.amp.GradScaler`` the skeleton scales the loss with
    (set by ``fit``; checkpointed with the optimizer)."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    """This rank's mean loss over its slice: what backward runs on."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Further per-step means (averaged over ranks like the loss), e.g. ``ce``, ``align``."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in named parts of the step (this rank's), e.g. ``teacher_s``."""


class Job(ABC):
    """One trainer job: build, step, checkpointed weights, export (module docstring)."""

    name: str
    """The job's name in log events (``<name>_step``), progress and producers."""
    find_unused_parameters: ClassVar[bool] = False
    """DDP: whether some trainable parameters may get no gradient in a step."""
    digits: ClassVar[int] = 6
    """Decimals of the loss and metrics in a step's record."""
    distributed: ClassVar[bool] = True
    """Whether the job runs data-parallel under several ranks (else it refuses them)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def producer(self) -> str:
        return f"vidalign train {self.name}"

    @abstractmethod
    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        """Model, data and optimizer; the job's own weights from ``checkpoint`` if resuming."""

    @abstractmethod
    def step(self, model: Any, step: int) -> StepOutput:
        """Forward one batch (step ``step``, 0-based) through ``model`` (the wrapped module)."""

    @abstractmethod
    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trainable weights a checkpoint holds: ``{file stem: state dict}``."""

    def on_start(self, start: int) -> None:
        """Before the first step this call runs (every rank)."""
        return None

    def after_step(self, step: int, last: bool) -> dict[str, float]:
        """After step ``step`` (1-based), every rank: extra fields of its metrics record."""
        return {}

    def on_end(self) -> None:
        """After the last step, before the export (every rank)."""
        return None

    def checkpoint_meta(self) -> dict[str, Any]:
        """Extra manifest meta of each checkpoint."""
        return {}

    def export(self, final: Checkpoint) -> None:
        """Rank 0, after the last step: commit the job's artifacts."""
        return None

    def close(self) -> None:
        """Always runs: release what ``build`` took (a teacher connection, a LoRA)."""
        return None


@dataclass
class FitResult:
    records: list[dict[str, Any]]
    """The metrics record of each step this call ran (as written to metrics.jsonl)."""
    values: list[dict[str, float]]
    """Each step's ``loss`` and the job's metrics, means over ranks, unrounded."""
    start: int
    """The step this call started from (0, or the resumed checkpoint's)."""

    @property
    def losses(self) -> list[float]:
        return [v["loss"] for v in self.values]


# --- the skeleton --------------------------------------------------------------------


def rank_device(device: str, ranks: Dist) -> torch.device:
    """``cuda`` means ``cuda:LOCAL_RANK`` under several ranks."""
    if device == "cuda" and ranks.world_size > 1:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(device)


def _lr(param_groups: Iterable[dict[str, Any]]) -> float | dict[str, float]:
    groups = list(param_groups)
    if all("name" in g for g in groups):
        return {g["name"]: g["lr"] for g in groups}
    return groups[0]["lr"]


def _wrap(job: Job, built: Built, ctx: Context, micro_batch_size: int) -> tuple[Any, ZeroEngine | None]:
    deepspeed = getattr(job.config, "deepspeed", None)
    if deepspeed is not None and deepspeed.enabled:
        zero = initialize(
            built.module,
            built.optimizer,
            built.scheduler,
            config=deepspeed,
            ranks=ctx.ranks,
            device=ctx.device,
            micro_batch_size=micro_batch_size,
            grad_clip=job.config.train.grad_clip,
            precision=job.config.train.precision,
        )
        return zero, zero
    if ctx.ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The replicas start equal (same seeds, same checkpoint); DDP also broadcasts rank 0's.
        return DistributedDataParallel(
            built.module,
            device_ids=[ctx.ranks.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=job.find_unused_parameters,
        ), None
    return built.module, None


def _restore(built: Built, zero: ZeroEngine | None, checkpoint: Checkpoint) -> None:
    optimizer_state = checkpoint.state("optimizer")
    if zero is not None:
        zero.load_optimizer_state(optimizer_state, checkpoint.name)
    else:
        built.optimizer.load_state_dict(require_plain_state(optimizer_state, checkpoint.name))
    if built.scheduler is not None:
        built.scheduler.load_state_dict(checkpoint.state("scheduler"))
    if built.scaler is not None:
        built.scaler.load_state_dict(checkpoint.state("scaler"))
    set_rng_state(checkpoint.state("rng"))


def fit(job: Job, *, resume: bool = False) -> FitResult:
    """Run ``job`` to ``train.steps`` (from the newest checkpoint with ``resume``)."""
    config = job.config
    train, output = config.train, config.output
    deepspeed = getattr(config, "deepspeed", None)
    if deepspeed is not None:
        deepspeed.check()
    if not job.distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise InvalidInput(f"{job.name} runs in one process; it was started with {world} ranks")
    ranks = init_distributed(config.device) if job.distributed else Dist()
    if train.batch_size % ranks.world_size:
        raise InvalidInput(
            f"train.batch_size ({train.batch_size}) must be divisible by the {ranks.world_size} ranks"
        )
    run = RunDir(output.dir)
    checkpointer = run.checkpointer(output.keep_latest_k)
    if not ranks.main:  # ranks on one node must not fetch into the same cache directory
        checkpointer.cache_dir = run.work / f".checkpoint-cache-rank{ranks.rank}"
    ctx = Context(ranks, rank_device(config.device, ranks), run, config_digest(config))
    checkpoint = checkpointer.latest() if resume else None
    if not resume and (earlier := latest_artifact(checkpointer.store, "")) is not None:
        # A fresh run among an earlier run's checkpoints would interleave the two (pruning
        # keeps the highest steps, whichever run wrote them) and a later --resume would
        # continue the wrong one: refuse, and lose nothing.
        raise FailedPrecondition(
            f"{checkpointer.store.uri} already holds checkpoints of an earlier run (newest: "
            f"{earlier}); pass --resume to continue it, or give another output.dir"
        )
    if checkpoint is not None and checkpoint.config_digest != ctx.config_digest:
        log.warning("resume_config_changed", checkpoint=checkpoint.name,
                    detail="the config differs from the one that wrote the checkpoint")
    zero: ZeroEngine | None = None
    board: Board | None = None
    try:
        built = job.build(ctx, checkpoint)
        model, zero = _wrap(job, built, ctx, train.batch_size // ranks.world_size)
        if train.precision == "fp16" and zero is None:
            built.scaler = torch.amp.GradScaler(ctx.device.type)
        start = 0
        if checkpoint is not None:
            _restore(built, zero, checkpoint)
            start = checkpoint.step
            log.info("resumed", step=start, checkpoint=f"{checkpointer.store.uri}/{checkpoint.name}")
        if ranks.main:
            run.start_metrics(checkpoint)
            board = Board(run, start)
        trainable = [p for g in built.optimizer.param_groups for p in g["params"]]
        log.info(
            f"{job.name}_start",
            **built.info,
            trainable_params=sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3: a slice here
                                 for p in built.module.parameters() if p.requires_grad),
            world_size=ranks.world_size,
            zero_stage=deepspeed.zero_stage if zero is not None else None,
            start_step=start,
            steps=train.steps,
            output=run.store.uri,
        )
        job.on_start(start)
        result = _loop(job, ctx, checkpointer, built, model, zero, trainable, start, board)
        if zero is not None:
            zero.consolidate_module()  # ZeRO-3: whole parameters for on_end, export, the caller
        job.on_end()
        if ranks.world_size > 1:
            dist.barrier()
        if ranks.main:
            final = checkpointer.latest()
            assert final is not None and final.step == train.steps, final
            job.export(final)
            run.publish_metrics()
            if board is not None:
                board.publish()
        if ranks.world_size > 1:
            dist.barrier()  # the artifacts exist for every rank that returns
        log.info(
            f"{job.name}_done",
            steps=train.steps,
            final_loss=result.losses[-1] if result.losses else None,
            output=run.store.uri,
        )
        return result
    finally:
        if board is not None:
            board.close()
        if zero is not None:
            zero.close()
        job.close()


def _loop(
    job: Job,
    ctx: Context,
    checkpointer: Checkpointer,
    built: Built,
    model: Any,
    zero: ZeroEngine | None,
    trainable: list[torch.nn.Parameter],
    start: int,
    board: Board | None,
) -> FitResult:
    config = job.config
    train, output = config.train, config.output
    ranks = ctx.ranks
    records: list[dict[str, Any]] = []
    values: list[dict[str, float]] = []
    with logging_redirect_tqdm(), tqdm(
        total=train.steps,
        initial=start,
        desc=job.name,
        unit="step",
        dynamic_ncols=True,
        disable=None if ranks.main else True,  # none off a terminal (CI, logs) or off rank 0
    ) as bar:
        for step in range(start, train.steps):
            tic = time.perf_counter()
            out = job.step(model, step)
            value = global_mean(out.loss.detach(), ranks)
            if not math.isfinite(value):  # before any weight moves
                raise FloatingPointError(f"{job.name}: the loss is {value} at step {step + 1}")
            if zero is not None:
                zero.backward(out.loss)
                grad_norm = zero.step()  # DeepSpeed clips, steps the optimizer and schedule
                param_groups = zero.param_groups
            else:
                scaler = built.scaler  # fp16: the loss scaled so small gradients do not flush to 0
                (out.loss if scaler is None else scaler.scale(out.loss)).backward()  # DDP averages here
                if scaler is not None:
                    scaler.unscale_(built.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    trainable, train.grad_clip if train.grad_clip > 0 else math.inf
                )
                if scaler is None:
                    built.optimizer.step()
                else:  # skips the step when a gradient overflowed, then adapts the scale
                    scaler.step(built.optimizer)
                    scaler.update()
                if built.scheduler is not None:
                    built.scheduler.step()
                built.optimizer.zero_grad(set_to_none=True)
                param_groups = built.optimizer.param_groups
            metrics = {
                k: global_mean(torch.as_tensor(v).detach().float(), ranks) for k, v in out.metrics.items()
            }
            values.append({"loss": value, **metrics})
            last = step + 1 == train.steps
            step_s = time.perf_counter() - tic
            record: dict[str, Any] = {
                "step": step + 1,
                "loss": round(value, job.digits),
                **{k: round(v, job.digits) for k, v in metrics.items()},
                "grad_norm": round(float(grad_norm), 6),
                "lr": _lr(param_groups),
                "step_s": round(step_s, 4),
                "samples_per_s": round(train.batch_size / step_s, 3) if step_s > 0 else None,
                **{k: round(v, 4) for k, v in out.timings.items()},
            }
            if ctx.device.type == "cuda":  # this rank's peak so far
                record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 1e9, 3)
            record.update(job.after_step(step + 1, last))
            records.append(record)
            if ranks.main:
                ctx.run.log_metrics(record)
                if board is not None:
                    board.log(record)
                if (step + 1) % output.log_every == 0 or last:
                    log.info(f"{job.name}_step", **record)
            bar.set_postfix(loss=f"{value:.4f}", **{k: f"{v:.4g}" for k, v in metrics.items()})
            bar.update(1)
            save = (step + 1) % output.checkpoint_every == 0 or last
            # Under ZeRO each rank holds a partition of the optimizer state: gathered here; at
            # stage 3 of the parameters too: every rank gathers, rank 0 keeps a whole copy.
            zero_state = zero.optimizer_state() if zero is not None and save else None
            weights = zero.consolidated(job.weights) if zero is not None and save else None
            if ranks.main and save:
                state = {
                    "optimizer": built.optimizer.state_dict() if zero is None else zero_state,
                    "rng": rng_state(),
                }
                if built.scheduler is not None:
                    state["scheduler"] = built.scheduler.state_dict()
                if built.scaler is not None:
                    state["scaler"] = built.scaler.state_dict()
                checkpointer.save(
                    step + 1,
                    weights=job.weights() if zero is None else weights,
                    state=state,
                    trainer_state={"samples_seen": (step + 1) * train.batch_size, "data_seed": train.seed},
                    producer=job.producer,
                    config_digest=ctx.config_digest,
                    meta={"config": to_dict(config), **job.checkpoint_meta()},
                    extra_files={METRICS: ctx.run.metrics_path},
                )
                if board is not None:
                    board.publish()
    return FitResult(records=records, values=values, start=start)
