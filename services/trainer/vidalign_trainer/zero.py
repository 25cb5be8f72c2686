"""DeepSpeed ZeRO for the trainer jobs: the ``deepspeed`` config section and the engine.

A job with ``deepspeed.enabled: true`` builds its trainable module, its own
torch optimizer (parameter groups with their learning rates and weight decay)
and its LR scheduler exactly as without DeepSpeed, then hands them to
:func:`initialize`, which wraps them in a DeepSpeed engine with a config built
here::

    zero = initialize(module, optimizer, scheduler, config=config.deepspeed, ranks=ranks,
                      device=device, micro_batch_size=per_rank, grad_clip=config.train.grad_clip)
    loss = loss_fn(zero(inputs))     # the engine's forward (the module's)
    zero.backward(loss)              # gradients reduced (and, at stage 2, partitioned) over ranks
    grad_norm = zero.step()          # clip to grad_clip, optimizer step, scheduler step

ZeRO stage 1 partitions the optimizer state over the data-parallel ranks,
stage 2 the gradients too; every rank keeps the whole (trainable) module, so
its ``state_dict`` is whole and the jobs save their weights as without
DeepSpeed. Stage 3 partitions the parameters too (SFT and VDA stage 3; stage 2
stays at 1/2, ``DeepSpeedStage12Config``): between forwards each rank holds
only its slice of every parameter of at least ``param_persistence_threshold``
elements (DeepSpeed's ``stage3_param_persistence_threshold``; smaller ones stay
whole everywhere), and DeepSpeed's hooks gather a module's parameters around
its forward and backward, whether it is called through the engine or directly
(the jobs' evaluations). The skeleton keeps what leaves the run whole::

    weights = zero.consolidated(job.weights)   # every rank: gather the trainable
                                               # parameters; rank 0 copies them to CPU
    zero.consolidate_module()                  # after the last step, every rank: the
                                               # module whole again, DeepSpeed's hooks removed

so checkpoints and the committed models (SFT's ``model``, stage 3's ``lora``)
are ordinary whole safetensors, loadable without DeepSpeed, and the job's
evaluation, export and returned models after the last step are plain torch
modules. Gathering is collective: every rank calls both (``consolidated``
holds every trainable parameter whole on every rank while rank 0 copies them;
``consolidate_module`` gathers one module's parameters at a time). A job loads a
checkpoint's whole weights in ``build``, before :func:`initialize` partitions
the module (DeepSpeed broadcasts rank 0's values as it converts the
parameters). ``consolidate_module`` holds the whole module on every rank from
then on, as stages 1 and 2 do throughout.

``train.precision`` bf16 / fp16 turns on DeepSpeed's own ``bf16`` / ``fp16``
section (fp32 master weights in the ZeRO optimizer; fp16 with dynamic loss
scaling) at every stage; the jobs' forwards run under autocast as without
DeepSpeed. The engine stores the module's parameters in that half type, so the
checkpointed and committed weights are in it too; the fp32 master weights are
in the optimizer state.

Gradient clipping is DeepSpeed's (``gradient_clipping`` = ``train.grad_clip``);
a job must not clip again. :meth:`ZeroEngine.step` returns the global gradient
norm before clipping, as ``clip_grad_norm_`` does. A trainable parameter that
no gradient reaches gets a zero gradient from DeepSpeed (at every stage), so
AdamW's decoupled weight decay still shrinks it, where plain torch skips it.

Checkpoints: :meth:`ZeroEngine.optimizer_state` gathers every rank's ZeRO
optimizer state (DeepSpeed's own ``state_dict``: the rank's partition of the
fp32 master weights and of AdamW's moments, its param-group hyperparameters)
onto rank 0, which saves the list in ``optimizer.pt``;
:meth:`ZeroEngine.load_optimizer_state` gives each rank its own entry back.
At stage 3 that state holds the rank's slice of the fp32 master weights of
every trainable parameter; a resume restores the parameters' slices from it.
A resume therefore needs the same ZeRO stage and number of ranks as the run
that wrote the checkpoint, and a checkpoint written without DeepSpeed (a plain
torch optimizer state) resumes only without it; both are refused with
``FailedPrecondition`` naming the setting.

World size 1 (plain ``python``) needs no launcher: a one-rank process group is
created here (and destroyed by :meth:`ZeroEngine.close`). Under ``torchrun``
or the ``deepspeed`` launcher the job's process group (``common.init_distributed``)
is used. ``deepspeed`` is imported only when a job enables it. On a cold
``TORCH_EXTENSIONS_DIR`` DeepSpeed compiles its CPU shm-comm op the first time
(about a minute on 2 cores).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from vidalign.errors import FailedPrecondition, InvalidInput
from vidalign.precision import precision_name
from vidalign_trainer.common import Dist

STAGES = (1, 2, 3)
FORMAT = "deepspeed-zero"
"""``optimizer.pt`` of a checkpoint written under ZeRO: ``{"format": FORMAT, ...}``."""


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """The ``deepspeed`` section of a trainer job's config."""

    stages: ClassVar[tuple[int, ...]] = STAGES
    """The ZeRO stages of the job whose section this is."""
    unsupported: ClassVar[str] = ""
    """Why the stages not in ``stages`` are refused (appended to the error)."""

    enabled: bool = False
    """Train through a DeepSpeed ZeRO engine; false: plain torch (and DDP under torchrun)."""
    zero_stage: int = 2
    """1: optimizer state partitioned over the ranks; 2: gradients too; 3: parameters too
    (checkpoints and committed models are still whole: gathered on save)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction (and all-gather) bucket: DeepSpeed's default."""
    param_persistence_threshold: int = 100_000
    """Stage 3: parameters with fewer elements are not partitioned (each rank keeps them
    whole; DeepSpeed's ``stage3_param_persistence_threshold``, its default); 0 partitions
    every parameter."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.zero_stage not in self.stages:
            raise InvalidInput(
                f"deepspeed.zero_stage: expected one of {list(self.stages)}, got {self.zero_stage}"
                + (f" ({self.unsupported})" if self.unsupported and self.zero_stage in STAGES else "")
            )
        if self.reduce_bucket_size < 1:
            raise InvalidInput(
                f"deepspeed.reduce_bucket_size: expected >= 1, got {self.reduce_bucket_size}"
            )
        if self.param_persistence_threshold < 0:
            raise InvalidInput(
                "deepspeed.param_persistence_threshold: expected >= 0, got "
                f"{self.param_persistence_threshold}"
            )


@dataclass(kw_only=True)
class DeepSpeedStage12Config(DeepSpeedConfig):
    """The ``deepspeed`` section of a job that runs ZeRO-1/2 only (VDA stage 2)."""

    stages: ClassVar[tuple[int, ...]] = (1, 2)
    unsupported: ClassVar[str] = (
        "stage 3 partitions the parameters, and this job checkpoints the student's whole "
        "encoder, frozen weights included, which ZeRO-3 would hold as shards; use 1 or 2"
    )


def engine_config(
    config: DeepSpeedConfig, *, micro_batch_size: int, grad_clip: float, precision: str = "fp32"
) -> dict[str, Any]:
    """The DeepSpeed config dict of a job: one optimizer step per batch, in ``precision``
    (bf16 / fp16: DeepSpeed's own section, which keeps fp32 master weights in the
    optimizer; fp16 with dynamic loss scaling)."""
    name = precision_name(precision, "train.precision")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        "zero_optimization": {
            "stage": config.zero_stage,
            "reduce_bucket_size": config.reduce_bucket_size,
            "allgather_bucket_size": config.reduce_bucket_size,
            "contiguous_gradients": True,
            **({"stage3_param_persistence_threshold": config.param_persistence_threshold}
               if config.zero_stage == 3 else {}),
        },
        "fp16": {"enabled": name == "fp16", **({"loss_scale": 0, "initial_scale_power": 16}
                                                 if name == "fp16" else {})},
        "bf16": {"enabled": name == "bf16"},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


W = TypeVar("W")


def _copy_to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (a copy even where it is there already)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _copy_to_cpu(v)) for k, v in obj.items())
    return obj


def _partitioned(obj: Any) -> list[str]:
    """Keys of the empty tensors in ``{stem: {name: tensor}}``: ZeRO-3 placeholders."""
    return [f"{stem}/{name}" for stem, tensors in obj.items()
            for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.numel() == 0]


def is_zero_state(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def require_plain_state(state: Any, checkpoint: str) -> Any:
    """``state`` (a checkpoint's optimizer state) for a run without DeepSpeed."""
    if is_zero_state(state):
        raise FailedPrecondition(
            f"checkpoint {checkpoint} holds a DeepSpeed ZeRO-{state['zero_stage']} optimizer "
            f"state over {state['world_size']} rank(s): resume it with deepspeed.enabled: true, "
            f"deepspeed.zero_stage: {state['zero_stage']} and {state['world_size']} rank(s)"
        )
    return state


class ZeroEngine:
    """A DeepSpeed engine as the jobs use it (see the module docstring)."""

    def __init__(self, engine: Any, *, config: DeepSpeedConfig, ranks: Dist, owns_group: bool):
        self.engine = engine
        self.config = config
        self.ranks = ranks
        self._owns_group = owns_group

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer; its ``param_groups`` are the job's optimizer's."""
        return self.engine.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    @property
    def stage(self) -> int:
        return self.config.zero_stage

    @contextmanager
    def gathered(self, params: list[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Stage 3: ``params`` (default: the module's trainable ones) whole on every rank
        inside; partitioned again on exit, any change discarded. Collective: every rank
        enters with the same parameters. Stages 1 and 2: nothing to do."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        if params is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def consolidated(self, weights: Callable[[], W]) -> W | None:
        """``weights()`` (a job's ``{file stem: state dict}``) with whole tensors, on rank 0
        (None elsewhere). Collective at stage 3: every rank gathers the trainable
        parameters, rank 0 calls ``weights`` inside and copies the result to the CPU before
        they are partitioned again. Stages 1 and 2: ``weights()`` on rank 0."""
        if self.stage < 3:
            return weights() if self.ranks.main else None
        with self.gathered():
            out = _copy_to_cpu(weights()) if self.ranks.main else None
        if out is not None and (empty := _partitioned(out)):
            raise RuntimeError(
                f"ZeRO-3: the job's weights hold partitioned (empty) tensors {empty[:3]}: "
                "weights() must return trainable parameters only"
            )
        return out

    def consolidate_module(self) -> None:
        """Stage 3, after the last step: make every parameter of the module whole again on
        every rank and remove DeepSpeed's hooks, so that what runs after training
        (evaluation, export, the job's returned model) sees a plain torch module. Collective;
        the engine must not step after it. Stages 1 and 2: nothing to do."""
        if self.stage < 3:
            return
        import deepspeed

        module = self.module
        whole: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        for m in module.modules():  # one module's parameters gathered at a time
            own = [p for p in m.parameters(recurse=False) if id(p) not in whole]
            if own:  # the same modules, in the same order, on every rank
                with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                    whole.update((id(p), (p, p.data.clone())) for p in own)
        self.engine.destroy()  # removes DeepSpeed's module and gradient hooks
        for m in module.modules():  # DeepSpeed's ZeROOrderedDict back to a plain dict
            if hasattr(m, "_original_parameters"):
                m._parameters = dict(m._parameters)
                del m._original_parameters
        for p, data in whole.values():
            p.data = data

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip, step the optimizer and the scheduler; the gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def optimizer_state(self) -> dict[str, Any] | None:
        """Every rank's ZeRO optimizer state, on rank 0 (None elsewhere). Collective."""
        own = _to_cpu(self.engine.optimizer.state_dict())
        if self.ranks.world_size > 1:
            gathered: list[Any] | None = [None] * self.ranks.world_size if self.ranks.main else None
            dist.gather_object(own, gathered, dst=0)
        else:
            gathered = [own]
        if not self.ranks.main:
            return None
        return {
            "format": FORMAT,
            "zero_stage": self.config.zero_stage,
            "world_size": self.ranks.world_size,
            "ranks": gathered,
        }

    def load_optimizer_state(self, state: Any, checkpoint: str) -> None:
        """Restore what :meth:`optimizer_state` saved (each rank takes its own entry)."""
        if not is_zero_state(state):
            raise FailedPrecondition(
                f"checkpoint {checkpoint} holds a plain torch optimizer state (written with "
                "deepspeed.enabled: false): resume it with deepspeed.enabled: false"
            )
        if state["zero_stage"] != self.config.zero_stage:
            raise FailedPrecondition(
                f"checkpoint {checkpoint} was written with deepspeed.zero_stage: "
                f"{state['zero_stage']}, this run has {self.config.zero_stage}"
            )
        if state["world_size"] != self.ranks.world_size:
            raise FailedPrecondition(
                f"checkpoint {checkpoint} holds ZeRO optimizer state partitioned over "
                f"{state['world_size']} rank(s); this run has {self.ranks.world_size}: resume "
                f"with {state['world_size']} rank(s)"
            )
        self.engine.optimizer.load_state_dict(
            state["ranks"], load_optimizer_states=True, load_from_fp32_weights=True
        )

    def close(self) -> None:
        """Destroy the one-rank process group :func:`initialize` created (if it did), through
        DeepSpeed, so that its cached groups go with it: a second engine in this process
        would otherwise find the first one's dead group."""
        if self._owns_group and dist.is_initialized():
            import deepspeed.comm

            if deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        self._owns_group = False


def initialize(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    config: DeepSpeedConfig,
    ranks: Dist,
    device: torch.device,
    micro_batch_size: int,
    grad_clip: float,
    precision: str = "fp32",
) -> ZeroEngine:
    """Wrap ``module`` and the job's ``optimizer`` (and ``scheduler``) in a ZeRO engine."""
    config.check()
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - deepspeed is a dependency
        raise FailedPrecondition(
            f"deepspeed.enabled: true needs the deepspeed package ({err})"
        ) from None
    owns_group = False
    if not dist.is_initialized():
        if ranks.world_size > 1:
            raise FailedPrecondition("deepspeed: the process group of the ranks is not initialized")
        # One rank, no launcher: a process group of one without a rendezvous.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns_group = True
    # DeepSpeed's engine reads LOCAL_RANK from the environment (torchrun and the
    # deepspeed launcher set it).
    os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
    if device.type == "cpu":
        # With LOCAL_SIZE == WORLD_SIZE (the deepspeed launcher sets it) DeepSpeed's CPU
        # comm op maps a /dev/shm segment, for inference all-reduce only, and never
        # unlinks it; training does not use it.
        os.environ.pop("LOCAL_SIZE", None)
    try:
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=engine_config(config, micro_batch_size=micro_batch_size, grad_clip=grad_clip,
                                 precision=precision),
        )
    except BaseException:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
        raise
    return ZeroEngine(engine, config=config, ranks=ranks, owns_group=owns_group)
