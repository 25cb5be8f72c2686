"""VDA stage 3: instruction-tune the student's LLM with LoRA, the video encoder frozen.

    E_phi  <- stage-2 encoder (``<stage2 out>/encoder``, ``encoder.safetensors``)
    L      = CE(LLM_{theta + LoRA}(chat(video, prompt)), target)   (target tokens only)
    LoRA   <- AdamW(LoRA, dL/dLoRA)                                   (rank 16, alpha 32)

Everything but the LoRA matrices on the LLM's q/k/v/o projections is frozen:
the encoder E_phi, the projector, the LLM. Training pairs are the clips'
captions ("Describe the video." -> caption; VDA's stage 3: the captions of the
same clips stages 1 and 2 saw, ``data.tasks: [caption]`` on their records or
shards) and questions: for the toy clips "Which direction does the square
move?" -> direction; for SynthMotion, MotionBench-layout sets and shards made
from them, every question with the prompt the evaluation gives (MotionBench's)
-> the option's text and letter, "stays still (C)"
(``vidalign.data.synthset.ANSWER_FORMAT``); for MotionVid-QA the chosen
answer. Each pair is rendered with the student's own chat template; videos
are decoded by ``data.workers`` processes (``vidalign_trainer.common``).

Every source of randomness is a function of the config: batch order of step s
is a function of (seed, s), LoRA init of ``train.seed`` (drawn inside
``fork_rng``), and a resumed run repeats an uninterrupted one from its
checkpoint on. Output: checkpoints (LoRA weights, optimizer, RNG) under
``<out>/checkpoints``; the final adapter in peft's own format as the store
artifact ``<out>/lora`` (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable with ``peft.PeftModel.from_pretrained(base_model, dir)``); with
``output.merge``, the merged model (``save_pretrained`` + tokenizer) as
``<out>/merged``.

Under torchrun each rank trains on its slice of every batch and DDP averages
the LoRA gradients (the loop, resume, checkpoints and metrics are
``vidalign_trainer.loop``'s). With ``deepspeed.enabled: true`` the student
and this AdamW are wrapped in a DeepSpeed ZeRO-1/2/3 engine instead
(``vidalign_trainer.zero``; DeepSpeed clips to ``train.grad_clip``), under
plain ``python``, ``torchrun`` or the ``deepspeed`` launcher. At stage 3 the
frozen LLM and encoder are partitioned over the ranks too; the checkpointed
LoRA weights and the committed adapter are gathered whole, and after the last
step the student is whole again on every rank (``output.merge`` and the
returned model as without DeepSpeed). A ZeRO checkpoint holds every rank's
optimizer state: a resume needs the same ``deepspeed`` settings and number of
ranks (refused otherwise).

Run: ``vidalign train stage3 --config configs/stage3-tiny.yaml [--resume]``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidalign.checkpoint import Checkpoint
from vidalign.errors import InvalidInput
from vidalign.papers import VDA_LORA_RANK
from vidalign.precision import (
    autocast,
    enable_gradient_checkpointing,
    keep_trainable_fp32,
    precision_dtype,
)
from vidalign.store import commit_artifact
from vidalign.students.answerer import load_encoder_artifact
from vidalign.students.videollm import VideoLLM, load_videollm
from vidalign_trainer.common import InstructionDataConfig, Instructions, epoch_order
from vidalign_trainer.loop import Built, Context, Job, StepOutput, StudentSection, fit
from vidalign_trainer.loop import OutputConfig as BaseOutputConfig
from vidalign_trainer.loop import TrainConfig as BaseTrainConfig
from vidalign_trainer.zero import DeepSpeedConfig

LLM_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
"""LoRA targets: the LLM's attention projections (never the vision tower's)."""



@dataclass(kw_only=True)
class DataConfig(InstructionDataConfig):
    num_clips: int = 16


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = VDA_LORA_RANK
    """LoRA rank r (VDA: 16)."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.0
    target_modules: str = LLM_ATTENTION
    """Regex over module names (peft ``target_modules``); the default is the LLM's q/k/v/o."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora.rank must be >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1")


@dataclass(kw_only=True)
class TrainConfig(BaseTrainConfig):
    lr: float = 1e-4
    """AdamW learning rate; VDA uses 1e-5 on real models, toy runs need more."""


@dataclass(kw_only=True)
class OutputConfig(BaseOutputConfig):
    dir: str = "runs/stage3"
    merge: bool = False
    """Also commit the model with LoRA merged in (``<dir>/merged``)."""


@dataclass(kw_only=True)
class Stage3Config(StudentSection):
    encoder: str = ""
    """Stage-2 encoder: store URI of the artifact (``<stage2 out>/encoder``), a directory holding
    ``encoder.safetensors``, or the file; empty keeps the student's own encoder."""
    device: str = "cpu"
    """Device of the student (``cuda`` picks ``cuda:LOCAL_RANK`` under torchrun)."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """``enabled: true``: train through a DeepSpeed ZeRO engine (``vidalign_trainer.zero``)."""


@dataclass
class Stage3Result:
    losses: list[float]
    """Mean loss of each step run by this call."""
    videollm: VideoLLM
    """The trained student; ``videollm.model`` is the ``PeftModel`` (merged when ``output.merge``)."""


def load_student_for_stage3(config: Stage3Config, device: str | None = None) -> VideoLLM:
    """The student with its stage-2 encoder in place and everything frozen (no LoRA yet)."""
    llm = load_videollm(config.student, device=device or config.device, path=config.student_path(),
                        dtype=precision_dtype(config.train.precision))
    if config.encoder:
        llm.load_encoder_state(load_encoder_artifact(config.encoder))
    llm.model.requires_grad_(False)
    return llm


def apply_lora(llm: VideoLLM, config: LoraConfig, seed: int) -> None:
    """Wrap ``llm.model`` in a peft LoRA model; its initialisation is fixed by ``seed``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm.model = get_peft_model(llm.model, peft_config)
    names = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    if not names or any("lora_" not in n for n in names):
        raise InvalidInput(
            f"lora.target_modules {config.target_modules!r} matched no module or non-LoRA params"
        )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class CaptionLoss(torch.nn.Module):
    """The student's cross-entropy on (video, prompt, target) as a module's forward (for DDP),
    under autocast at ``precision``."""

    def __init__(self, llm: VideoLLM, precision: str = "fp32") -> None:
        super().__init__()
        self.model = llm.model
        self.llm = llm  # not a Module: a plain attribute
        self.precision = precision

    def forward(self, video: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        with autocast(self.precision, self.llm.device):
            return self.llm.loss(video, prompts, targets).float()


class Stage3(Job):
    """LoRA on the student's LLM, cross-entropy on captions and QA (module docstring)."""

    name = "stage3"

    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        config = self.config
        self.ctx = ctx
        llm = self.llm = load_student_for_stage3(config, device=str(ctx.device))
        apply_lora(llm, config.lora, config.train.seed)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(llm.model)
        model = llm.model
        model.train()
        if checkpoint is not None:
            saved = checkpoint.weights("lora")
            expected = trainable_state(model).keys()
            if saved.keys() != expected:
                raise InvalidInput(
                    f"checkpoint {checkpoint.name}: LoRA weights do not match this config "
                    f"({len(saved.keys() - expected)} unexpected, {len(expected - saved.keys())} missing)"
                )
            model.load_state_dict(saved, strict=False)
        keep_trainable_fp32(model)  # the LoRA matrices are the master weights
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        self.data = Instructions(config.data)
        self.skips = self.data.data.skip_log(ctx.run.store, ctx.ranks)
        return Built(CaptionLoss(llm, config.train.precision), optimizer, info={
            "student": config.student,
            "encoder": config.encoder or "(student's own)",
            "examples": len(self.data),
        })

    def on_start(self, start: int) -> None:
        train = self.config.train
        plan = [self.ctx.local(epoch_order(len(self.data), step, train.batch_size, train.seed),
                               train.batch_size) for step in range(start, train.steps)]
        self.batches = self.data.feed(plan, self.skips)

    def step(self, model, step: int) -> StepOutput:
        batch = next(self.batches)
        return StepOutput(model(batch.video, batch.prompts, batch.targets))

    def close(self) -> None:
        if getattr(self, "batches", None) is not None:
            self.batches.close()

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": trainable_state(self.llm.model)}

    def export(self, final: Checkpoint) -> None:
        config, store, model = self.config, self.ctx.run.store, self.llm.model
        model.eval()
        meta = {"student": config.student, "encoder": config.encoder, "lora_rank": config.lora.rank}
        with tempfile.TemporaryDirectory(prefix="vidalign-lora-") as tmp:
            model.save_pretrained(tmp)
            files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
            commit_artifact(store, "lora", files, producer=self.producer,
                            config_digest=self.ctx.config_digest, step=final.step, meta=meta)
        if config.output.merge:
            self.llm.model = model.merge_and_unload()
            with tempfile.TemporaryDirectory(prefix="vidalign-merged-") as tmp:
                self.llm.model.save_pretrained(tmp)
                self.llm.tokenizer.save_pretrained(tmp)
                files = {str(p.relative_to(tmp)): p for p in Path(tmp).rglob("*") if p.is_file()}
                commit_artifact(store, "merged", files, producer=self.producer,
                                config_digest=self.ctx.config_digest, step=final.step, meta=meta)


def run_stage3(config: Stage3Config, *, resume: bool = False) -> Stage3Result:
    """Train LoRA on the student's LLM; returns the step losses and the trained student."""
    job = Stage3(config)
    result = fit(job, resume=resume)
    job.llm.model.eval()
    return Stage3Result(losses=result.losses, videollm=job.llm)
