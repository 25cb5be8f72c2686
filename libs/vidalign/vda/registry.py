"""Teacher model registry: names -> real checkpoints or tiny random-init presets.

One code path serves both (docs/design.md, decision 9): a real teacher loads SD1.5's
pipeline folders and a diffusers ``MotionAdapter`` with ``from_pretrained``; a
tiny preset builds the same classes from small configs, under a fixed seed, so
tests and the CPU demo exercise exactly the code the GPU deployment runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vidalign.errors import InvalidInput, NotFound
from vidalign.papers import VDA_DIFFUSION_FRAMES
from vidalign.pipelines import from_pretrained, vae_scale_factor
from vidalign.vda.diffusion import FAMILIES, DiffusionTeacher
from vidalign.vda.tokenizer import tiny_clip_tokenizer

VDA_FRAMES = VDA_DIFFUSION_FRAMES
"""Frames VDA feeds AnimateDiff; the SD1.5 ablation sees the same frames as images."""
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class PresetSize:
    """Widths of a random-init preset; the classes are the real ones."""

    channels: tuple[int, ...]
    """UNet block widths (and the motion module's); one down level each."""
    cond_dim: int
    """Cross-attention width = text encoder width."""
    attention_head_dim: int
    norm_groups: int
    text_layers: int
    vae_channels: tuple[int, ...]
    """VAE block widths: pixels are 2 ** (levels - 1) x the latent side."""
    latent_size: int
    """Latent side the UNet is configured for (``sample_size``)."""
    layers_per_block: int = 1
    """ResNet (and motion) layers per UNet level; 2 in SD1.5."""
    motion_heads: int = 2
    """Attention heads of the motion module; 8 in AnimateDiff."""


PRESET_SIZES = {
    "tiny": PresetSize(
        channels=(32, 64), cond_dim=32, attention_head_dim=8, norm_groups=2, text_layers=2,
        vae_channels=(8, 16), latent_size=16,
    ),
    "small": PresetSize(
        channels=(64, 128), cond_dim=128, attention_head_dim=32, norm_groups=8,
        text_layers=4, vae_channels=(16, 32), latent_size=16,
    ),
    # SD1.5's UNet and CLIP-L widths, random init: GPU benchmarks without weights.
    "base": PresetSize(
        channels=(320, 640, 1280, 1280), cond_dim=768, attention_head_dim=8, norm_groups=32,
        text_layers=12, vae_channels=(128, 256, 512, 512), latent_size=32,
        layers_per_block=2, motion_heads=8,
    ),
}


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """Where a teacher's weights come from and what input it expects."""

    name: str
    """Registry key (or the directory a teacher was loaded from)."""
    family: str
    """``"animatediff"`` (SD1.5 UNet + motion module) or ``"sd15"`` (frames as images)."""
    base: str | None
    """HF id or local dir of an SD1.5 pipeline layout; None: the tiny preset's random init."""
    motion_adapter: str | None
    """HF id or dir of a diffusers MotionAdapter (animatediff only); None for tiny presets."""
    frames: int
    """Frames per video the model is fed."""
    resolution: int
    """Pixel side of the square frames."""
    tiny: bool
    """A random-init preset for tests and the CPU demo."""
    description: str
    preset: str = "tiny"
    """Size of the random-init preset (tiny presets only): a key of ``PRESET_SIZES``."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidInput(f"family: expected one of {FAMILIES}, got {self.family!r}")
        if self.family == "sd15" and self.motion_adapter is not None:
            raise InvalidInput(
                f"motion_adapter: the sd15 family has no motion module, got {self.motion_adapter!r}"
            )
        if not self.tiny and self.base is None:
            raise InvalidInput(f"base: teacher {self.name!r} is not tiny and needs a location")
        if self.preset not in PRESET_SIZES:
            raise InvalidInput(f"preset: expected one of {list(PRESET_SIZES)}, got {self.preset!r}")


TEACHER_MODELS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec(
            name="tiny-animatediff",
            family="animatediff",
            base=None,
            motion_adapter=None,
            frames=8,
            resolution=32,
            tiny=True,
            description="Random-init AnimateDiff of the real classes, 8x32x32 video (tests, demo).",
        ),
        TeacherSpec(
            name="tiny-sd15",
            family="sd15",
            base=None,
            motion_adapter=None,
            frames=8,
            resolution=32,
            tiny=True,
            description="Random-init SD1.5 UNet, frames as independent images (tests, demo).",
        ),
        TeacherSpec(
            name="small-animatediff",
            family="animatediff",
            base=None,
            motion_adapter=None,
            frames=16,
            resolution=32,
            tiny=True,
            preset="small",
            description="Random-init AnimateDiff, 4x wider than tiny, 16x32x32 video (CPU benchmarks).",
        ),
        TeacherSpec(
            name="random-animatediff",
            family="animatediff",
            base=None,
            motion_adapter=None,
            frames=VDA_FRAMES,
            resolution=256,
            tiny=True,
            preset="base",
            description="SD1.5-size AnimateDiff, random init, 24x256x256 (GPU benchmarks).",
        ),
        TeacherSpec(
            name="animatediff-v1-5-2",
            family="animatediff",
            base=SD15,
            motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2",
            frames=VDA_FRAMES,
            resolution=512,
            tiny=False,
            description="AnimateDiff motion module v1-5-2 on SD1.5: VDA's teacher.",
        ),
        TeacherSpec(
            name="animatediff-v1-5-3",
            family="animatediff",
            base=SD15,
            motion_adapter="guoyww/animatediff-motion-adapter-v1-5-3",
            frames=VDA_FRAMES,
            resolution=512,
            tiny=False,
            description="AnimateDiff motion module v1-5-3 on SD1.5.",
        ),
        TeacherSpec(
            name="sd15",
            family="sd15",
            base=SD15,
            motion_adapter=None,
            frames=VDA_FRAMES,
            resolution=512,
            tiny=False,
            description="SD1.5 without temporal modules: VDA's image-only ablation.",
        ),
    )
}


# --- tiny presets -----------------------------------------------------------------

# One seed per component, so a component's weights do not depend on which
# other components were built (e.g. a real VAE with a tiny UNet).
_TINY_SEEDS = {"unet": 0, "motion_adapter": 1, "vae": 2, "text_encoder": 3}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic module init that leaves the caller's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one library logger's warnings for the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _sd15_training_scheduler() -> DDPMScheduler:
    """SD1.5's training noise schedule (real checkpoints load theirs from scheduler/)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def tiny_components(family: str, preset: str = "tiny") -> dict[str, Any]:
    """The tiny preset's parts, keyed by their SD1.5 pipeline folder names.

    ``unet`` is the 2D ``UNet2DConditionModel``; the animatediff family adds
    ``motion_adapter``. Saving each with ``save_pretrained`` gives a directory
    that ``load_teacher`` reads like a real checkpoint.
    """
    if family not in FAMILIES:
        raise InvalidInput(f"family: expected one of {FAMILIES}, got {family!r}")
    size = PRESET_SIZES[preset]
    levels = len(size.channels)
    tokenizer = tiny_clip_tokenizer()
    components: dict[str, Any] = {"tokenizer": tokenizer, "scheduler": _sd15_training_scheduler()}
    with _seeded(_TINY_SEEDS["unet"]):
        components["unet"] = UNet2DConditionModel(
            sample_size=size.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=size.channels,
            layers_per_block=size.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=size.cond_dim,
            attention_head_dim=size.attention_head_dim,
            norm_num_groups=size.norm_groups,
        )
    if family == "animatediff":
        with _seeded(_TINY_SEEDS["motion_adapter"]):
            components["motion_adapter"] = MotionAdapter(
                block_out_channels=size.channels,
                motion_layers_per_block=size.layers_per_block,
                motion_num_attention_heads=size.motion_heads,
                motion_norm_num_groups=size.norm_groups,
                motion_max_seq_length=32,
            )
    with _seeded(_TINY_SEEDS["vae"]):
        components["vae"] = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
            block_out_channels=size.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=2 ** (len(size.vae_channels) - 1) * size.latent_size,
        )
    with _seeded(_TINY_SEEDS["text_encoder"]):
        components["text_encoder"] = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=size.cond_dim,
                intermediate_size=2 * size.cond_dim,
                num_hidden_layers=size.text_layers,
                num_attention_heads=2,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return components


# --- loading ----------------------------------------------------------------------


def _load_config(cls: Any, location: str, subfolder: str) -> dict[str, Any]:
    try:
        return cls.load_config(location, subfolder=subfolder)
    except OSError as e:
        raise NotFound(f"cannot read the {subfolder} config at {location}/{subfolder}: {e}") from e


def _holds_motion_unet(base: str) -> bool:
    """Whether a pipeline folder's unet/ is a whole AnimateDiff UNet, not a 2D SD1.5 one."""
    unet_config = _load_config(UNet2DConditionModel, base, "unet")
    return unet_config.get("_class_name") == UNetMotionModel.__name__


class _Parts:
    """Loads each component from its location, or takes the tiny preset's when it has none."""

    def __init__(self, spec: TeacherSpec, dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype
        self._tiny: dict[str, Any] | None = None

    def get(
        self, name: str, cls: Any, location: str | None, subfolder: str | None, **kwargs: Any
    ) -> Any:
        if location is not None:
            return from_pretrained(cls, location, subfolder, **kwargs)
        if not self.spec.tiny:
            raise InvalidInput(
                f"{name}: teacher {self.spec.name!r} needs a location for its {name}, got None"
            )
        if self._tiny is None:
            self._tiny = tiny_components(self.spec.family, self.spec.preset)
        return self._tiny[name]


def _load_unet(spec: TeacherSpec, parts: _Parts) -> UNetMotionModel | UNet2DConditionModel:
    base, motion = spec.base, spec.motion_adapter
    if base is not None and _holds_motion_unet(base):
        # A saved AnimateDiff pipeline (e.g. DiffusionTeacher.save_pretrained):
        # the motion module is already inside the UNet.
        if spec.family != "animatediff" or motion is not None:
            raise InvalidInput(
                f"base: {base} holds a UNetMotionModel; expected family 'animatediff' with no "
                f"separate motion_adapter, got family {spec.family!r}, motion_adapter {motion!r}"
            )
        return parts.get("unet", UNetMotionModel, base, "unet", torch_dtype=parts.dtype)
    unet2d = parts.get("unet", UNet2DConditionModel, base, "unet", torch_dtype=parts.dtype)
    if spec.family == "sd15":
        return unet2d
    adapter = parts.get("motion_adapter", MotionAdapter, motion, None, torch_dtype=parts.dtype)
    # from_unet2d random-inits a UNetMotionModel before copying the weights in:
    # keep that off the caller's RNG. Its closing .to(dtype) logs a warning about
    # fp32-only modules that UNetMotionModel does not have.
    with _seeded(_TINY_SEEDS["unet"]), _quiet("diffusers.models.modeling_utils"):
        return UNetMotionModel.from_unet2d(unet2d, adapter)


def _tokenizer_class(base: str | None) -> Any:
    """CLIPTokenizer, or a generic fast tokenizer for a local folder that holds only a
    ``tokenizer.json`` (a teacher trained here with its own vocabulary, e.g. the demo's)."""
    folder = Path(base) / "tokenizer" if base is not None else None
    if folder is not None and (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    return CLIPTokenizer


def _load_components(spec: TeacherSpec, dtype: torch.dtype) -> dict[str, Any]:
    parts = _Parts(spec, dtype)
    return {
        "unet": _load_unet(spec, parts),
        "vae": parts.get("vae", AutoencoderKL, spec.base, "vae", torch_dtype=dtype),
        # transformers 5 names the argument `dtype` where diffusers says `torch_dtype`.
        "text_encoder": parts.get(
            "text_encoder", CLIPTextModel, spec.base, "text_encoder", dtype=dtype
        ),
        "tokenizer": parts.get("tokenizer", _tokenizer_class(spec.base), spec.base, "tokenizer"),
        # SD1.5 ships a PNDM (sampling) config; its betas are the training schedule.
        "scheduler": parts.get("scheduler", DDPMScheduler, spec.base, "scheduler"),
    }


def _directory_spec(directory: str, motion_adapter: str | None) -> TeacherSpec:
    """A spec for a pipeline folder that is not in the registry."""
    unet_config = _load_config(UNet2DConditionModel, directory, "unet")
    is_motion_unet = unet_config.get("_class_name") == UNetMotionModel.__name__
    family = "animatediff" if motion_adapter is not None or is_motion_unet else "sd15"
    vae_config = _load_config(AutoencoderKL, directory, "vae")
    vae_scale = vae_scale_factor(vae_config["block_out_channels"])
    return TeacherSpec(
        name=directory,
        family=family,
        base=directory,
        motion_adapter=motion_adapter,
        frames=VDA_FRAMES,
        resolution=unet_config["sample_size"] * vae_scale,
        tiny=False,
        description=f"{family} pipeline loaded from {directory}",
    )


def load_teacher(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    base: str | None = None,
    motion_adapter: str | None = None,
) -> DiffusionTeacher:
    """Load a frozen teacher by registry name, or from a local pipeline directory.

    ``base`` / ``motion_adapter`` replace the spec's locations (a local directory
    or an HF id), e.g. to load a mirrored checkpoint or a trained tiny teacher; the
    returned teacher's ``spec`` records where it was loaded from.
    """
    if name in TEACHER_MODELS:
        spec = TEACHER_MODELS[name]
        overrides = {"base": base, "motion_adapter": motion_adapter}
        spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    elif Path(name).is_dir():
        if base is not None:
            raise InvalidInput(f"base: {name} is already the pipeline directory, got base={base!r}")
        spec = _directory_spec(name, motion_adapter)
    else:
        raise NotFound(
            f"teacher model {name!r} is neither a registry name nor a directory; "
            f"known: {sorted(TEACHER_MODELS)}"
        )
    components = _load_components(spec, dtype)
    teacher = DiffusionTeacher(spec=spec, **components)
    return teacher.to(device=device, dtype=dtype)
