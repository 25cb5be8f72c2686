"""VDA stage 1: train W_proj and a UNet LoRA on the frozen teacher, encoder frozen.

    L = || eps - eps_theta(z_t, t, [c_text; W_proj(F_V)]) ||^2     (eq. 3)
    (W_proj, LoRA) <- AdamW(dL/dW_proj, dL/dLoRA)

The stage-1 job runs the teacher's model code in this process (DESIGN.md):
F_V comes from a feature set that ``vidalign features extract`` wrote (the
encoder is frozen, so its features are fixed inputs), the clips are
VAE-encoded once (cached in the run's store as the ``latents`` artifact), and
the result is an adapter artifact ``<output.dir>/adapter/adapter.safetensors``
that ``vidalign teacher serve --adapter URI`` loads for stage 2.

Every source of randomness is a function of (seed, step, clip id): batch order
and the timesteps and noise of ``draw_generator``. A run resumed from a
checkpoint at step k repeats what an uninterrupted run does after step k.

Under torchrun (``WORLD_SIZE > 1``) each rank takes an equal slice of the global
batch of ``train.batch_size`` clips (as in stage 2); the trainable parameters are
wrapped in DistributedDataParallel, which averages their gradients, so the update
is that of the global batch mean. Only rank 0 writes checkpoints, metrics and
artifacts.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.checkpoint import Checkpoint, Checkpointer, rng_state, set_rng_state
from vidalign.config import ConfigError, config_digest, load_config, to_dict
from vidalign.diffusion import Adapter, DiffusionTeacher, denoising_loss, load_teacher
from vidalign.errors import InvalidInput, VidalignError
from vidalign.hub import weights_component
from vidalign.log import configure_logging, get_logger
from vidalign.run import METRICS, RunDir
from vidalign.store import Store, commit_artifact, read_artifact_file, read_manifest
from vidalign.video import sample_frames
from vidalign_trainer.common import (
    ClipDataset,
    DataConfig,
    Dist,
    global_mean,
    init_distributed,
    open_dataset,
    step_seed,
)
from vidalign_trainer.features import FeatureSet, load_features

log = get_logger("vidalign.stage1")

PRODUCER = "vidalign train stage1"
ADAPTER = "adapter"
ADAPTER_FILE = "adapter.safetensors"
LATENTS = "latents"
LATENTS_FILE = "latents.safetensors"


# --- config ---------------------------------------------------------------------


@dataclass(kw_only=True)
class Stage1TeacherConfig:
    model: str = "tiny-animatediff"
    """Diffusion model, loaded in this process (``vidalign models list``, or a pipeline dir)."""
    weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the weights; empty: the registry's sources."""
    dtype: str = "float32"
    """Teacher weights' dtype. The LoRA trains in it too: keep float32 unless memory forces otherwise."""
    frames: int = 0
    """Frames fed to the diffusion model (VDA: 24); 0: the model's registry default."""

    def __post_init__(self) -> None:
        if self.frames < 0:
            raise ValueError(f"teacher.frames must be >= 0, got {self.frames}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"teacher.dtype: expected float32, float16 or bfloat16, got {self.dtype!r}")


@dataclass(kw_only=True)
class AdapterConfig:
    projection: str = "linear"
    """W_proj: ``linear`` (the paper's choice) or ``mlp`` (2-layer GELU, appendix B)."""
    lora_rank: int = 16
    """UNet LoRA rank (VDA: 16); 0 trains W_proj alone."""
    lora_alpha: int | None = None
    """LoRA alpha; null: equal to the rank (scale 1)."""
    seed: int = 0
    """Initialisation of W_proj and LoRA A (LoRA B starts at zero: a no-op LoRA)."""

    def __post_init__(self) -> None:
        if self.projection not in ("linear", "mlp"):
            raise ValueError(f"adapter.projection: expected linear or mlp, got {self.projection!r}")
        if self.lora_rank < 0:
            raise ValueError(f"adapter.lora_rank must be >= 0, got {self.lora_rank}")


@dataclass(kw_only=True)
class Stage1TrainConfig:
    steps: int = 100
    batch_size: int = 2
    """Clips per step over all ranks; each rank takes batch_size / world_size (VDA: 2 GPUs x 1)."""
    lr: float = 1e-4
    """AdamW learning rate. The paper uses 1e-5; the tiny models move visibly only at ~1e-4 and up."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    num_draws: int = 1
    """Noise draws K per clip per step."""
    timestep_range: list[int] = field(default_factory=lambda: [0, 1000])
    text: bool = True
    """Condition on the static caption too; false is VDA's no-text ablation."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.num_draws < 1:
            raise ValueError("train.steps, train.batch_size and train.num_draws must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if len(self.timestep_range) != 2 or not 0 <= self.timestep_range[0] < self.timestep_range[1]:
            raise ValueError(f"train.timestep_range must be [min, max), got {self.timestep_range}")


@dataclass(kw_only=True)
class Stage1EvalConfig:
    num_clips: int = 4
    """The first N clips of the dataset form the fixed evaluation set; 0 disables evaluation."""
    timesteps: list[int] = field(default_factory=lambda: [100, 500, 900])
    """Fixed timesteps, one draw each, so evaluations at different steps compare like with like."""
    seed: int = 1234
    """Seed of the evaluation noise."""
    every: int = 0
    """Also evaluate every N steps (0: only before the first and after the last step)."""

    def __post_init__(self) -> None:
        if self.num_clips < 0 or self.every < 0:
            raise ValueError("eval.num_clips and eval.every must be >= 0")
        if self.num_clips and not self.timesteps:
            raise ValueError("eval.timesteps: give at least one timestep")


@dataclass(kw_only=True)
class Stage1OutputConfig:
    dir: str = "runs/stage1"
    """Store URI of the run: checkpoints/, latents, adapter, metrics.jsonl."""
    checkpoint_every: int = 50
    keep_latest_k: int = 3


@dataclass(kw_only=True)
class Stage1Config:
    device: str = "cpu"
    """Device of the teacher (``cuda`` picks ``cuda:LOCAL_RANK`` under torchrun)."""
    features: str = "runs/features"
    """Feature set written by `vidalign features extract` (store URI) for the same ``data``."""
    teacher: Stage1TeacherConfig = field(default_factory=Stage1TeacherConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: Stage1TrainConfig = field(default_factory=Stage1TrainConfig)
    eval: Stage1EvalConfig = field(default_factory=Stage1EvalConfig)
    output: Stage1OutputConfig = field(default_factory=Stage1OutputConfig)


@dataclass
class Stage1Result:
    losses: list[float]
    """Mean training loss of each step this call ran."""
    eval_losses: dict[int, float]
    """Step -> mean loss on the fixed evaluation set, for evaluations this call ran (0: before training)."""
    adapter_uri: str
    """The trained adapter file, for ``teacher.adapter`` / ``vidalign teacher serve --adapter``."""


# --- distributed ----------------------------------------------------------------


def _device(config: Stage1Config, ranks: Dist) -> torch.device:
    if config.device == "cuda" and ranks.world_size > 1:
        return torch.device(f"cuda:{ranks.local_rank}")
    return torch.device(config.device)


class Stage1Model(torch.nn.Module):
    """Teacher + adapter as one module, so DDP sees (and syncs) exactly the trainable params.

    The teacher's base weights have ``requires_grad=False``; DDP reduces the
    gradients of W_proj and of the LoRA only.
    """

    def __init__(self, teacher: DiffusionTeacher, adapter: Adapter) -> None:
        super().__init__()
        self.teacher = teacher
        self.adapter = adapter

    def forward(
        self,
        latents: Tensor,
        text_emb: Tensor | None,
        features: Tensor,
        sample_ids: list[str],
        seed: int,
        num_draws: int,
        timestep_range: tuple[int, int],
    ) -> Tensor:
        losses, _ = denoising_loss(
            self.teacher,
            self.adapter,
            latents,
            text_emb=text_emb,
            features=features,
            sample_ids=sample_ids,
            seed=seed,
            num_draws=num_draws,
            timestep_range=timestep_range,
        )
        return losses.mean(dim=1)


# --- data -----------------------------------------------------------------------


def encode_latents(
    teacher: DiffusionTeacher, dataset: ClipDataset, *, frames: int = 0, batch_size: int = 8
) -> dict[str, Tensor]:
    """Clean VAE latents (C, F, h, w) of every clip, at ``frames`` (default: the teacher's) and its resolution."""
    latents: dict[str, Tensor] = {}
    n = len(dataset.ids)
    for start in range(0, n, batch_size):
        batch = dataset.clips(range(start, min(start + batch_size, n)))
        pixels = sample_frames(batch.video, frames or teacher.frames, teacher.resolution)
        for clip_id, z in zip(batch.ids, teacher.encode_video(pixels).cpu(), strict=True):
            latents[clip_id] = z.contiguous()
    return latents


def cached_latents(
    store: Store, teacher: DiffusionTeacher, model: str, dataset: ClipDataset, data: DataConfig, ranks: Dist,
    frames: int = 0,
) -> dict[str, Tensor]:
    """The clips' latents from the run's ``latents`` artifact, encoding (and committing) them once."""
    frames = frames or teacher.frames
    key = {"teacher_model": model, "frames": frames, "resolution": teacher.resolution,
           "data": to_dict(data)}
    manifest = read_manifest(store, LATENTS)
    if manifest is not None and manifest.meta.get("key") == key:
        latents = safetensors_load(read_artifact_file(store, LATENTS, LATENTS_FILE))
        if set(latents) >= set(dataset.ids):
            return latents
    latents = encode_latents(teacher, dataset, frames=frames)
    if ranks.main:
        commit_artifact(store, LATENTS, {LATENTS_FILE: safetensors_save(latents)},
                        producer=PRODUCER, meta={"key": key})
    return latents


class Stage1Data:
    """Everything a step reads, keyed by clip id: latents, F_V and the static caption."""

    def __init__(self, dataset: ClipDataset, latents: dict[str, Tensor], features: FeatureSet) -> None:
        self.dataset = dataset
        self.latents = latents
        self.features = features
        self.features.get(dataset.ids)  # fail now, naming the missing clips, not at step 731
        self.captions = dict(zip(dataset.ids, dataset.static_captions, strict=True))

    def caption(self, ids: Sequence[str]) -> list[str]:
        return [self.captions[i] for i in ids]


# --- evaluation -----------------------------------------------------------------


@torch.no_grad()
def evaluate(
    teacher: DiffusionTeacher, adapter: Adapter, data: Stage1Data, config: Stage1Config
) -> float:
    """Mean denoising loss on the fixed evaluation set: fixed clips, timesteps and noise."""
    ids = data.dataset.ids[: config.eval.num_clips]
    text_emb = teacher.encode_text(data.caption(ids)) if config.train.text else None
    losses, _ = denoising_loss(
        teacher,
        adapter,
        torch.stack([data.latents[i] for i in ids]),
        text_emb=text_emb,
        features=data.features.get(ids),
        sample_ids=ids,
        seed=config.eval.seed,
        timesteps=config.eval.timesteps,
        draws=list(range(len(config.eval.timesteps))),
    )
    return losses.mean().item()


# --- the run --------------------------------------------------------------------


def _build_adapter(config: Stage1Config, teacher: DiffusionTeacher, d_v: int) -> Adapter:
    return Adapter.create(
        d_v=d_v,
        cond_dim=teacher.cond_dim,
        projection=config.adapter.projection,
        lora_rank=config.adapter.lora_rank,
        lora_alpha=config.adapter.lora_alpha,
        teacher_family=teacher.family,
        seed=config.adapter.seed,
        teacher=teacher if config.adapter.lora_rank else None,
    )


def run_stage1(
    config: Stage1Config, *, resume: bool = False, teacher: DiffusionTeacher | None = None
) -> Stage1Result:
    """Train W_proj + LoRA; commit ``<output.dir>/adapter``. ``teacher`` lets a caller share one."""
    ranks = init_distributed(config.device)
    if config.train.batch_size % ranks.world_size:
        raise InvalidInput(
            f"train.batch_size ({config.train.batch_size}) must be divisible by the "
            f"{ranks.world_size} ranks"
        )
    device = _device(config, ranks)
    run = RunDir(config.output.dir)
    if teacher is None:
        sources: dict[str, str | None] = {}
        if config.teacher.weights:
            sources = {
                "base": weights_component(config.teacher.weights, "base"),
                "motion_adapter": weights_component(config.teacher.weights, "motion_adapter"),
            }
        teacher = load_teacher(
            config.teacher.model, device=device, dtype=getattr(torch, config.teacher.dtype), **sources
        )
    features = load_features(config.features)
    if features.source.get("data") != to_dict(config.data):
        # Clip ids alone do not pin the pixels (frames, size): say so, but let it run.
        log.warning("features_data_differs", features=features.uri,
                    extracted_from=features.source.get("data"), training_on=to_dict(config.data))
    dataset = open_dataset(config.data)
    # Rank 0 encodes and commits the latents once; the other ranks then read them.
    if ranks.world_size > 1 and not ranks.main:
        dist.barrier()
    latents = cached_latents(run.store, teacher, config.teacher.model, dataset, config.data, ranks,
                             frames=config.teacher.frames)
    if ranks.world_size > 1 and ranks.main:
        dist.barrier()
    data = Stage1Data(dataset, latents, features)

    adapter = _build_adapter(config, teacher, features.d_v)
    checkpointer = run.checkpointer(config.output.keep_latest_k)
    if not ranks.main:  # ranks on one node must not fetch into the same cache directory
        checkpointer.cache_dir = run.work / f".checkpoint-cache-rank{ranks.rank}"
    digest = config_digest(config)
    start = 0
    ckpt = checkpointer.latest() if resume else None
    if ckpt is not None:
        if ckpt.meta.get("config_digest") != digest:
            log.warning("resume_config_changed", checkpoint=ckpt.name)
        adapter.proj.load_state_dict(ckpt.weights("proj"))
        if adapter.lora_rank:
            adapter.lora_state = ckpt.weights("lora")
        start = ckpt.trainer_state()["step"]
    adapter.to(device)
    lora = adapter.lora_name if adapter.lora_rank else None
    if lora is not None:
        teacher.attach_lora(lora, adapter.lora_config(), adapter.lora_state)
    try:
        return _fit(config, run, teacher, adapter, data, ranks, ckpt, start, digest, checkpointer)
    finally:
        if lora is not None:
            teacher.detach_lora(lora)


def _fit(
    config: Stage1Config,
    run: RunDir,
    teacher: DiffusionTeacher,
    adapter: Adapter,
    data: Stage1Data,
    ranks: Dist,
    ckpt: Checkpoint | None,
    start: int,
    digest: str,
    checkpointer: Checkpointer,
) -> Stage1Result:
    lora = adapter.lora_name if adapter.lora_rank else None
    lora_params = teacher.lora_parameters(lora) if lora else []
    for p in lora_params:
        p.requires_grad_(True)
    adapter.requires_grad_(True)
    trainable = list(adapter.parameters()) + lora_params
    model: torch.nn.Module = Stage1Model(teacher, adapter)
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The replicas start equal (same seeds, same checkpoint); DDP also broadcasts rank 0's.
        model = DistributedDataParallel(model, device_ids=[ranks.local_rank] if teacher.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.state("optimizer"))
        set_rng_state(ckpt.state("rng"))
        log.info("resumed", step=start, checkpoint=f"{checkpointer.store.uri}/{ckpt.name}")
    if ranks.main:
        run.start_metrics(ckpt)

    train = config.train
    evaluations: dict[int, float] = {}

    def maybe_evaluate(step: int, force: bool = False) -> float | None:
        if not config.eval.num_clips or not ranks.main:
            return None
        if not force and not (config.eval.every and step % config.eval.every == 0):
            return None
        evaluations[step] = evaluate(teacher, adapter, data, config)
        return evaluations[step]

    log.info(
        "stage1_start",
        teacher=config.teacher.model,
        features=data.features.uri,
        clips=len(data.dataset.ids),
        d_v=adapter.d_v,
        projection=adapter.projection,
        lora_rank=adapter.lora_rank,
        trainable_params=sum(p.numel() for p in trainable),
        world_size=ranks.world_size,
        start_step=start,
        steps=train.steps,
        output=run.store.uri,
    )
    if start == 0 and (value := maybe_evaluate(0, force=True)) is not None:
        log.info("stage1_eval", step=0, eval_loss=round(value, 6))
    losses: list[float] = []
    per_rank = train.batch_size // ranks.world_size
    with logging_redirect_tqdm(), tqdm(
        total=train.steps,
        initial=start,
        desc="stage1",
        unit="step",
        dynamic_ncols=True,
        disable=None if ranks.main else True,
    ) as bar:
        for step in range(start, train.steps):
            tic = time.perf_counter()
            picks = data.dataset.order(step, train.batch_size, train.seed)
            picks = picks[ranks.rank * per_rank : (ranks.rank + 1) * per_rank]
            ids = [data.dataset.ids[i] for i in picks]
            text_emb = teacher.encode_text(data.caption(ids)) if train.text else None
            per_sample = model(
                torch.stack([data.latents[i] for i in ids]),
                text_emb,
                data.features.get(ids),
                ids,
                step_seed(train.seed, step),
                train.num_draws,
                tuple(train.timestep_range),
            )
            loss = per_sample.mean()
            loss.backward()  # under DDP: gradients averaged over ranks here
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, train.grad_clip if train.grad_clip > 0 else math.inf
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = global_mean(loss.detach(), ranks)
            if not math.isfinite(value):
                raise FloatingPointError(f"stage 1 loss is {value} at step {step + 1}")
            losses.append(value)
            record = {
                "step": step + 1,
                "loss": round(value, 6),
                "grad_norm": round(float(grad_norm), 6),
                "step_s": round(time.perf_counter() - tic, 4),
            }
            last = step + 1 == train.steps
            if (ev := maybe_evaluate(step + 1, force=last)) is not None:
                record["eval_loss"] = round(ev, 6)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            if not ranks.main:
                continue
            run.log_metrics(record)
            log.info("stage1_step", **record)
            if (step + 1) % config.output.checkpoint_every == 0 or last:
                checkpointer.save(
                    step + 1,
                    weights={"proj": adapter.proj.state_dict()}
                    | ({"lora": teacher.lora_state_dict(lora)} if lora else {}),
                    state={"optimizer": optimizer.state_dict(), "rng": rng_state()},
                    trainer_state={"samples_seen": (step + 1) * train.batch_size, "data_seed": train.seed},
                    producer=PRODUCER,
                    config_digest=digest,
                    meta={"config": to_dict(config), "teacher_model": config.teacher.model},
                    extra_files={METRICS: run.metrics_path},
                )
    adapter_uri = f"{run.store.uri}/{ADAPTER}/{ADAPTER_FILE}"
    if ranks.main:
        _commit_adapter(config, run, teacher, adapter, lora, digest)
        run.publish_metrics()
        log.info("stage1_done", steps=train.steps, final_loss=losses[-1] if losses else None,
                 eval_losses=evaluations, adapter=adapter_uri)
    if ranks.world_size > 1:
        dist.barrier()  # the adapter exists for every rank that returns
    return Stage1Result(losses=losses, eval_losses=evaluations, adapter_uri=adapter_uri)


def _commit_adapter(
    config: Stage1Config,
    run: RunDir,
    teacher: DiffusionTeacher,
    adapter: Adapter,
    lora: str | None,
    digest: str,
) -> str:
    """Export W_proj + the trained LoRA (peft format) as ``<output.dir>/adapter``."""
    if lora is not None:
        adapter.lora_state = teacher.lora_state_dict(lora)
    with tempfile.TemporaryDirectory(prefix="vidalign-adapter-") as tmp:
        path = Path(tmp) / ADAPTER_FILE
        adapter_id = adapter.save(path)
        commit_artifact(
            run.store,
            ADAPTER,
            {ADAPTER_FILE: path},
            producer=PRODUCER,
            config_digest=digest,
            step=config.train.steps,
            meta={
                "adapter_id": adapter_id,
                "teacher_model": config.teacher.model,
                "features": config.features,
                "projection": adapter.projection,
                "lora_rank": adapter.lora_rank,
                "text": config.train.text,
            },
        )
    return adapter_id


# --- command line (also `torchrun ... -m vidalign_trainer.stage1`) --------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/stage1-tiny.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")


def run_from_args(args: argparse.Namespace) -> None:
    config = load_config(Stage1Config, args.config, args.set)
    try:
        run_stage1(config, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vidalign train stage1", description="VDA stage 1: train W_proj + UNet LoRA."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        run_from_args(args)
    except (VidalignError, ConfigError) as err:
        print(f"vidalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
