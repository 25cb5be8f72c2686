"""VDA stage 3: instruction-tune the student's LLM with LoRA, the video encoder frozen.

    E_phi  <- stage-2 encoder (``<stage2 out>/encoder``, ``encoder.safetensors``)
    L      = CE(LLM_{theta + LoRA}(chat(video, prompt)), target)   (target tokens only)
    LoRA   <- AdamW(LoRA, dL/dLoRA)                                   (rank 16, alpha 32)

Everything but the LoRA matrices on the LLM's q/k/v/o projections is frozen:
the encoder E_phi, the projector, the LLM. Training pairs are the clips'
captions ("Describe the video." -> caption) and questions: for the toy clips
"Which direction does the square move?" -> direction, for SynthMotion
(``data.kind: synth``) every question of the directory with the prompt the
evaluation gives (MotionBench's) -> the option's text and letter, "stays still
(C)" (``vidalign.data.synthset.ANSWER_FORMAT``). Each pair is rendered
with the student's own chat template.

Every source of randomness is a function of the config: batch order of step s
is a function of (seed, s), LoRA init of ``train.seed`` (drawn inside
``fork_rng``), and a resumed run repeats an uninterrupted one from its
checkpoint on. Output: checkpoints (LoRA weights, optimizer, RNG) under
``<out>/checkpoints``; the final adapter in peft's own format as the store
artifact ``<out>/lora`` (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable with ``peft.PeftModel.from_pretrained(base_model, dir)``); with
``output.merge``, the merged model (``save_pretrained`` + tokenizer) as
``<out>/merged``.

Run: ``vidalign train stage3 --config configs/stage3-tiny.yaml [--resume]``
(or ``python -m vidalign_trainer.stage3`` with the same arguments).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.checkpoint import rng_state, set_rng_state
from vidalign.config import config_digest, to_dict
from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.run import METRICS, RunDir
from vidalign.store import commit_artifact
from vidalign.students.answerer import load_encoder_artifact
from vidalign.students.videollm import VideoLLM, load_videollm
from vidalign_trainer.common import DataConfig as ClipDataConfig
from vidalign_trainer.common import epoch_order

log = get_logger("vidalign.stage3")

LLM_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
"""LoRA targets: the LLM's attention projections (never the vision tower's)."""

TASKS = ("caption", "qa")
CAPTION_PROMPT = "Describe the video."
QA_PROMPT = "Which direction does the square move?"


@dataclass(kw_only=True)
class DataConfig(ClipDataConfig):
    num_clips: int = 16
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Training pairs per clip: ``caption`` (full caption) and ``qa`` (toy: the direction
    question; synth: every SynthMotion question, prompt and answer letter as evaluated)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise ValueError(
                f"data.tasks: expected a non-empty subset of {list(TASKS)}, got {self.tasks}"
            )


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 16
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
class TrainConfig:
    steps: int = 40
    batch_size: int = 2
    lr: float = 1e-4
    """AdamW learning rate; VDA uses 1e-5 on real models, toy runs need more."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Batch order and LoRA initialisation."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/stage3"
    checkpoint_every: int = 20
    keep_latest_k: int = 3
    merge: bool = False
    """Also commit the model with LoRA merged in (``<dir>/merged``)."""


@dataclass(kw_only=True)
class Stage3Config:
    student: str = "tiny-videollava"
    """Student VideoLLM (``vidalign models list``)."""
    student_weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the student; empty: the registry's source."""
    encoder: str = ""
    """Stage-2 encoder: store URI of the artifact (``<stage2 out>/encoder``), a directory holding
    ``encoder.safetensors``, or the file; empty keeps the student's own encoder."""
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class Batch:
    video: torch.Tensor  # uint8 (B, F, H, W, 3)
    prompts: list[str]
    targets: list[str]


class ToyInstructions:
    """(clip, prompt, target) triples in memory; the batch of step s depends on (seed, s) only."""

    def __init__(self, config: DataConfig) -> None:
        if config.kind == "synth":
            from vidalign.data.synthset import load_synth_set

            synth = load_synth_set(
                config.path, num_clips=config.num_clips, frames=config.frames, size=config.size
            )
            self.videos = synth.videos
            self.examples = []
            if "caption" in config.tasks:
                self.examples += [(i, CAPTION_PROMPT, c) for i, c in enumerate(synth.captions)]
            if "qa" in config.tasks:
                self.examples += [(q.clip, q.prompt, q.target) for q in synth.qa]
            return
        clips = moving_squares(
            config.num_clips, frames=config.frames, size=config.size, seed=config.seed
        )
        self.videos = torch.stack([torch.from_numpy(c.video) for c in clips])
        self.examples: list[tuple[int, str, str]] = []
        for i, clip in enumerate(clips):
            if "caption" in config.tasks:
                self.examples.append((i, CAPTION_PROMPT, clip.caption))
            if "qa" in config.tasks:
                self.examples.append((i, QA_PROMPT, clip.direction))

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, picks: list[int]) -> Batch:
        return Batch(
            video=self.videos[[self.examples[i][0] for i in picks]],
            prompts=[self.examples[i][1] for i in picks],
            targets=[self.examples[i][2] for i in picks],
        )

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self.take(epoch_order(len(self), step, batch_size, seed))

    def batches(self, batch_size: int) -> list[Batch]:
        """The whole set in order, for evaluation."""
        return [
            self.take(list(range(i, min(i + batch_size, len(self)))))
            for i in range(0, len(self), batch_size)
        ]


@dataclass
class Stage3Result:
    losses: list[float]
    """Mean loss of each step run by this call."""
    videollm: VideoLLM
    """The trained student; ``videollm.model`` is the ``PeftModel`` (merged when ``output.merge``)."""


def load_student_for_stage3(config: Stage3Config) -> VideoLLM:
    """The student with its stage-2 encoder in place and everything frozen (no LoRA yet)."""
    weights = weights_component(config.student_weights, "model") if config.student_weights else None
    llm = load_videollm(config.student, device=config.device, path=weights)
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


def run_stage3(config: Stage3Config, *, resume: bool = False) -> Stage3Result:
    """Train LoRA on the student's LLM; returns the step losses and the trained student."""
    run = RunDir(config.output.dir)
    llm = load_student_for_stage3(config)
    apply_lora(llm, config.lora, config.train.seed)
    model = llm.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    checkpointer = run.checkpointer(config.output.keep_latest_k)
    digest = config_digest(config)
    start = 0
    ckpt = checkpointer.latest() if resume else None
    if ckpt is not None:
        if ckpt.meta.get("config_digest") != digest:
            log.warning("resume_config_changed", checkpoint=ckpt.name)
        saved = ckpt.weights("lora")
        expected = trainable_state(model).keys()
        if saved.keys() != expected:
            raise InvalidInput(
                f"checkpoint {ckpt.name}: LoRA weights do not match this config "
                f"({len(saved.keys() - expected)} unexpected, {len(expected - saved.keys())} missing)"
            )
        model.load_state_dict(saved, strict=False)
        optimizer.load_state_dict(ckpt.state("optimizer"))
        set_rng_state(ckpt.state("rng"))
        start = ckpt.trainer_state()["step"]
        log.info("resumed", step=start, checkpoint=f"{checkpointer.store.uri}/{ckpt.name}")
    run.start_metrics(ckpt)

    data = ToyInstructions(config.data)
    log.info(
        "stage3_start",
        student=config.student,
        encoder=config.encoder or "(student's own)",
        examples=len(data),
        trainable_params=sum(p.numel() for p in trainable),
        start_step=start,
        steps=config.train.steps,
        output=run.store.uri,
    )
    losses: list[float] = []
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=config.train.steps,
            initial=start,
            desc="stage3",
            unit="step",
            dynamic_ncols=True,
            disable=None,  # no bar when stderr is not a terminal (CI, log files)
        ) as bar,
    ):
        for step in range(start, config.train.steps):
            tic = time.perf_counter()
            batch = data.batch(step, config.train.batch_size, config.train.seed)
            loss = llm.loss(batch.video, batch.prompts, batch.targets)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, config.train.grad_clip if config.train.grad_clip > 0 else math.inf
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"stage 3 loss is {value} at step {step + 1}")
            losses.append(value)
            record = {
                "step": step + 1,
                "loss": round(value, 6),
                "grad_norm": round(float(grad_norm), 6),
                "step_s": round(time.perf_counter() - tic, 4),
            }
            run.log_metrics(record)
            log.info("stage3_step", **record)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            if (step + 1) % config.output.checkpoint_every == 0 or step + 1 == config.train.steps:
                checkpointer.save(
                    step + 1,
                    weights={"lora": trainable_state(model)},
                    state={"optimizer": optimizer.state_dict(), "rng": rng_state()},
                    trainer_state={
                        "samples_seen": (step + 1) * config.train.batch_size,
                        "data_seed": config.train.seed,
                    },
                    producer="vidalign train stage3",
                    config_digest=digest,
                    meta={"config": to_dict(config)},
                    extra_files={METRICS: run.metrics_path},
                )
    final = checkpointer.latest()
    assert final is not None and final.step == config.train.steps
    model.eval()
    meta = {"student": config.student, "encoder": config.encoder, "lora_rank": config.lora.rank}
    with tempfile.TemporaryDirectory(prefix="vidalign-lora-") as tmp:
        model.save_pretrained(tmp)
        files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
        commit_artifact(
            run.store,
            "lora",
            files,
            producer="vidalign train stage3",
            config_digest=digest,
            step=final.step,
            meta=meta,
        )
    if config.output.merge:
        llm.model = model.merge_and_unload()
        with tempfile.TemporaryDirectory(prefix="vidalign-merged-") as tmp:
            llm.model.save_pretrained(tmp)
            llm.tokenizer.save_pretrained(tmp)
            files = {str(p.relative_to(tmp)): p for p in Path(tmp).rglob("*") if p.is_file()}
            commit_artifact(
                run.store,
                "merged",
                files,
                producer="vidalign train stage3",
                config_digest=digest,
                step=final.step,
                meta=meta,
            )
    run.publish_metrics()
    log.info(
        "stage3_done",
        steps=config.train.steps,
        final_loss=losses[-1] if losses else None,
        lora=f"{run.store.uri}/lora",
    )
    return Stage3Result(losses=losses, videollm=llm)


def main(argv: list[str] | None = None) -> None:
    """``python -m vidalign_trainer.stage3 --config FILE [--set k=v] [--resume]``."""
    import argparse

    from vidalign.config import load_config

    parser = argparse.ArgumentParser(
        prog="vidalign train stage3", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    run_stage3(load_config(Stage3Config, args.config, args.set), resume=args.resume)


if __name__ == "__main__":
    main()
