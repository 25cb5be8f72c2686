"""Pretraining of small models from scratch: the demo's teachers and baseline student.

Real VDA and MotionEnhancer runs start from pretrained checkpoints. The demo
cannot download any, so ``make demo-assets`` (``scripts/demo_assets.py``) makes
its own, the way the real ones were made, at toy scale:

- :func:`text_to_video` trains a tiny AnimateDiff (UNet with its motion module,
  and the CLIP text encoder) with the epsilon-prediction loss on clips and
  their *full* captions, so the teacher has learned the data's dynamics and
  what motion words mean;
- :func:`text_to_video_cogvideox` does the same for a tiny CogVideoX (the
  transformer and the T5 encoder, v-prediction as CogVideoX is trained);
- :func:`static_pretrain` trains a VideoLLM's vision tower on holistic,
  static objectives, one frame at a time (background, texture, which colours
  and shapes are present, how many objects), like image-text pretraining: it
  never sees two frames together, so nothing asks it to represent motion;
- :func:`instruction_tune` then trains the projector and the LLM, tower frozen
  as in LLaVA-style instruction tuning, to answer multiple-choice questions;
- :func:`position_supervise`, not part of the baseline, trains a vision tower
  to say where each object is in every frame (the demo's oracle ceiling: motion
  given by supervision, not by a teacher).

Every function is deterministic given its ``seed`` (batch order and noise).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.checkpoint import Checkpoint
from vidalign.errors import InvalidInput
from vidalign.video import sample_frames
from vidalign_trainer.common import epoch_order
from vidalign_trainer.loop import Built, Context, Job, OutputConfig, StepOutput, TrainConfig, fit


@dataclass(kw_only=True)
class Schedule(TrainConfig):
    """A pretraining run: AdamW, linear warmup, cosine decay to 10%, grad norm clipped to 1."""

    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    warmup: float = 0.05
    """Fraction of steps of linear warmup; cosine decay to 10% after."""
    weight_decay: float = 0.01
    log_every: int = 50
    """Log a progress event every N steps."""
    out: str = ""
    """Store URI of checkpoints (``--resume`` goes on from the newest); empty: a temporary
    directory, gone when the run returns."""
    checkpoint_every: int = 0
    """Checkpoint every N steps; 0: only after the last one."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:
            raise InvalidInput(f"schedule: {err}") from None
        if not 0 <= self.warmup < 1 or self.log_every < 1 or self.checkpoint_every < 0:
            raise InvalidInput("schedule: expected 0 <= warmup < 1, log_every >= 1, checkpoint_every >= 0")


@dataclass(kw_only=True)
class _PretrainConfig:
    train: Schedule
    output: OutputConfig
    device: str = "cpu"


class Pretrain(Job):
    """Some parameters trained on ``step_loss(picks, generator)`` over ``range(n)`` examples."""

    distributed = False

    def __init__(
        self,
        name: str,
        params: Sequence[nn.Parameter],
        n: int,
        schedule: Schedule,
        step_loss: Callable[[list[int], torch.Generator], Tensor],
        out: str,
    ) -> None:
        output = OutputConfig(dir=out, checkpoint_every=schedule.checkpoint_every or schedule.steps,
                              keep_latest_k=1, log_every=schedule.log_every)
        super().__init__(_PretrainConfig(train=schedule, output=output))
        self.name = name
        self.params = nn.ParameterList(params)  # the same Parameter objects, not copies
        self.n = n
        self.step_loss = step_loss

    def build(self, ctx: Context, checkpoint: Checkpoint | None) -> Built:
        schedule = self.config.train
        if checkpoint is not None:
            self.params.load_state_dict(checkpoint.weights("params"))
        optimizer = torch.optim.AdamW(self.params, lr=schedule.lr, weight_decay=schedule.weight_decay)
        warm = max(1, int(schedule.warmup * schedule.steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, schedule.steps - warm)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return Built(self.params, optimizer, scheduler, info={"examples": self.n})

    def step(self, model, step: int) -> StepOutput:
        schedule = self.config.train
        picks = epoch_order(self.n, step, schedule.batch_size, schedule.seed)
        generator = torch.Generator().manual_seed(schedule.seed * 1_000_003 + step)
        return StepOutput(self.step_loss(picks, generator))

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {"params": self.params.state_dict()}


def _train(
    name: str,
    params: Sequence[nn.Parameter],
    n: int,
    schedule: Schedule,
    step_loss: Callable[[list[int], torch.Generator], Tensor],
) -> list[float]:
    """The step losses of ``schedule.steps`` batches of ``range(n)`` (resumed from ``schedule.out``)."""
    if schedule.out:
        return fit(Pretrain(name, params, n, schedule, step_loss, schedule.out), resume=True).losses
    with tempfile.TemporaryDirectory(prefix=f"vidalign-{name}-") as tmp:
        return fit(Pretrain(name, params, n, schedule, step_loss, tmp)).losses


# --- teachers -----------------------------------------------------------------------

DEMO_TEXT_WINDOW = 128
"""Tokens of the demo teacher's word-level text encoder: a SynthMotion caption is ~85."""

TEXT_SPECIALS = {"<unk>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<pad>": 3}


def word_text_encoder(teacher: Any, texts: Sequence[str], max_length: int, *, seed: int = 0) -> None:
    """Give a tiny AnimateDiff teacher a word-level tokenizer over ``texts`` and a fresh CLIP
    text encoder of the same widths reading ``max_length`` tokens (random init under ``seed``).

    The tiny preset's tokenizer spends one token per byte with SD1.5's 77-token
    window: it cuts a SynthMotion caption before its motion sentences, and what
    separates "slides left" from "slides right" is a few characters that a
    2-layer text encoder barely tells apart (the first demo teachers' loss
    differed by 0.00% between the two). With one token per word the motion
    word is one embedding of its own.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from vidalign.students.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(
        texts, TEXT_SPECIALS, None, eos="<|endoftext|>", bos="<|startoftext|>"
    )
    tokenizer.model_max_length = max_length
    config = CLIPTextConfig(**{
        **teacher.text_encoder.config.to_dict(),
        "max_position_embeddings": max_length,
        "vocab_size": max(tokenizer.get_vocab().values()) + 1,
        "bos_token_id": TEXT_SPECIALS["<|startoftext|>"],
        "eos_token_id": TEXT_SPECIALS["<|endoftext|>"],
        "pad_token_id": TEXT_SPECIALS["<pad>"],
    })
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher.text_encoder = CLIPTextModel(config).to(teacher.device).eval()
    teacher.text_encoder.requires_grad_(False)
    teacher.tokenizer = tokenizer


def calibrate_latent_scale(vae: Any, encode: Callable[[], Tensor]) -> float:
    """Set ``vae.config.scaling_factor`` so that the latents of ``encode()`` have unit std.

    SD1.5's 0.18215 is exactly this calibration for its own VAE. A random-init
    tiny VAE with that factor gives latents of std ~0.05: the forward process
    then drowns the data at the first timesteps and a denoiser has nothing to
    learn from the caption (the demo's first teachers had a conditioning gap of
    0.00%). ``encode`` returns latents under the current factor; returns the new one.
    """
    with torch.no_grad():
        std = encode().float().std().item()
    if not std > 0:
        raise InvalidInput(f"latents: std is {std}; cannot calibrate the VAE scaling factor")
    factor = vae.config.scaling_factor / std
    vae.register_to_config(scaling_factor=factor)
    return factor


def text_to_video(
    teacher: Any,
    videos: Tensor,
    captions: Sequence[str],
    schedule: Schedule,
    *,
    x0_weight_cap: float = 0.0,
) -> list[float]:
    """Train a ``DiffusionTeacher``'s UNet and text encoder on (clip, caption) pairs.

    ``videos`` are uint8 ``(N, F, H, W, 3)``; they are resampled to the
    teacher's frames and resolution and VAE-encoded once (the VAE stays fixed).
    Timesteps are uniform over the whole schedule.

    The epsilon loss at timestep t equals SNR(t) times the error on the clean
    latents, so at high noise -- the only place where the caption says more
    than the noisy frames -- getting the content right is worth almost
    nothing, and a short training never learns to read the motion words (the
    demo measured a conditioning gap of 0.01% after 300 steps).
    ``x0_weight_cap > 0`` weights each sample by ``min(1 / SNR(t), cap)``: the
    error on the clean latents at high noise, capped, epsilon error elsewhere.
    """
    if len(videos) != len(captions):
        raise InvalidInput(f"captions: expected {len(videos)}, got {len(captions)}")
    pixels = sample_frames(videos, teacher.frames, teacher.resolution)
    latents = torch.cat([teacher.encode_video(chunk) for chunk in pixels.split(16)])
    tokens = teacher.tokenizer(
        list(captions), padding="max_length", max_length=teacher.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(teacher.device)
    trainable = [*teacher.unet.parameters(), *teacher.text_encoder.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    n_steps = teacher.num_train_timesteps
    alphas = teacher.scheduler.alphas_cumprod.float()

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        z0 = latents[picks]
        t = torch.randint(0, n_steps, (len(picks),), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        cond = teacher.text_encoder(tokens[picks])[0]
        pred = teacher.predict_noise(teacher.add_noise(z0, eps, t), t, cond)
        per_sample = (pred - eps.to(pred.device)).pow(2).flatten(1).mean(1)
        if x0_weight_cap > 0:
            inverse_snr = (1 - alphas[t]) / alphas[t]
            per_sample = per_sample * inverse_snr.clamp(max=x0_weight_cap).to(per_sample.device)
        return per_sample.mean()

    try:
        return _train("t2v_animatediff", trainable, len(videos), schedule, step_loss)
    finally:
        teacher.requires_grad_(False)


def text_to_video_cogvideox(
    teacher: Any, videos: Tensor, captions: Sequence[str], schedule: Schedule
) -> list[float]:
    """Train a ``CogVideoXTeacher``'s transformer and T5 encoder (v-prediction) on clips."""
    if len(videos) != len(captions):
        raise InvalidInput(f"captions: expected {len(videos)}, got {len(captions)}")
    spec = teacher.spec
    pixels = sample_frames(videos, spec.frames, spec.height)
    latents = torch.cat([teacher.encode_video(clip.numpy()) for clip in pixels])
    latents = teacher.pad_latent_frames(latents)
    trainable = [*teacher.transformer.parameters(), *teacher.text_encoder.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    scheduler = teacher.scheduler
    captions = list(captions)

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        z0 = latents[picks]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(picks),), generator=generator)
        eps = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = scheduler.add_noise(z0, eps, t)
        embeds = teacher.encode_prompt([captions[i] for i in picks], grad=True).embeds
        pred = teacher.transformer(
            hidden_states=z_t, encoder_hidden_states=embeds, timestep=t,
            image_rotary_emb=teacher.rotary_emb(z_t), return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), scheduler.get_velocity(z0, eps, t).float())

    try:
        return _train("t2v_cogvideox", trainable, len(videos), schedule, step_loss)
    finally:
        for p in trainable:
            p.requires_grad_(False)


# --- the baseline student --------------------------------------------------------------

STATIC_TARGETS = ("background", "texture", "colors", "shapes", "count")


def static_labels(truths: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Per-clip labels of SynthMotion's static attributes (from its ground truth)."""
    from vidalign.data.synth import BACKGROUNDS, COLORS, SHAPES, TEXTURES

    colors, shapes = list(COLORS), list(SHAPES)
    out: dict[str, list] = {k: [] for k in STATIC_TARGETS}
    for truth in truths:
        objects = truth["objects"]
        out["background"].append(list(BACKGROUNDS).index(truth["background"]["color"]))
        out["texture"].append(list(TEXTURES).index(truth["background"]["texture"]))
        out["colors"].append([float(c in {o["color"] for o in objects}) for c in colors])
        out["shapes"].append([float(s in {o["shape"] for o in objects}) for s in shapes])
        out["count"].append(len(objects) - 2)  # two to four sprites
    return {
        "background": torch.tensor(out["background"]),
        "texture": torch.tensor(out["texture"]),
        "colors": torch.tensor(out["colors"]),
        "shapes": torch.tensor(out["shapes"]),
        "count": torch.tensor(out["count"]),
    }


def static_pretrain(
    encoder: nn.Module, videos: Tensor, truths: Sequence[dict[str, Any]], schedule: Schedule
) -> list[float]:
    """Train a ``VideoEncoder``'s trainable tower parameters on single-frame static heads.

    Each frame is classified on its own (background, texture, count; colours and
    shapes present as multi-label); the loss is summed over heads and averaged
    over frames. The heads are discarded afterwards.
    """
    labels = static_labels(truths)
    d = encoder.d_v
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed)
        heads = nn.ModuleDict({
            "background": nn.Linear(d, 3), "texture": nn.Linear(d, 4),
            "colors": nn.Linear(d, labels["colors"].shape[1]),
            "shapes": nn.Linear(d, labels["shapes"].shape[1]), "count": nn.Linear(d, 3),
        })
    tower = [p for p in encoder.parameters() if p.requires_grad]
    encoder.train()

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        features = encoder(encoder.preprocess(videos[picks]))  # (B, T, d)
        b, t, _ = features.shape
        x = features.reshape(b * t, -1)
        loss = x.new_zeros(())
        for key in ("background", "texture", "count"):
            loss = loss + F.cross_entropy(heads[key](x), labels[key][picks].repeat_interleave(t))
        for key in ("colors", "shapes"):
            target = labels[key][picks].repeat_interleave(t, dim=0)
            loss = loss + F.binary_cross_entropy_with_logits(heads[key](x), target)
        return loss

    try:
        return _train("static_pretrain", [*tower, *heads.parameters()], len(videos), schedule, step_loss)
    finally:
        encoder.eval()


def position_labels_per_step(
    truths: Sequence[dict[str, Any]], frames: Sequence[int], *, grid: int
) -> Tensor:
    """``(N, S, colours)`` long: the grid cell of each colour's object at each step's clip frame,
    -1 where the clip has no object of that colour (SynthMotion's colours are unique per clip)."""
    from vidalign.data.synth import COLORS
    from vidalign.probe import position_labels

    colors = list(COLORS)
    labels = torch.full((len(truths), len(frames), len(colors)), -1, dtype=torch.long)
    for i, truth in enumerate(truths):
        for obj in truth["objects"]:
            cells = position_labels(obj["track"], frames, size=truth["size"], grid=grid)
            labels[i, :, colors.index(obj["color"])] = torch.tensor(cells)
    return labels


def position_supervise(
    encoder: nn.Module, videos: Tensor, truths: Sequence[dict[str, Any]], schedule: Schedule
) -> list[float]:
    """Train a grid-pooled ``VideoEncoder`` to say where each object is in every step it samples.

    The demo's oracle ceiling: motion given to the encoder by supervision rather than by a
    teacher. A linear head reads each step's F_V tokens, flattened (what ``vidalign probe``
    reads), and predicts for every colour the ``grid x grid`` cell of that colour's object
    (``vidalign.probe``'s position target, clip frames from ``step_frames``); the loss is the
    cross-entropy over the objects present. The head is discarded afterwards.
    """
    from vidalign.probe import step_frames

    grid = getattr(encoder, "grid", None)
    if grid is None:
        raise InvalidInput("position_supervise: the encoder must pool F_V to a grid ('grid:G'), "
                           "so that its tokens can say where the objects are")
    if not truths or len(truths) != len(videos):
        raise InvalidInput(f"position_supervise: {len(videos)} videos but {len(truths)} truths")
    frames = step_frames(int(truths[0]["frames"]), encoder.num_frames, encoder.frames_per_step)
    labels = position_labels_per_step(truths, frames, grid=grid)
    colors, cells = labels.shape[-1], grid * grid
    width = encoder.tokens_per_frame * encoder.d_v
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed)
        head = nn.Linear(width, colors * cells)
    tower = [p for p in encoder.parameters() if p.requires_grad]
    encoder.train()

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        features = encoder(encoder.preprocess(videos[picks]))  # (B, S * k, d_v)
        per_step = features.reshape(len(picks), len(frames), width)
        logits = head(per_step).reshape(-1, cells)
        return F.cross_entropy(logits, labels[picks].reshape(-1), ignore_index=-1)

    try:
        return _train("position_supervise", [*tower, *head.parameters()], len(videos), schedule,
                      step_loss)
    finally:
        encoder.eval()


def instruction_tune(
    llm: Any,
    videos: Tensor,
    examples: Sequence[tuple[int, str, str]],
    schedule: Schedule,
    *,
    train_tower: bool = False,
) -> list[float]:
    """Train a ``VideoLLM``'s projector and LLM on (clip index, prompt, target) examples."""
    llm.model.requires_grad_(True)
    if not train_tower:
        for _, p in llm.param_groups()["vision"]:
            p.requires_grad_(False)
    trainable = [p for p in llm.model.parameters() if p.requires_grad]
    llm.model.train()

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        batch = [examples[i] for i in picks]
        return llm.loss(
            videos[[e[0] for e in batch]], [e[1] for e in batch], [e[2] for e in batch]
        )

    try:
        return _train("instruction_tune", trainable, len(examples), schedule, step_loss)
    finally:
        llm.model.requires_grad_(False)
        llm.model.eval()
