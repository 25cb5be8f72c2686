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
- :func:`static_pretrain` trains a VideoLLM's vision tower on static
  objectives, one frame at a time (background, texture, which colours and
  shapes are present, how many objects; and, per token, which colours its cell
  holds and the shape and colour of the object centred in it), like
  image-text pretraining: it never sees two frames together, so nothing asks
  it to represent motion;
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


SPRITE_SATURATION = 0.3
"""SynthMotion's sprite colours are saturated and its backgrounds grey (R = G = B): a pixel whose
channels spread by more than this (on a 0-1 scale) is a sprite's, or its antialiased edge's."""


def cell_colours(rgb: Tensor, grid: int, *, min_pixels: int = 3) -> Tensor:
    """``(..., grid * grid, colours)`` float: which SynthMotion colours each cell of ``rgb``
    ``(..., 3, S, S)`` in [0, 1] holds, as at least ``min_pixels`` saturated pixels (each the
    nearest sprite colour; :data:`SPRITE_SATURATION`). Cells are row-major."""
    from vidalign.data.synth import COLORS

    s = rgb.shape[-1]
    if s % grid:
        raise InvalidInput(f"cell_colours: frame side {s} is not a multiple of the grid {grid}")
    palette = torch.tensor(list(COLORS.values()), dtype=rgb.dtype, device=rgb.device) / 255
    distance = ((rgb.unsqueeze(-4) - palette.view(-1, 3, 1, 1)) ** 2).sum(-3)  # (..., C, S, S)
    saturated = (rgb.amax(-3) - rgb.amin(-3)) > SPRITE_SATURATION
    hits = F.one_hot(distance.argmin(-3), len(palette)).to(rgb.dtype) * saturated.unsqueeze(-1)
    cell = s // grid
    lead = hits.shape[:-3]
    counts = hits.reshape(*lead, grid, cell, grid, cell, len(palette)).sum((-4, -2))
    return (counts.reshape(*lead, grid * grid, len(palette)) >= min_pixels).to(rgb.dtype)


def object_cells(
    truths: Sequence[dict[str, Any]], frames: Sequence[int], *, grid: int
) -> tuple[Tensor, Tensor]:
    """``(N, len(frames), grid * grid)`` long shape and colour indices (into SynthMotion's
    ``SHAPES`` and ``COLORS``) of the object whose centre lies in each cell at each clip frame;
    the one drawn on top where centres share a cell; -1 in cells holding no centre."""
    from vidalign.data.synth import COLORS, SHAPES
    from vidalign.probe import cell_index

    shape = torch.full((len(truths), len(frames), grid * grid), -1, dtype=torch.long)
    color = shape.clone()
    for i, truth in enumerate(truths):
        for obj in reversed(truth["objects"]):  # SynthMotion's draw order: the first object on top
            for j, f in enumerate(frames):
                cell = cell_index(*obj["track"][f], size=truth["size"], grid=grid)
                shape[i, j, cell] = SHAPES.index(obj["shape"])
                color[i, j, cell] = list(COLORS).index(obj["color"])
    return shape, color


def _dihedral_roll(grid: int, generator: torch.Generator) -> tuple[int, int, bool, bool, bool]:
    """A random symmetry of the torus of ``grid x grid`` cells: a roll by whole cells, then
    flips and a transpose. SynthMotion's frames wrap round (sprites and camera move on a torus)
    and a flip or a transpose leaves every static label as it was."""
    r = torch.randint(0, 2 * grid, (5,), generator=generator).tolist()
    return r[0] % grid, r[1] % grid, bool(r[2] % 2), bool(r[3] % 2), bool(r[4] % 2)


def _apply(x: Tensor, op: tuple[int, int, bool, bool, bool], scale: int, dims: tuple[int, int]) -> Tensor:
    """``op`` on the two spatial ``dims`` of ``x``, a roll of ``scale`` units a cell."""
    d_row, d_col, flip_rows, flip_cols, transpose = op
    x = torch.roll(x, (d_row * scale, d_col * scale), dims=dims)
    if flip_rows:
        x = x.flip(dims[0])
    if flip_cols:
        x = x.flip(dims[1])
    return x.transpose(*dims) if transpose else x


def static_pretrain(
    encoder: nn.Module,
    videos: Tensor,
    truths: Sequence[dict[str, Any]],
    schedule: Schedule,
    *,
    cells: float = 0.0,
    augment: bool = False,
    min_pixels: int = 3,
) -> list[float]:
    """Train a ``VideoEncoder``'s trainable tower parameters on single-frame static heads.

    Each frame is classified on its own (background, texture, count; colours and
    shapes present as multi-label) from its pooled features; the loss is summed over
    heads and averaged over frames. The heads are discarded afterwards.

    ``cells > 0`` (the encoder grid-pooled, ``"grid:G"``; the frame's feature is then the mean
    of its G x G tokens) adds, with that weight, heads on every cell's token: which colours
    the cell holds (:func:`cell_colours`, from the pixels), and the shape and colour of the
    object centred in it (:func:`object_cells`, from the truth). A pooled frame feature can
    say that a square and a red object are present, not that the square is red; the tokens
    the LLM reads must, to answer "what colour is the square?". Each cell's label
    comes from the frame itself: nothing asks for motion.

    ``augment`` rolls each clip by whole cells and flips and transposes it (the same for its
    frames and its cell labels; :func:`_dihedral_roll`), so that a few hundred clips give
    the tower shapes in many more places and orientations.
    """
    from vidalign.probe import step_frames

    labels = static_labels(truths)
    d = encoder.d_v
    grid = getattr(encoder, "grid", None)
    if (cells or augment) and grid is None:
        raise InvalidInput("static_pretrain: cell heads and augmentation need a grid-pooled encoder "
                           "('grid:G'), whose tokens are the cells")
    if cells < 0:
        raise InvalidInput(f"static_pretrain: cells is a loss weight, expected >= 0, got {cells}")
    if (cells or augment) and getattr(encoder, "frames_per_step", 1) != 1:
        raise InvalidInput("static_pretrain: cell heads and augmentation label single frames; this "
                           f"encoder's tokens each cover {encoder.frames_per_step} frames")
    if cells:
        mean = torch.tensor(encoder.mean).view(3, 1, 1)
        std = torch.tensor(encoder.std).view(3, 1, 1)
        frames = step_frames(int(truths[0]["frames"]), encoder.num_frames)
        centred_shape, centred_color = object_cells(truths, frames, grid=grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed)
        heads = nn.ModuleDict({
            "background": nn.Linear(d, 3), "texture": nn.Linear(d, 4),
            "colors": nn.Linear(d, labels["colors"].shape[1]),
            "shapes": nn.Linear(d, labels["shapes"].shape[1]), "count": nn.Linear(d, 3),
        })
        if cells:
            heads.update({
                "cell_colors": nn.Linear(d, labels["colors"].shape[1]),
                "centred_shape": nn.Linear(d, labels["shapes"].shape[1]),
                "centred_color": nn.Linear(d, labels["colors"].shape[1]),
            })
    tower = [p for p in encoder.parameters() if p.requires_grad]
    encoder.train()

    def step_loss(picks: list[int], generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            x = encoder.preprocess(videos[picks])
        centred = [centred_shape[picks], centred_color[picks]] if cells else []
        if augment:
            ops = [_dihedral_roll(grid, generator) for _ in picks]
            cell = encoder.image_size // grid
            x = torch.stack([_apply(v, op, cell, (-2, -1)) for v, op in zip(x, ops, strict=True)])
            centred = [torch.stack([
                _apply(v.unflatten(1, (grid, grid)), op, 1, (1, 2)).flatten(1, 2)
                for v, op in zip(labels_, ops, strict=True)]) for labels_ in centred]
        features = encoder(x)  # (B, T * tokens_per_frame, d)
        b, t = len(picks), features.shape[1] // getattr(encoder, "tokens_per_frame", 1)
        tokens = features.reshape(b, t, -1, d)
        frame = tokens.mean(2).reshape(b * t, d)
        loss = frame.new_zeros(())
        for key in ("background", "texture", "count"):
            loss = loss + F.cross_entropy(heads[key](frame), labels[key][picks].repeat_interleave(t))
        for key in ("colors", "shapes"):
            target = labels[key][picks].repeat_interleave(t, dim=0)
            loss = loss + F.binary_cross_entropy_with_logits(heads[key](frame), target)
        if cells:
            colours = cell_colours((x * std + mean).clamp(0, 1), grid, min_pixels=min_pixels)
            shape, color = centred
            per_token = F.binary_cross_entropy_with_logits(heads["cell_colors"](tokens), colours)
            per_token = per_token + F.cross_entropy(
                heads["centred_shape"](tokens).flatten(0, 2), shape.flatten(), ignore_index=-1)
            per_token = per_token + F.cross_entropy(
                heads["centred_color"](tokens).flatten(0, 2), color.flatten(), ignore_index=-1)
            loss = loss + cells * per_token
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
