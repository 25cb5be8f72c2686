"""VDA stage 1: train W_proj and a UNet LoRA on the frozen teacher, encoder frozen.

    L = || eps - eps_theta(z_t, t, [c_text; W_proj(F_V)]) ||^2     (eq. 3)
    (W_proj, LoRA) <- AdamW(dL/dW_proj, dL/dLoRA)

The stage-1 job runs the teacher's model code in this process (docs/design.md):
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

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from vidalign.checkpoint import Checkpoint
from vidalign.config import to_dict
from vidalign.data.videoset import Skip, SkipLog, View
from vidalign.errors import InvalidInput
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.papers import VDA_LORA_RANK, VDA_PROJECTION, VDA_TIMESTEP_RANGE
from vidalign.precision import (
    autocast,
    enable_gradient_checkpointing,
    precision_dtype,
    precision_name,
)
from vidalign.store import Store, commit_artifact, read_artifact_file, read_manifest
from vidalign.students.encoder import _parse_pooling
from vidalign.vda import Adapter, DiffusionTeacher, denoising_loss, load_teacher
from vidalign.vda.adapter import CONDITIONINGS, DEFAULT_CONDITIONING, DEFAULT_MAX_FRAMES
from vidalign_trainer.common import ClipData, DataConfig, Dist, epoch_order, open_dataset, step_seed
from vidalign_trainer.features import FeatureSet, load_features
from vidalign_trainer.loop import (
    Built,
    Context,
    Job,
    OutputConfig,
    StepOutput,
    TeacherSection,
    TrainConfig,
    fit,
)

log = get_logger("vidalign.stage1")

PRODUCER = "vidalign train stage1"
ADAPTER = "adapter"
ADAPTER_FILE = "adapter.safetensors"
LATENTS = "latents"
LATENTS_FILE = "latents.safetensors"


# --- config ---------------------------------------------------------------------


@dataclass(kw_only=True)
class Stage1TeacherConfig(TeacherSection):
    """The teacher stage 1 loads in this process."""

    weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the weights; empty: the registry's sources."""
    dtype: str = ""
    """The frozen UNet's storage: fp32, bf16 or fp16 (float32, ... accepted); empty:
    ``train.precision``'s. W_proj and the LoRA train in float32 whatever it is."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype:
            self.dtype = precision_name(self.dtype, "teacher.dtype")


@dataclass(kw_only=True)
class AdapterConfig:
    projection: str = VDA_PROJECTION
    """W_proj: ``linear`` (the paper's choice) or ``mlp`` (2-layer GELU, appendix B)."""
    lora_rank: int = VDA_LORA_RANK
    """UNet LoRA rank (VDA: 16); 0 trains W_proj alone."""
    lora_alpha: int | None = None
    """LoRA alpha; null: equal to the rank (scale 1)."""
    seed: int = 0
    """Initialisation of W_proj and LoRA A (LoRA B starts at zero: a no-op LoRA)."""
    conditioning: str = DEFAULT_CONDITIONING
    """How W_proj(F_V) reaches the teacher's frames: ``frame`` (each teacher frame sees the
    tokens of the student frame at its time), ``frame_pos`` (all tokens, plus a learned
    frame-position embedding) or ``context`` (all tokens, unordered: the original route).
    The tokens per student frame come from the feature set's pooling, not from here."""
    max_frames: int = DEFAULT_MAX_FRAMES
    """Student frames the ``frame_pos`` embedding covers (unused by the other modes)."""

    def __post_init__(self) -> None:
        if self.projection not in ("linear", "mlp"):
            raise ValueError(f"adapter.projection: expected linear or mlp, got {self.projection!r}")
        if self.lora_rank < 0:
            raise ValueError(f"adapter.lora_rank must be >= 0, got {self.lora_rank}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"adapter.conditioning: expected one of {', '.join(CONDITIONINGS)}, "
                f"got {self.conditioning!r}"
            )
        if self.max_frames < 1:
            raise ValueError(f"adapter.max_frames must be >= 1, got {self.max_frames}")


@dataclass(kw_only=True)
class Stage1TrainConfig(TrainConfig):
    steps: int = 100
    lr: float = 1e-4
    """AdamW learning rate. The paper uses 1e-5; the tiny models move visibly only at ~1e-4 and up."""
    num_draws: int = 1
    """Noise draws K per clip per step."""
    timestep_range: list[int] = field(default_factory=lambda: list(VDA_TIMESTEP_RANGE))
    """Timesteps are drawn uniformly from [min, max)."""
    text: bool = True
    """Condition on the static caption too; false is VDA's no-text ablation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_draws < 1:
            raise ValueError(f"train.num_draws must be >= 1, got {self.num_draws}")
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
    output: OutputConfig = field(
        default_factory=lambda: OutputConfig(dir="runs/stage1", checkpoint_every=50)
    )


@dataclass
class Stage1Result:
    losses: list[float]
    """Mean training loss of each step this call ran."""
    eval_losses: dict[int, float]
    """Step -> mean loss on the fixed evaluation set, for evaluations this call ran (0: before training)."""
    adapter_uri: str
    """The trained adapter file, for ``teacher.adapter`` / ``vidalign teacher serve --adapter``."""


# --- the model -------------------------------------------------------------------


class Stage1Model(torch.nn.Module):
    """Teacher + adapter as one module, so DDP sees (and syncs) exactly the trainable params.

    The teacher's base weights have ``requires_grad=False``; DDP reduces the
    gradients of W_proj and of the LoRA only.
    """

    def __init__(self, teacher: DiffusionTeacher, adapter: Adapter, precision: str = "fp32") -> None:
        super().__init__()
        self.teacher = teacher
        self.adapter = adapter
        self.precision = precision

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
        with autocast(self.precision, latents.device):
            return self._losses(latents, text_emb, features, sample_ids, seed, num_draws, timestep_range)

    def _losses(self, latents, text_emb, features, sample_ids, seed, num_draws, timestep_range) -> Tensor:
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
    teacher: DiffusionTeacher, dataset: ClipData, items: Sequence[int], view: View, *,
    skips: SkipLog | None = None, batch_size: int = 8,
) -> dict[str, Tensor]:
    """Clean VAE latents (C, F, h, w) of the records ``items`` at ``view``; a clip that cannot
    be read is left out (and logged in ``skips``)."""
    plan = [list(range(lo, min(lo + batch_size, len(items)))) for lo in range(0, len(items), batch_size)]
    latents: dict[str, Tensor] = {}
    feed = dataset.feed(items, {"teacher": view}, plan, skips=skips, substitute=False)
    try:
        for fed in feed:
            if fed.ids:
                for clip_id, z in zip(fed.ids, teacher.encode_video(fed.views["teacher"]).cpu(), strict=True):
                    latents[clip_id] = z.contiguous()
    finally:
        feed.close()
    return latents


def cached_latents(
    store: Store, teacher: DiffusionTeacher, model: str, dataset: ClipData, items: Sequence[int],
    data: DataConfig, ranks: Dist, view: View, skips: SkipLog | None,
) -> dict[str, Tensor]:
    """The clips' latents from the run's ``latents`` artifact, encoding (and committing) them once."""
    key = {"teacher_model": model, "frames": view.frames, "resolution": view.height,
           "data": to_dict(data)}
    wanted = {dataset.ids[i] for i in items}
    manifest = read_manifest(store, LATENTS)
    if manifest is not None and manifest.meta.get("key") == key:
        latents = safetensors_load(read_artifact_file(store, LATENTS, LATENTS_FILE))
        if set(latents) >= wanted:
            return latents
    latents = encode_latents(teacher, dataset, items, view, skips=skips)
    if ranks.main:
        commit_artifact(store, LATENTS, {LATENTS_FILE: safetensors_save(latents)},
                        producer=PRODUCER, meta={"key": key})
    return latents


class Stage1Data:
    """What a step reads: the clips that have F_V, their static captions, and their latents
    (cached for clips held in memory; encoded each step from decoded video otherwise)."""

    def __init__(self, dataset: ClipData, features: FeatureSet, skips: SkipLog | None) -> None:
        self.dataset = dataset
        self.features = features
        have = features.ids()
        self.items = [k for k, clip_id in enumerate(dataset.ids) if clip_id in have]
        absent = [dataset.records[k] for k, clip_id in enumerate(dataset.ids) if clip_id not in have]
        if absent and skips is not None:
            skips.record([
                Skip(r.id, r.video, r.origin, f"no F_V in the feature set {features.uri} "
                     "(feature extraction skipped it)") for r in absent
            ], read=dataset.ids)
        if not self.items:
            raise InvalidInput(f"features {features.uri}: none of the data's clips has features")
        self.latents: dict[str, Tensor] = {}
        self.eval_latents: dict[str, Tensor] = {}
        self.captions = dict(zip(dataset.ids, dataset.static_captions, strict=True))

    def caption(self, ids: Sequence[str]) -> list[str]:
        return [self.captions[i] for i in ids]


# --- evaluation -----------------------------------------------------------------


@torch.no_grad()
def evaluate(
    teacher: DiffusionTeacher, adapter: Adapter, data: Stage1Data, config: Stage1Config
) -> float:
    """Mean denoising loss on the fixed evaluation set: fixed clips, timesteps and noise."""
    ids = list(data.eval_latents)
    text_emb = teacher.encode_text(data.caption(ids)) if config.train.text else None
    losses, _ = denoising_loss(
        teacher,
        adapter,
        torch.stack([data.eval_latents[i] for i in ids]),
        text_emb=text_emb,
        features=data.features.get(ids),
        sample_ids=ids,
        seed=config.eval.seed,
        timesteps=config.eval.timesteps,
        draws=list(range(len(config.eval.timesteps))),
    )
    return losses.mean().item()


# --- the job -------------------------------------------------------------------


def feature_frame_tokens(features: FeatureSet) -> int:
    """F_V tokens per student frame of a feature set: its encoder's ``tokens_per_frame``.

    Read from the pooling the set was extracted with (``"frame"``: 1, ``"grid:G"``:
    G * G), so the adapter's ``frame_tokens`` always matches its training features.
    """
    pooling = features.source.get("pooling", "frame")
    try:
        grid = _parse_pooling(pooling)
    except InvalidInput as e:
        raise InvalidInput(f"features {features.uri}: {e}") from e
    return 1 if grid is None else grid * grid


def _build_adapter(config: Stage1Config, teacher: DiffusionTeacher, features: FeatureSet) -> Adapter:
    adapter = Adapter.create(
        d_v=features.d_v,
        cond_dim=teacher.cond_dim,
        projection=config.adapter.projection,
        lora_rank=config.adapter.lora_rank,
        lora_alpha=config.adapter.lora_alpha,
        teacher_family=teacher.family,
        seed=config.adapter.seed,
        teacher=teacher if config.adapter.lora_rank else None,
        conditioning=config.adapter.conditioning,
        frame_tokens=feature_frame_tokens(features),
        max_frames=config.adapter.max_frames,
        spatial_channels=teacher.spatial_channels,
    )
    # Fail now, not at the first step, if F_V does not fit the adapter's frame layout.
    adapter.student_frames(torch.empty(1, features.tokens, features.d_v, device="meta"))
    return adapter


class Stage1(Job):
    """W_proj + UNet LoRA on the in-process teacher (module docstring)."""

    name = "stage1"

    def __init__(self, config: Stage1Config, teacher: DiffusionTeacher | None = None) -> None:
        super().__init__(config)
        self.teacher = teacher
        self.lora: str | None = None
        self.evaluations: dict[int, float] = {}

    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        config, ranks = self.config, ctx.ranks
        self.ctx = ctx
        if self.teacher is None:
            sources: dict[str, str | None] = {}
            if config.teacher.weights:
                sources = {
                    "base": weights_component(config.teacher.weights, "base"),
                    "motion_adapter": weights_component(config.teacher.weights, "motion_adapter"),
                }
            self.teacher = load_teacher(
                config.teacher.model, device=ctx.device,
                dtype=precision_dtype(config.teacher.dtype or config.train.precision), **sources,
            )
        teacher = self.teacher
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(teacher.unet)
        features = load_features(config.features)
        if features.source.get("data") != to_dict(config.data):
            # Clip ids alone do not pin the pixels (frames, size): say so, but let it run.
            log.warning("features_data_differs", features=features.uri,
                        extracted_from=features.source.get("data"), training_on=to_dict(config.data))
        dataset = open_dataset(config.data)
        self.skips = dataset.skip_log(ctx.run.store, ranks)
        self.data = data = Stage1Data(dataset, features, self.skips if ranks.main else None)
        self.view = View(config.teacher.frames or teacher.frames, teacher.resolution)
        # Clips held in memory: rank 0 encodes and commits every clip's latents once, the
        # other ranks read them. Clips read from files are encoded step by step instead.
        if dataset.in_memory:
            if ranks.world_size > 1 and not ranks.main:
                dist.barrier()
            data.latents = cached_latents(ctx.run.store, teacher, config.teacher.model, dataset,
                                          data.items, config.data, ranks, self.view, self.skips)
            if ranks.world_size > 1 and ranks.main:
                dist.barrier()
        # The fixed evaluation set: the first eval.num_clips clips, on rank 0.
        eval_ids = [dataset.ids[k] for k in data.items[: config.eval.num_clips]] if ranks.main else []
        if dataset.in_memory:
            data.eval_latents = {i: data.latents[i] for i in eval_ids}
        else:
            data.eval_latents = encode_latents(teacher, dataset, data.items[: len(eval_ids)], self.view)

        adapter = self.adapter = _build_adapter(config, teacher, features)
        if checkpoint is not None:
            adapter.proj.load_state_dict(checkpoint.weights("proj"))
            if adapter.lora_rank:
                adapter.lora_state = checkpoint.weights("lora")
        adapter.to(ctx.device)
        if adapter.lora_rank:
            self.lora = adapter.lora_name
            teacher.attach_lora(self.lora, adapter.lora_config(), adapter.lora_state)
        lora_params = teacher.lora_parameters(self.lora) if self.lora else []
        for p in lora_params:
            p.requires_grad_(True)
            p.data = p.data.float()  # master weights, whatever the UNet's storage
        adapter.requires_grad_(True)
        trainable = list(adapter.parameters()) + lora_params
        optimizer = torch.optim.AdamW(
            trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        return Built(Stage1Model(teacher, adapter, config.train.precision), optimizer, info={
            "teacher": config.teacher.model,
            "features": features.uri,
            "clips": len(data.items),
            "d_v": adapter.d_v,
            "projection": adapter.projection,
            "lora_rank": adapter.lora_rank,
            "conditioning": adapter.conditioning,
            "frame_tokens": adapter.frame_tokens,
        })

    def _evaluate(self, step: int, force: bool) -> float | None:
        every = self.config.eval.every
        if not self.config.eval.num_clips or not self.ctx.main:
            return None
        if not force and not (every and step % every == 0):
            return None
        self.evaluations[step] = evaluate(self.teacher, self.adapter, self.data, self.config)
        return self.evaluations[step]

    def on_start(self, start: int) -> None:
        if start == 0 and (value := self._evaluate(0, force=True)) is not None:
            log.info("stage1_eval", step=0, eval_loss=round(value, 6))
        train, data = self.config.train, self.data
        plan = [
            self.ctx.local(epoch_order(len(data.items), step, train.batch_size, train.seed), train.batch_size)
            for step in range(start, train.steps)
        ]
        views = {} if data.dataset.in_memory else {"teacher": self.view}
        self.feed = data.dataset.feed(data.items, views, plan, skips=self.skips)

    def step(self, model, step: int) -> StepOutput:
        train, data = self.config.train, self.data
        fed = next(self.feed)
        ids = fed.ids
        if data.dataset.in_memory:
            latents = torch.stack([data.latents[i] for i in ids])
        else:
            with torch.no_grad():
                latents = self.teacher.encode_video(fed.views["teacher"])
        text_emb = self.teacher.encode_text(data.caption(ids)) if train.text else None
        per_sample = model(
            latents,
            text_emb,
            data.features.get(ids),
            ids,
            step_seed(train.seed, step),
            train.num_draws,
            tuple(train.timestep_range),
        )
        return StepOutput(per_sample.mean())

    def after_step(self, step: int, last: bool) -> dict[str, float]:
        value = self._evaluate(step, force=last)
        return {} if value is None else {"eval_loss": round(value, 6)}

    def weights(self) -> dict[str, dict[str, Tensor]]:
        lora = {"lora": self.teacher.lora_state_dict(self.lora)} if self.lora else {}
        return {"proj": self.adapter.proj.state_dict()} | lora

    def checkpoint_meta(self) -> dict:
        return {"teacher_model": self.config.teacher.model}

    def export(self, final: Checkpoint) -> None:
        """W_proj + the trained LoRA (peft format) as ``<output.dir>/adapter``."""
        config, adapter = self.config, self.adapter
        if self.lora is not None:
            adapter.lora_state = self.teacher.lora_state_dict(self.lora)
        with tempfile.TemporaryDirectory(prefix="vidalign-adapter-") as tmp:
            path = Path(tmp) / ADAPTER_FILE
            adapter_id = adapter.save(path)
            commit_artifact(
                self.ctx.run.store,
                ADAPTER,
                {ADAPTER_FILE: path},
                producer=self.producer,
                config_digest=self.ctx.config_digest,
                step=final.step,
                meta={
                    "adapter_id": adapter_id,
                    "teacher_model": config.teacher.model,
                    "features": config.features,
                    "projection": adapter.projection,
                    "lora_rank": adapter.lora_rank,
                    "conditioning": adapter.conditioning,
                    "text": config.train.text,
                },
            )
        log.info("stage1_adapter", eval_losses=self.evaluations, adapter=self.adapter_uri)

    @property
    def adapter_uri(self) -> str:
        return f"{self.ctx.run.store.uri}/{ADAPTER}/{ADAPTER_FILE}"

    def close(self) -> None:
        if getattr(self, "feed", None) is not None:
            self.feed.close()
        if self.lora is not None and self.teacher is not None:
            self.teacher.detach_lora(self.lora)


def run_stage1(
    config: Stage1Config, *, resume: bool = False, teacher: DiffusionTeacher | None = None
) -> Stage1Result:
    """Train W_proj + LoRA; commit ``<output.dir>/adapter``. ``teacher`` lets a caller share one."""
    job = Stage1(config, teacher)
    result = fit(job, resume=resume)
    return Stage1Result(losses=result.losses, eval_losses=job.evaluations, adapter_uri=job.adapter_uri)
