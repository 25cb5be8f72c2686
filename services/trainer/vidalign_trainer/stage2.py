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
same ``deepspeed`` settings and number of ranks (refused otherwise). The loop,
resume, checkpoints, metrics and ranks are ``vidalign_trainer.loop``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vidalign.checkpoint import Checkpoint
from vidalign.data.videoset import View
from vidalign.errors import InvalidInput
from vidalign.log import get_logger
from vidalign.papers import VDA_TIMESTEP_RANGE
from vidalign.precision import autocast, enable_gradient_checkpointing
from vidalign.store import commit_artifact, materialize
from vidalign.students import load_student
from vidalign.teacher.client import DEFAULT_WAIT_S, RemoteDenoisingLoss, Teacher, connect
from vidalign.teacher.credentials import TeacherCredentials, tls_files_problem
from vidalign.teacher.protocol import public_name
from vidalign.vda.adapter import Adapter, file_digest
from vidalign_trainer.common import DataConfig, open_dataset, step_seed
from vidalign_trainer.loop import (
    Built,
    Context,
    Job,
    OutputConfig,
    StepOutput,
    StudentSection,
    TeacherSection,
    fit,
)
from vidalign_trainer.loop import TrainConfig as BaseTrainConfig
from vidalign_trainer.zero import DeepSpeedStage12Config

log = get_logger(__name__)


@dataclass(kw_only=True)
class TeacherConfig(TeacherSection):
    """The teacher stage 2 calls: in this process or a ``vidalign teacher serve``."""

    address: str = "local"
    """``local`` (in this process), ``host:port`` or ``dns:///name:port``."""
    adapter: str = ""
    """Adapter file or store URI (its digest is sent), or an id ``sha256:<hex>`` the server has loaded."""
    timeout_s: float = 600.0
    """Deadline of one teacher call."""
    wait_s: float = DEFAULT_WAIT_S
    """How long a call that finds the teacher UNAVAILABLE (restarting, loading, draining; with
    several replicas: all of them) waits for it to come back: backoff from 0.5 s doubling to
    10 s, jittered, polling its health and resending once it is SERVING; 0: fail at once."""
    retries: int | None = None
    """Deprecated: use ``wait_s``. If set, ``wait_s`` becomes the time its backoff took
    (0.5 s doubling: 5 retries, 15.5 s)."""
    tls_ca: str = ""
    """PEM CA file that signed the teacher's certificate: connect over TLS; empty: plaintext."""
    tls_cert: str = ""
    """PEM client certificate file, for a teacher that requires mutual TLS (with ``tls_key``)."""
    tls_key: str = ""
    """PEM private key file of ``tls_cert``."""
    token_file: str = ""
    """File holding the teacher's bearer token; empty: ``VIDALIGN_TEACHER_TOKEN`` if set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retries is not None:
            if self.retries < 0:
                raise ValueError(f"teacher.retries must be >= 0, got {self.retries}")
            self.wait_s = sum(min(30.0, 0.5 * 2**i) for i in range(self.retries))
            log.warning("config_deprecated", key="teacher.retries", use="teacher.wait_s",
                        wait_s=self.wait_s)
        if self.wait_s < 0:
            raise ValueError(f"teacher.wait_s must be >= 0, got {self.wait_s}")
        problem = tls_files_problem(cert=self.tls_cert, key=self.tls_key, prefix="teacher.")
        if problem:
            raise ValueError(problem)

    def credentials(self) -> TeacherCredentials | None:
        """What ``connect`` presents to a remote teacher (files read now); None in process."""
        if self.address == "local":
            return None
        return TeacherCredentials.load(tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                                       tls_key=self.tls_key, token_file=self.token_file,
                                       prefix="teacher.")


@dataclass(kw_only=True)
class TrainConfig(BaseTrainConfig):
    num_draws: int = 1
    """Noise draws K per sample per step."""
    timestep_range: list[int] = field(default_factory=lambda: list(VDA_TIMESTEP_RANGE))
    """Timesteps are drawn uniformly from [min, max)."""
    text: bool = True
    """Condition the teacher on the static caption; false is VDA's no-text ablation."""
    mismatch: bool = False
    """Control run: the teacher gets another clip (pixels, caption, id of clip ``(i + N/2) mod N``)
    than the one whose features it is conditioned on, so no gradient can carry that clip's
    motion; what stage 2 then changes in the encoder is not teaching."""
    micro_batches: int = 1
    """Split each batch into this many teacher calls, sent as soon as their features are
    ready, so the teacher works on one while the encoder computes the next."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_draws < 1:
            raise ValueError(f"train.num_draws must be >= 1, got {self.num_draws}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.micro_batches ({self.micro_batches}) must divide train.batch_size "
                f"({self.batch_size})"
            )
        if len(self.timestep_range) != 2 or not 0 <= self.timestep_range[0] < self.timestep_range[1]:
            raise ValueError(f"train.timestep_range must be [min, max), got {self.timestep_range}")


@dataclass(kw_only=True)
class Stage2Config(StudentSection):
    device: str = "cpu"
    """Device of the student (and of the teacher when ``teacher.address`` is ``local``)."""
    pooling: str = "frame"
    """F_V's pooling, ``frame`` or ``grid:G``: the one the stage-1 features were extracted with
    (the adapter's tokens per frame must match; checked at start)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/stage2"))
    deepspeed: DeepSpeedStage12Config = field(default_factory=DeepSpeedStage12Config)
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


def _check_frame_tokens(adapter: str, tokens_per_frame: int, pooling: str) -> None:
    """Refuse, before the first step, F_V pooled otherwise than the adapter was fitted to (an
    adapter given by id alone is checked by the teacher at the first request)."""
    if adapter.startswith("sha256:"):
        return
    fitted = Adapter.load(materialize(adapter)).frame_tokens
    if fitted != tokens_per_frame:
        raise InvalidInput(
            f"pooling: {pooling!r} gives {tokens_per_frame} F_V tokens per frame, but the adapter "
            f"{adapter} was fitted to {fitted}; use the pooling of the stage-1 features"
        )


class Stage2(Job):
    """The encoder E_phi, trained through the teacher's denoising loss (module docstring)."""

    name = "stage2"

    def __init__(self, config: Stage2Config, teacher: Teacher | None = None) -> None:
        super().__init__(config)
        self.teacher = teacher
        self.own_teacher = teacher is None

    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        config = self.config
        self.ctx = ctx
        self.adapter_id = resolve_adapter_id(config.teacher.adapter)
        if self.teacher is None:
            adapter = config.teacher.adapter
            self.teacher = connect(
                config.teacher.address,
                model=config.teacher.model,
                adapters=[] if adapter.startswith("sha256:") else [adapter],
                device=config.device,
                timeout=config.teacher.timeout_s,
                wait_s=config.teacher.wait_s,
                credentials=config.teacher.credentials(),
            )
        self.info = info = self.teacher.info()
        # A remote teacher names a model dir or store URI by its last component only.
        if config.teacher.model and info.model not in (
            config.teacher.model, public_name(config.teacher.model)
        ):
            raise InvalidInput(
                f"teacher at {config.teacher.address} hosts '{info.model}', "
                f"the config asks for '{config.teacher.model}'"
            )
        if self.adapter_id not in {a.id for a in info.adapters}:
            raise InvalidInput(
                f"adapter {self.adapter_id} is not loaded on the teacher "
                f"(loaded: {', '.join(a.id for a in info.adapters) or 'none'})"
            )
        # Nearly all of the encoder trains: float32 weights (the master copy), bf16/fp16
        # compute under autocast in ``step``.
        self.encoder = load_student(config.student, device=str(ctx.device), path=config.student_path(),
                                    pooling=config.pooling)
        _check_frame_tokens(config.teacher.adapter, self.encoder.tokens_per_frame, config.pooling)
        self.encoder.train()
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.encoder)
        if checkpoint is not None:
            self.encoder.load_state_dict(checkpoint.weights("encoder"))
        # Parameters that cannot reach F_V (layers after the feature layer) are
        # frozen by the loader; DDP and ZeRO fail on params that never get a grad.
        trainable = [p for p in self.encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        self.per_rank = config.train.batch_size // ctx.ranks.world_size
        if self.per_rank % config.train.micro_batches:
            raise InvalidInput(
                f"train.micro_batches ({config.train.micro_batches}) must divide the per-rank "
                f"batch ({self.per_rank})"
            )
        self.data = open_dataset(config.data)
        self.skips = self.data.skip_log(ctx.run.store, ctx.ranks)
        self.views = {
            "student": config.data.view,
            "teacher": View(config.teacher.frames or info.frames, info.resolution),
        }
        self.criterion = RemoteDenoisingLoss(
            self.teacher,
            adapter_id=self.adapter_id,
            model=info.model,
            num_draws=config.train.num_draws,
            timestep_range=tuple(config.train.timestep_range),  # type: ignore[arg-type]
        )
        # Several ranks or an engine: one forward per backward, through the wrapper.
        self.whole_forward = ctx.ranks.world_size > 1 or config.deepspeed.enabled
        return Built(self.encoder, optimizer, info={
            "student": config.student,
            "teacher": config.teacher.address,
            "teacher_model": info.model,
            "adapter_id": self.adapter_id,
            "clips": len(self.data),
        })

    def on_start(self, start: int) -> None:
        config, data, n = self.config, self.data, len(self.data)
        plan = []
        for step in range(start, config.train.steps):
            picks = self.ctx.local(data.order(step, config.train.batch_size, config.train.seed),
                                   config.train.batch_size)
            # The teacher's side of the pair: the same clips, or (control) other ones.
            plan.append(picks + [(i + n // 2) % n for i in picks] if config.train.mismatch else picks)
        self.feed = data.feed(range(n), self.views, plan, skips=self.skips)

    def step(self, model, step: int) -> StepOutput:
        config, encoder, device = self.config, self.encoder, self.ctx.device
        fed = next(self.feed)
        seen = slice(self.per_rank, None) if config.train.mismatch else slice(None)
        video = fed.views["student"][: self.per_rank]
        ids, teacher_video = fed.ids[seen], fed.views["teacher"][seen]
        captions = [self.data.static_captions[r] for r in fed.records[seen]] if config.train.text else None
        size = self.per_rank // config.train.micro_batches
        parts = [slice(lo, lo + size) for lo in range(0, self.per_rank, size)]
        precision = config.train.precision
        if self.whole_forward:
            with autocast(precision, device):
                whole = model(encoder.preprocess(video.to(device)))
            features = [whole[part] for part in parts]
        else:
            features = []
        pending = []
        for i, part in enumerate(parts):
            if not self.whole_forward:  # the encoder computes part i+1 while the teacher has part i
                with autocast(precision, device):
                    features.append(model(encoder.preprocess(video[part].to(device))))
            pending.append(self.criterion.submit(
                features[i],
                pixels=teacher_video[part],
                captions=None if captions is None else captions[part],
                sample_ids=ids[part],
                seed=step_seed(config.train.seed, step),
            ))
        tic = time.perf_counter()  # teacher_s: waiting on the teacher after the last send
        # Equal micro-batches: the mean of their means is the batch mean.
        loss = torch.stack([p.result().mean() for p in pending]).mean()
        return StepOutput(loss, timings={"teacher_s": time.perf_counter() - tic})

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"encoder": self.encoder.state_dict()}

    def checkpoint_meta(self) -> dict:
        return {"adapter_id": self.adapter_id, "teacher_model": self.info.model}

    def export(self, final: Checkpoint) -> None:
        commit_artifact(
            self.ctx.run.store,
            "encoder",
            {"encoder.safetensors": final.file("encoder.safetensors")},
            producer=self.producer,
            config_digest=self.ctx.config_digest,
            step=final.step,
            meta={"student": self.config.student, "adapter_id": self.adapter_id,
                  "teacher_model": self.info.model},
        )

    def close(self) -> None:
        if getattr(self, "feed", None) is not None:
            self.feed.close()
        if self.own_teacher and self.teacher is not None:
            self.teacher.close()


def run_stage2(config: Stage2Config, *, resume: bool = False, teacher: Teacher | None = None) -> list[float]:
    """Train; returns the mean loss of each step run by this call."""
    return fit(Stage2(config, teacher), resume=resume).losses
