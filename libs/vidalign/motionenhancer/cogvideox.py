"""CogVideoX teacher backend for MotionEnhancer prior extraction.

One code path serves real checkpoints and the tiny preset (docs/design.md, decision 9):
a real teacher loads the diffusers pipeline folders of a CogVideoX repository
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)
with ``from_pretrained(subfolder=...)``; ``tiny-cogvideox`` builds the same
classes from small configs under fixed seeds. ``CogVideoXTeacher.save_pretrained``
writes the same folder layout, so a tiny teacher round-trips through the real
loading code.

The tiny tokenizer is a real ``transformers.T5Tokenizer`` built offline from an
in-memory Unigram vocabulary: single characters (and ``"▁" + character`` for word
starts) as a fallback, plus one ``"▁" + word`` piece per word of SynthMotion's
caption vocabulary (:mod:`vidalign.data.synth_vocab`). A caption word is one
token whose offset span is exactly the word, any other text still tokenises
character by character, and ``</s>`` / ``<pad>`` behave as in T5.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from vidalign.data.synth_vocab import CAPTION_WORDS
from vidalign.errors import InvalidInput, NotFound
from vidalign.pipelines import from_pretrained, vae_scale_factor


@dataclass(frozen=True, kw_only=True)
class CogVideoXSpec:
    """Where a CogVideoX teacher's weights come from and the video it expects."""

    name: str
    repo: str | None
    """HF id or local dir of a diffusers CogVideoX pipeline; None: the tiny preset."""
    frames: int
    """Pixel frames per clip (4k + 1: the causal VAE compresses time by 4)."""
    height: int
    width: int
    max_text_len: int
    """T5 tokens per prompt (226 in the real models)."""
    tiny: bool
    description: str


COGVIDEOX_MODELS: dict[str, CogVideoXSpec] = {
    spec.name: spec
    for spec in (
        CogVideoXSpec(
            name="cogvideox-5b",
            repo="THUDM/CogVideoX-5b",
            frames=49,
            height=480,
            width=720,
            max_text_len=226,
            tiny=False,
            description="CogVideoX-5B: 42 layers x 48 heads x 64; 49x480x720 -> 13 x 1350 video tokens.",
        ),
        CogVideoXSpec(
            name="cogvideox1.5-5b",
            repo="THUDM/CogVideoX1.5-5B",
            frames=81,
            height=768,
            width=1360,
            max_text_len=226,
            tiny=False,
            description="CogVideoX1.5-5B (MotionEnhancer's teacher): 81x768x1360 -> 11 x 4080 video "
            "tokens (patch_size_t=2); 49 frames -> 7 x 1350 at 480x720.",
        ),
        CogVideoXSpec(
            name="tiny-cogvideox",
            repo=None,
            frames=9,
            height=32,
            width=32,
            # The longest SynthMotion caption is 70 words and punctuation marks (bounded by its
            # templates: 4 objects, a 3-action actor; measured 70 over 2100 captions, ~350
            # characters), 71 tokens with </s>. 96 holds it with a quarter to spare and keeps the
            # text a small part of the joint attention (3 x 16 video tokens).
            max_text_len=96,
            tiny=True,
            description="Random-init CogVideoX classes with RoPE, 2 layers x 2 heads x 16, "
            "9x32x32 video -> 3 x 16 video tokens (tests, CPU demo).",
        ),
    )
}

_TINY_SEEDS = {"transformer": 10, "vae": 11, "text_encoder": 12}
TINY_TEXT_DIM = 32


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic module init that leaves the caller's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_CHAR_SCORE, _CHAR_START_SCORE, _SPACE_SCORE, _WORD_SCORE = -3.0, -2.5, -2.0, -1.0
"""Unigram log-scores. A word piece outscores every segmentation of two or more pieces
(each scores <= -1), so a listed word is always one token; among characters,
``"▁" + c`` beats ``"▁"`` + ``c``, so a word start keeps its marker on its first character."""


def tiny_t5_tokenizer(
    model_max_length: int = COGVIDEOX_MODELS["tiny-cogvideox"].max_text_len,
    words: Sequence[str] = CAPTION_WORDS,
) -> T5Tokenizer:
    """A real ``T5Tokenizer`` over a word-level Unigram vocabulary, built offline.

    Pieces, in id order: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), ``"▁"``, each
    printable ASCII character, ``"▁" + character`` (the character fallback, ids as
    in the first, character-only tiny tokenizer), then ``"▁" + word`` for each of
    ``words`` and its capitalised form (sentences start with "The", "An"). A
    listed word is one token whose offset span is the word itself (the ``"▁"``
    stands for the preceding space and has no span); other text is one token per
    character; ``","`` and ``"."`` are tokens of their own.
    """
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", _SPACE_SCORE)]
    vocab += [(c, _CHAR_SCORE) for c in chars] + [("▁" + c, _CHAR_START_SCORE) for c in chars]
    known = {piece for piece, _ in vocab}
    for word in words:
        for form in dict.fromkeys((word, word[:1].upper() + word[1:])):
            piece = "▁" + form
            if piece not in known:  # one-character words already are one token
                vocab.append((piece, _WORD_SCORE))
                known.add(piece)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _cogvideox_scheduler() -> CogVideoXDDIMScheduler:
    """CogVideoX-5B's scheduler config (real checkpoints load theirs from scheduler/)."""
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )


def tiny_cogvideox_components(spec: CogVideoXSpec | None = None) -> dict[str, Any]:
    """The tiny preset's parts, keyed by their pipeline folder names."""
    spec = spec or COGVIDEOX_MODELS["tiny-cogvideox"]
    tokenizer = tiny_t5_tokenizer(spec.max_text_len)
    vae_channels = (8, 16, 16)
    spatial = 2 ** (len(vae_channels) - 1)
    with _seeded(_TINY_SEEDS["vae"]):
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * len(vae_channels),
            up_block_types=("CogVideoXUpBlock3D",) * len(vae_channels),
            block_out_channels=vae_channels,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=spec.height,
            sample_width=spec.width,
        )
    with _seeded(_TINY_SEEDS["transformer"]):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=TINY_TEXT_DIM,
            num_layers=2,
            sample_width=spec.width // spatial,
            sample_height=spec.height // spatial,
            sample_frames=spec.frames,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=spec.max_text_len,
            use_rotary_positional_embeddings=True,
        )
    with _seeded(_TINY_SEEDS["text_encoder"]):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=TINY_TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _cogvideox_scheduler(),
    }


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor
    """(B, L, D) T5 hidden states."""
    input_ids: torch.Tensor
    """(B, L) token ids, padded to ``max_text_len``."""
    attention_mask: torch.Tensor
    """(B, L) 1 for real tokens (incl. ``</s>``), 0 for padding."""
    offsets: list[list[tuple[int, int]]]
    """Per prompt, per token: the character span in the prompt ((0, 0) for special tokens)."""
    special: torch.Tensor
    """(B, L) True for special tokens (``</s>``, ``<pad>``)."""


class CogVideoXTeacher:
    """A frozen CogVideoX: transformer, 3D VAE, T5 text encoder + tokenizer, DDIM scheduler."""

    def __init__(
        self,
        *,
        spec: CogVideoXSpec,
        transformer: CogVideoXTransformer3DModel,
        vae: AutoencoderKLCogVideoX,
        text_encoder: T5EncoderModel,
        tokenizer: Any,
        scheduler: CogVideoXDDIMScheduler,
    ) -> None:
        self.spec = spec
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        for module in (transformer, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()

    # -- geometry -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_spatial(self) -> int:
        return vae_scale_factor(self.vae.config.block_out_channels)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        # diffusers logs a warning about fp32-only modules these classes do not have.
        logger = logging.getLogger("diffusers.models.modeling_utils")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            for module in (self.transformer, self.vae, self.text_encoder):
                module.to(device=device, dtype=dtype)
        finally:
            logger.setLevel(level)
        return self

    # -- text ---------------------------------------------------------------------

    def encode_prompt(self, prompts: str | list[str], *, grad: bool = False) -> EncodedPrompt:
        """T5-encode prompts padded to ``max_text_len`` tokens, as CogVideoX's pipeline does.

        Without gradients by default (the teacher is frozen); ``grad=True`` keeps the graph
        through the text encoder, for training it (``pretrain.text_to_video_cogvideox``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInput(
                f"prompt: expected a str or a non-empty list of str, got {prompts!r}"
            )
        enc = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.spec.max_text_len,
            truncation=True,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(self.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            embeds = self.text_encoder(ids)[0].to(self.dtype)
        special_ids = torch.tensor(self.tokenizer.all_special_ids, device=ids.device)
        return EncodedPrompt(
            embeds=embeds,
            input_ids=ids,
            attention_mask=enc["attention_mask"].to(self.device),
            offsets=[[tuple(map(int, span)) for span in row] for row in enc["offset_mapping"]],
            special=torch.isin(ids, special_ids),
        )

    # -- video --------------------------------------------------------------------

    def video_to_pixels(self, video: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) -> float (1, 3, F', H, W) in [-1, 1], F' the largest 4k+1 <= F."""
        if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4:
            raise InvalidInput(
                f"video: expected a uint8 (F, H, W, 3) array, got {type(video).__name__} "
                f"{getattr(video, 'dtype', '')} {getattr(video, 'shape', '')}"
            )
        frames, height, width, channels = video.shape
        step = self.vae_scale_spatial * self.transformer.config.patch_size
        if channels != 3 or height % step or width % step or frames < 1:
            raise InvalidInput(
                f"video: expected shape (F >= 1, H and W multiples of {step}, 3), got {video.shape}"
            )
        keep = (frames - 1) // self.vae_scale_temporal * self.vae_scale_temporal + 1
        pixels = torch.from_numpy(video[:keep]).float().div(127.5).sub(1.0)
        return pixels.permute(3, 0, 1, 2).unsqueeze(0).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_video(self, video: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) -> scaled latents (1, F_latent, C, h, w) (posterior mode)."""
        pixels = self.video_to_pixels(video)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.transpose(1, 2) * self.vae.config.scaling_factor

    def pad_latent_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Repeat the first latent frame until the frame count divides ``patch_size_t``.

        CogVideoX 1.5 patches 2 latent frames into one token frame; its pipeline
        generates the extra leading frames and drops them when decoding.
        """
        p_t = self.transformer.config.patch_size_t
        missing = 0 if p_t is None else -latents.shape[1] % p_t
        if not missing:
            return latents
        return torch.cat([latents[:, :1].expand(-1, missing, -1, -1, -1), latents], dim=1)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (1, F_latent, C, h, w) -> pixels (1, 3, F, H, W) in about [-1, 1]."""
        return self.vae.decode(latents.transpose(1, 2) / self.vae.config.scaling_factor).sample

    def token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, h, w) of the transformer's video tokens for latents (B, F, C, H, W)."""
        _, frames, _, height, width = latents.shape
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t
        token_frames = frames if p_t is None else math.ceil(frames / p_t)
        return token_frames, height // p, width // p

    def rotary_emb(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D RoPE tables CogVideoXPipeline builds for these latents (None without RoPE)."""
        config = self.transformer.config
        if not config.use_rotary_positional_embeddings:
            return None
        _, frames, _, height, width = latents.shape
        p, p_t = config.patch_size, config.patch_size_t
        grid_h, grid_w = height // p, width // p
        base_w, base_h = config.sample_width // p, config.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_h, grid_w),
                temporal_size=frames,
                device=latents.device,
            )
        else:
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim,
                crops_coords=None,
                grid_size=(grid_h, grid_w),
                temporal_size=math.ceil(frames / p_t),
                grid_type="slice",
                max_size=(base_h, base_w),
                device=latents.device,
            )
        return cos.to(latents.dtype), sin.to(latents.dtype)

    # -- denoiser -------------------------------------------------------------------

    def predict_velocity(
        self, latents: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's v-prediction (CogVideoX's training target) for noisy latents
        (B, F, C, h, w), T5 embeds (B, L, D) and timesteps t (one, or one per sample)."""
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=embeds,
            timestep=t.to(latents.device).expand(latents.shape[0]),
            image_rotary_emb=self.rotary_emb(latents),
            return_dict=False,
        )[0]

    # -- persistence ----------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the diffusers pipeline folder layout that ``load_cogvideox`` reads."""
        directory = Path(directory)
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(self, name).save_pretrained(directory / name)


def _directory_spec(directory: str) -> CogVideoXSpec:
    config_path = Path(directory) / "transformer" / "config.json"
    if not config_path.is_file():
        raise NotFound(
            f"{directory}: expected a CogVideoX pipeline folder with transformer/config.json"
        )
    config = CogVideoXTransformer3DModel.load_config(directory, subfolder="transformer")
    vae_config = AutoencoderKLCogVideoX.load_config(directory, subfolder="vae")
    spatial = vae_scale_factor(vae_config["block_out_channels"])
    return CogVideoXSpec(
        name=directory,
        repo=directory,
        frames=config["sample_frames"],
        height=config["sample_height"] * spatial,
        width=config["sample_width"] * spatial,
        max_text_len=config["max_text_seq_length"],
        tiny=False,
        description=f"CogVideoX pipeline loaded from {directory}",
    )


def load_cogvideox(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    repo: str | None = None,
) -> CogVideoXTeacher:
    """A frozen CogVideoX teacher by registry name, or from a local pipeline directory.

    ``repo`` replaces a registry entry's location (a mirror, or a saved tiny teacher);
    the returned spec's ``max_text_len`` is then the loaded transformer's
    ``max_text_seq_length``, the window its weights were trained with.
    """
    if name in COGVIDEOX_MODELS:
        spec = COGVIDEOX_MODELS[name]
        if repo is not None:
            spec = dataclasses.replace(spec, repo=repo)
    elif Path(name).is_dir():
        spec = _directory_spec(name)
    else:
        raise NotFound(
            f"CogVideoX model {name!r} is neither a registry name nor a directory; "
            f"known: {sorted(COGVIDEOX_MODELS)}"
        )
    if spec.repo is None:
        parts = tiny_cogvideox_components(spec)
    else:
        parts = {
            "transformer": from_pretrained(
                CogVideoXTransformer3DModel, spec.repo, "transformer", torch_dtype=dtype
            ),
            "vae": from_pretrained(AutoencoderKLCogVideoX, spec.repo, "vae", torch_dtype=dtype),
            # transformers 5 names the argument `dtype` where diffusers says `torch_dtype`.
            "text_encoder": from_pretrained(
                T5EncoderModel, spec.repo, "text_encoder", dtype=dtype
            ),
            "tokenizer": from_pretrained(T5Tokenizer, spec.repo, "tokenizer"),
            "scheduler": from_pretrained(CogVideoXDDIMScheduler, spec.repo, "scheduler"),
        }
    window = parts["transformer"].config.max_text_seq_length
    if window != spec.max_text_len:
        # Saved weights keep the text window they were trained with (a tiny CogVideoX made
        # before the word-level tokenizer reads 64 tokens; the registry's preset now reads 96).
        spec = dataclasses.replace(spec, max_text_len=window)
    teacher = CogVideoXTeacher(spec=spec, **parts)
    return teacher.to(device=device, dtype=dtype)
