"""VDA stage 2: train the student's video encoder through the teacher's denoising loss.

    F_V = E_phi(V)                                    (student, this process)
    L   = || eps - eps_theta(z_t, t, [c_text; W_proj(F_V)]) ||^2    (teacher, eq. 4)
    phi <- AdamW(phi, dL/dphi)                         (dL/dF_V comes back from the teacher)

The teacher, W_proj and its LoRA are frozen; only the encoder learns. The
teacher may be in this process (``address: local``) or a gRPC service; the
loop is the same because the loss is an ordinary differentiable module.

Every source of randomness is a function of (config seed, step): batch order
and the teacher's timesteps and noise. A run resumed from a checkpoint at step
k therefore repeats exactly what an uninterrupted run does after step k.

Data parallel: under ``torchrun`` each rank trains on its slice of the global
batch and talks to the teacher itself; by default DDP averages the gradients.
With ``deepspeed.enabled: true`` the encoder and the AdamW above are wrapped in
a DeepSpeed ZeRO-1/2 engine instead (``vidalign_trainer.zero``: optimizer
state, and at stage 2 gradients, partitioned over the ranks; DeepSpeed clips
to ``train.grad_clip``), with plain ``python`` (one rank), ``torchrun`` or the
``deepspeed`` launcher. The losses equal the plain run's (tested to 1e-5
relative). Under ZeRO, as under DDP, the encoder runs once per step on the
rank's whole slice; ``train.micro_batches`` still splits the teacher calls.
Checkpoints then hold every rank's ZeRO optimizer state, so a resume needs the
same ``deepspeed`` settings and number of ranks (refused otherwise).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.checkpoint import rng_state, set_rng_state
from vidalign.client import RemoteDenoisingLoss, Teacher, connect
from vidalign.config import config_digest, to_dict
from vidalign.diffusion.adapter import file_digest
from vidalign.errors import InvalidInput
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.run import METRICS, RunDir
from vidalign.store import commit_artifact, materialize
from vidalign.students import load_student
from vidalign.video import sample_frames
from vidalign_trainer.common import (
    DataConfig,
    global_mean,
    init_distributed,
    open_dataset,
    step_seed,
)
from vidalign_trainer.zero import DeepSpeedConfig, ZeroEngine, initialize, require_plain_state

log = get_logger("vidalign.stage2")


@dataclass(kw_only=True)
class TeacherConfig:
    address: str = "local"
    """``local`` (in this process), ``host:port`` or ``dns:///name:port``."""
    model: str = "tiny-animatediff"
    """Diffusion model; loaded here for ``local``, checked against the server otherwise."""
    adapter: str = ""
    """Adapter file or store URI (its digest is sent), or an id ``sha256:<hex>`` the server has loaded."""
    timeout_s: float = 600.0
    """Deadline of one teacher call."""
    frames: int = 0
    """Frames sent to the diffusion model (VDA: 24); 0: what the teacher reports it expects."""
    retries: int = 5
    """Retries of a call that found the teacher UNAVAILABLE (backoff 0.5 s doubling, jittered)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 40
    batch_size: int = 2
    lr: float = 1e-5
    """VDA trains all stages at 1e-5."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    num_draws: int = 1
    """Noise draws K per sample per step."""
    timestep_range: list[int] = field(default_factory=lambda: [0, 1000])
    text: bool = True
    """Condition the teacher on the static caption; false is VDA's no-text ablation."""
    mismatch: bool = False
    """Control run: the teacher gets another clip (pixels, caption, id of clip ``(i + N/2) mod N``)
    than the one whose features it is conditioned on, so no gradient can carry that clip's
    motion; what stage 2 then changes in the encoder is not teaching."""
    micro_batches: int = 1
    """Split each batch into this many teacher calls, sent as soon as their features are
    ready, so the teacher works on one while the encoder computes the next."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.num_draws < 1:
            raise ValueError("train.steps, train.batch_size and train.num_draws must be >= 1")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.micro_batches ({self.micro_batches}) must divide train.batch_size "
                f"({self.batch_size})"
            )
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if len(self.timestep_range) != 2 or not 0 <= self.timestep_range[0] < self.timestep_range[1]:
            raise ValueError(f"train.timestep_range must be [min, max), got {self.timestep_range}")


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/stage2"
    checkpoint_every: int = 20
    keep_latest_k: int = 3


@dataclass(kw_only=True)
class Stage2Config:
    student: str = "tiny-videollava"
    """Student VideoLLM whose video encoder E_phi is trained (``vidalign models list``)."""
    student_weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the student; empty: the registry's source."""
    device: str = "cpu"
    """Device of the student (and of the teacher when ``teacher.address`` is ``local``)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """``enabled: true``: train through a DeepSpeed ZeRO engine (``vidalign_trainer.zero``)."""


def resolve_adapter_id(adapter: str) -> str:
    if not adapter:
        raise InvalidInput("teacher.adapter is required: an adapter file, store URI or sha256 id")
    if adapter.startswith("sha256:"):
        return adapter
    local = materialize(adapter)
    if not local.is_file():
        raise InvalidInput(f"teacher.adapter: {adapter} is neither a file nor a sha256: id")
    return file_digest(local)


def run_stage2(config: Stage2Config, *, resume: bool = False, teacher: Teacher | None = None) -> list[float]:
    """Train; returns the mean loss of each step run by this call."""
    config.deepspeed.check()
    run = RunDir(config.output.dir)
    ranks = init_distributed(config.device)
    world, rank = ranks.world_size, ranks.rank
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", ranks.local_rank)
    if config.train.batch_size % world:
        raise InvalidInput(
            f"train.batch_size ({config.train.batch_size}) must be divisible by the {world} ranks"
        )
    adapter_id = resolve_adapter_id(config.teacher.adapter)
    own_teacher = teacher is None
    zero: ZeroEngine | None = None
    if teacher is None:
        adapters = [config.teacher.adapter] if not config.teacher.adapter.startswith("sha256:") else []
        teacher = connect(
            config.teacher.address,
            model=config.teacher.model,
            adapters=adapters,
            device=config.device,
            timeout=config.teacher.timeout_s,
            retries=config.teacher.retries,
        )
    try:
        info = teacher.info()
        if config.teacher.model and info.model != config.teacher.model:
            raise InvalidInput(
                f"teacher at {config.teacher.address} hosts '{info.model}', "
                f"the config asks for '{config.teacher.model}'"
            )
        if adapter_id not in {a.id for a in info.adapters}:
            raise InvalidInput(
                f"adapter {adapter_id} is not loaded on the teacher "
                f"(loaded: {', '.join(a.id for a in info.adapters) or 'none'})"
            )
        weights = weights_component(config.student_weights, "model") if config.student_weights else None
        encoder = load_student(config.student, device=str(device), path=weights)
        encoder.train()
        # Parameters that cannot reach F_V (layers after the feature layer) are
        # frozen by the loader; DDP and ZeRO fail on params that never get a grad.
        trainable = [p for p in encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        per_rank = config.train.batch_size // world
        # Data parallel: each rank trains on its slice of the global batch; DDP (or the
        # ZeRO engine) averages the gradients, which is the gradient of the global batch mean.
        if config.deepspeed.enabled:
            zero = initialize(
                encoder,
                optimizer,
                config=config.deepspeed,
                ranks=ranks,
                device=device,
                micro_batch_size=per_rank,
                grad_clip=config.train.grad_clip,
            )
            model = zero
        else:
            model = DistributedDataParallel(encoder) if world > 1 else encoder
        checkpointer = run.checkpointer(config.output.keep_latest_k)
        digest = config_digest(config)
        start = 0
        ckpt = checkpointer.latest() if resume else None
        if ckpt is not None:
            if ckpt.meta.get("config_digest") != digest:
                log.warning("resume_config_changed", checkpoint=ckpt.name)
            encoder.load_state_dict(ckpt.weights("encoder"))
            if zero is not None:
                zero.load_optimizer_state(ckpt.state("optimizer"), ckpt.name)
            else:
                optimizer.load_state_dict(require_plain_state(ckpt.state("optimizer"), ckpt.name))
            set_rng_state(ckpt.state("rng"))
            start = ckpt.trainer_state()["step"]
            log.info("resumed", step=start, checkpoint=f"{checkpointer.store.uri}/{ckpt.name}")
        run.start_metrics(ckpt)

        data = open_dataset(config.data)
        if per_rank % config.train.micro_batches:
            raise InvalidInput(
                f"train.micro_batches ({config.train.micro_batches}) must divide the per-rank "
                f"batch ({per_rank})"
            )
        criterion = RemoteDenoisingLoss(
            teacher,
            adapter_id=adapter_id,
            model=info.model,
            num_draws=config.train.num_draws,
            timestep_range=tuple(config.train.timestep_range),  # type: ignore[arg-type]
        )
        log.info(
            "stage2_start",
            student=config.student,
            teacher=config.teacher.address,
            teacher_model=info.model,
            adapter_id=adapter_id,
            clips=len(data),
            trainable_params=sum(p.numel() for p in trainable),
            zero_stage=config.deepspeed.zero_stage if zero is not None else None,
            start_step=start,
            steps=config.train.steps,
            output=run.store.uri,
        )
        losses: list[float] = []
        with logging_redirect_tqdm(), tqdm(
            total=config.train.steps,
            initial=start,
            desc="stage2",
            unit="step",
            dynamic_ncols=True,
            disable=None if rank == 0 else True,  # none off a terminal (CI, logs) or off rank 0
        ) as bar:
            for step in range(start, config.train.steps):
                tic = time.perf_counter()
                picks = data.order(step, config.train.batch_size, config.train.seed)
                batch = data.clips(picks)
                # The teacher's side of the pair: the same clips, or (control) other ones.
                seen = data.clips([(i + len(data) // 2) % len(data) for i in picks]) if config.train.mismatch else batch
                local = slice(rank * per_rank, (rank + 1) * per_rank)
                video = batch.video[local]
                ids = seen.ids[local]
                teacher_video = sample_frames(
                    seen.video[local], config.teacher.frames or info.frames, info.resolution
                )
                captions = seen.static_captions[local] if config.train.text else None
                size = per_rank // config.train.micro_batches
                parts = [slice(lo, lo + size) for lo in range(0, per_rank, size)]
                if world > 1 or zero is not None:
                    # One DDP (or engine) forward per backward: all features, then the parts.
                    whole = model(encoder.preprocess(video.to(device)))
                    features = [whole[part] for part in parts]
                else:
                    features = []
                pending = []
                for i, part in enumerate(parts):
                    if world == 1:  # the encoder computes part i+1 while the teacher has part i
                        features.append(model(encoder.preprocess(video[part].to(device))))
                    pending.append(criterion.submit(
                        features[i],
                        pixels=teacher_video[part],
                        captions=None if captions is None else captions[part],
                        sample_ids=ids[part],
                        seed=step_seed(config.train.seed, step),
                    ))
                t_teacher = time.perf_counter()  # teacher_s: waiting on the teacher after the last send
                # Equal micro-batches: the mean of their means is the batch mean.
                loss = torch.stack([p.result().mean() for p in pending]).mean()
                t_teacher = time.perf_counter() - t_teacher
                if zero is not None:
                    zero.backward(loss)
                    grad_norm = zero.step()  # DeepSpeed clips to train.grad_clip
                else:
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        trainable,
                        config.train.grad_clip if config.train.grad_clip > 0 else math.inf,
                    )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                value = global_mean(loss.detach(), ranks)
                if not math.isfinite(value):
                    raise FloatingPointError(f"stage 2 loss is {value} at step {step + 1}")
                losses.append(value)
                record = {
                    "step": step + 1,
                    "loss": round(value, 6),
                    "grad_norm": round(float(grad_norm), 6),
                    "step_s": round(time.perf_counter() - tic, 4),
                    "teacher_s": round(t_teacher, 4),
                }
                if rank == 0:
                    run.log_metrics(record)
                    log.info("stage2_step", **record)
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
                last = step + 1 == config.train.steps
                save = (step + 1) % config.output.checkpoint_every == 0 or last
                # Under ZeRO each rank holds a partition of the optimizer state: gathered here.
                zero_state = zero.optimizer_state() if zero is not None and save else None
                if rank == 0 and save:
                    checkpointer.save(
                        step + 1,
                        weights={"encoder": encoder.state_dict()},
                        state={
                            "optimizer": optimizer.state_dict() if zero is None else zero_state,
                            "rng": rng_state(),
                        },
                        trainer_state={
                            "samples_seen": (step + 1) * config.train.batch_size,
                            "data_seed": config.train.seed,
                        },
                        producer="vidalign train stage2",
                        config_digest=digest,
                        meta={
                            "config": to_dict(config),
                            "adapter_id": adapter_id,
                            "teacher_model": info.model,
                        },
                        extra_files={METRICS: run.metrics_path},
                    )
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return losses
        final = checkpointer.latest()
        assert final is not None and final.step == config.train.steps
        commit_artifact(
            run.store,
            "encoder",
            {"encoder.safetensors": final.file("encoder.safetensors")},
            producer="vidalign train stage2",
            config_digest=digest,
            step=final.step,
            meta={"student": config.student, "adapter_id": adapter_id, "teacher_model": info.model},
        )
        run.publish_metrics()
        log.info(
            "stage2_done",
            steps=config.train.steps,
            final_loss=losses[-1] if losses else None,
            encoder=f"{run.store.uri}/encoder",
        )
        return losses
    finally:
        if zero is not None:
            zero.close()
        if own_teacher:
            teacher.close()
