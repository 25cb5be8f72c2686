"""The student's video encoder E_phi: a video becomes F_V in R^{T x d_v}.

VDA trains only this part of a VideoLLM in stage 2 (the denoising loss reaches
it through W_proj), so a :class:`VideoEncoder` holds exactly the trainable
module (``tower``) and the two steps around it that decide what F_V means:

- :meth:`VideoEncoder.preprocess` -- uint8 frames -> normalised pixels, with the
  student's own frame sampling, resolution and mean/std, so that features match
  what the VideoLLM sees at inference;
- :meth:`VideoEncoder.forward` -- pixels -> F_V (float32, differentiable with
  respect to ``tower``'s parameters).

Plug-in point: any ``nn.Module`` that maps preprocessed frames
``(B, T, 3, S, S)`` to ``(B, T, d)`` features can be wrapped with
:meth:`VideoEncoder.from_module` and used wherever a registered student is.

Families. A family is a :class:`VideoEncoder` subclass (how features are read
out of the tower) plus a loader registered in ``_FAMILY_LOADERS`` (how the
tower is built, tiny or from a checkpoint). Video-LLaVA is here; Qwen2.5-VL,
InternVL3 and LLaVA-NeXT-Video live in ``vidalign.students.families`` (which
registers itself when the package is imported) and share the checkpoint
reader :func:`_load_tower`.

transformers is imported inside the functions that need it: importing it takes
seconds, and listing students (``STUDENT_MODELS``) should not pay for that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput, NotFound
from vidalign.students.registry import StudentSpec, get_student_spec
from vidalign.video import check_video, uniform_indices

if TYPE_CHECKING:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP pixel mean (RGB, on [0, 1] pixels); Video-LLaVA's towers use it."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP pixel std (RGB)."""


def _parse_pooling(pooling: str) -> int | None:
    """``"frame"`` -> ``None``; ``"grid:G"`` -> ``G``."""
    if pooling == "frame":
        return None
    match = re.fullmatch(r"grid:([1-9][0-9]*)", pooling)
    if match is None:
        raise InvalidInput(
            f"pooling: expected 'frame' or 'grid:G' with an integer G >= 1, got {pooling!r}"
        )
    return int(match.group(1))


class VideoEncoder(nn.Module):
    """E_phi of one student: ``preprocess`` then ``forward`` gives F_V.

    Attributes: ``spec`` (what the student is), ``tower`` (the trainable
    parameters of stage 2; nothing else in this module has any), ``d_v``,
    ``num_frames`` (T sampled by ``preprocess``), ``image_size`` (S),
    ``mean``/``std``, ``pooling`` (``"frame"``: one token per frame;
    ``"grid:G"``: G x G tokens per frame) and ``tokens_per_frame`` (F_V has
    ``T * tokens_per_frame`` tokens, frame-major) and ``frames_per_step``
    (frames that become one temporal position: 1, except Qwen2.5-VL's
    temporal patches of 2; F_V then has ``ceil(T / frames_per_step)`` steps).

    The base class runs ``tower`` on the whole pixel tensor, which is the
    contract of a wrapped module (:meth:`from_module`); families override
    :meth:`_features` to read features out of their own tower.
    """

    def __init__(
        self,
        *,
        spec: StudentSpec,
        tower: nn.Module,
        d_v: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        pooling: str = "frame",
    ) -> None:
        super().__init__()
        for field, value in (
            ("d_v", d_v),
            ("image_size", image_size),
            ("num_frames", spec.num_frames),
        ):
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{field}: expected an integer >= 1, got {value!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InvalidInput(
                f"mean/std: expected 3 values each (RGB) with std > 0, got mean={tuple(mean)}, std={tuple(std)}"
            )
        self.spec = spec
        self.tower = tower
        self.d_v = d_v
        self.num_frames = spec.num_frames
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pooling = pooling
        self.grid = _parse_pooling(pooling)
        self.tokens_per_frame = 1 if self.grid is None else self.grid**2
        self.frames_per_step = 1

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        d_v: int,
        num_frames: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "custom",
    ) -> VideoEncoder:
        """Wrap a module mapping ``(B, T, 3, S, S)`` pixels to ``(B, T, d_v)`` features.

        ``mean``/``std`` are the normalisation the module was trained with; its
        output shape is checked on every call, so a wrong ``d_v`` fails loudly.
        """
        spec = StudentSpec(
            name=name,
            family="custom",
            hf_id=None,
            tiny=False,
            num_frames=num_frames,
            description=f"wrapped {type(module).__name__}",
        )
        return VideoEncoder(
            spec=spec, tower=module, d_v=d_v, image_size=image_size, mean=mean, std=std
        )

    def preprocess(self, video: Tensor) -> Tensor:
        """uint8 ``(B, N, H, W, 3)`` -> float32 ``(B, T, 3, S, S)`` on the video's device.

        T = ``num_frames`` indices spread uniformly over the N frames
        (``vidalign.video.uniform_indices``; frames repeat when N < T), each frame resized
        (bilinear, antialiased when shrinking) to S x S = ``image_size``,
        scaled to [0, 1] and normalised with the student's mean/std. The resize
        ignores aspect ratio: the toy and demo clips are square, and a crop
        policy belongs to the dataset, not to the encoder.
        """
        if not isinstance(video, Tensor):
            raise InvalidInput(f"video: expected a torch.Tensor, got {type(video).__name__}")
        check_video(video)
        indices = torch.tensor(uniform_indices(video.shape[1], self.num_frames), device=video.device)
        frames = video[:, indices]
        b, t, h, w, _ = frames.shape
        s = self.image_size
        x = frames.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).float().div_(255.0)
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).view(b, t, 3, s, s)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``(B, T, 3, S, S)`` pixels -> F_V ``(B, T' * tokens_per_frame, d_v)`` float32.

        ``T' = ceil(T / frames_per_step)``: T itself for per-frame towers.

        T need not equal ``num_frames``: the towers are per-frame, and a caller
        may encode more frames than the VideoLLM samples. Pixels are moved to
        the tower's device and dtype; F_V comes back in float32 because the
        teacher's loss and its gradient are computed in float32.
        """
        s = self.image_size
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
            actual = (
                pixel_values.dtype
                if isinstance(pixel_values, Tensor)
                else type(pixel_values).__name__
            )
            raise InvalidInput(
                f"pixel_values: expected a floating-point torch.Tensor (see preprocess), got {actual}"
            )
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, s, s) or 0 in pixel_values.shape:
            raise InvalidInput(
                f"pixel_values: expected shape (B, T, 3, {s}, {s}), got {tuple(pixel_values.shape)}"
            )
        param = next(self.tower.parameters(), None)
        if param is not None:
            pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        features = self._features(pixel_values)
        b, t = pixel_values.shape[:2]
        steps = -(-t // self.frames_per_step)
        expected = (b, steps * self.tokens_per_frame, self.d_v)
        if tuple(features.shape) != expected:
            raise InvalidInput(
                f"features of {type(self.tower).__name__}: expected shape {expected} "
                f"(B, T * tokens_per_frame, d_v), got {tuple(features.shape)}; check d_v and pooling"
            )
        return features.float()

    def _features(self, pixel_values: Tensor) -> Tensor:
        """Tower output for ``(B, T, 3, S, S)`` pixels on the tower's device and dtype."""
        return self.tower(pixel_values)


# --------------------------------------------------------------------------------------------
# Video-LLaVA: a CLIP ViT applied frame by frame (``model.model.video_tower``).


class VideoLlavaEncoder(VideoEncoder):
    """Video-LLaVA's video tower, read out the way the VideoLLM reads it.

    Features are the hidden states at ``config.vision_feature_layer`` (before
    the multimodal projector, which belongs to the LLM side; a list of layers
    is concatenated along the feature axis, as the model does, so d_v is
    ``hidden_size * len(layers)``). ``"frame"`` pooling averages a frame's
    tokens, leaving out CLS when ``vision_feature_select_strategy`` is
    ``"default"``; ``"grid:G"`` average-pools the patch grid (never CLS) to
    G x G.

    The layers after the deepest feature layer and ``post_layernorm`` stay in
    ``tower`` (so its state dict loads back into the VideoLLM) but cannot
    influence F_V; they are frozen here because DDP and ZeRO fail on
    parameters that require a gradient and never get one. Build an optimizer
    from the parameters with ``requires_grad``.
    """

    def __init__(
        self, *, spec: StudentSpec, tower: nn.Module, config: VideoLlavaConfig, pooling: str
    ) -> None:
        vision = config.vision_config
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        super().__init__(
            spec=spec,
            tower=tower,
            d_v=vision.hidden_size * len(layers),
            image_size=vision.image_size,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            pooling=pooling,
        )
        self.feature_layers = layers
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.patch_grid = vision.image_size // vision.patch_size
        if self.grid is not None and self.grid > self.patch_grid:
            raise InvalidInput(
                f"pooling: grid size must be at most the patch grid ({self.patch_grid}), got {pooling!r}"
            )
        deepest = max(i % (vision.num_hidden_layers + 1) for i in layers)
        for unused in (*tower.encoder.layers[deepest:], tower.post_layernorm):
            unused.requires_grad_(False)

    def _features(self, pixel_values: Tensor) -> Tensor:
        b, t = pixel_values.shape[:2]
        out = self.tower(pixel_values.flatten(0, 1), output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        if self.grid is None:
            tokens = hidden[:, 1:] if self.drop_cls else hidden
            return tokens.mean(dim=1).view(b, t, -1)
        g = self.patch_grid
        patches = hidden[:, 1:].unflatten(1, (g, g)).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(patches, self.grid)
        return pooled.flatten(2).transpose(1, 2).reshape(b, t * self.grid**2, -1)


def tiny_video_llava_config() -> VideoLlavaConfig:
    """Video-LLaVA at toy size: CLIP ViT 32 wide, 2 layers, 32 px, 8 px patches; tiny Llama.

    Token counts follow the real model: an image has 16 patch tokens (CLS
    dropped), a video 8 frames x 17 tokens (the video path keeps CLS).
    """
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 128,
        },
        image_token_index=126,
        video_token_index=127,
        image_seq_length=16,
        video_seq_length=8 * 17,
    )


def build_tiny_video_llava(seed: int = 0) -> VideoLlavaForConditionalGeneration:
    """The whole tiny VideoLLM, with weights fixed by ``seed``.

    Initialised inside ``torch.random.fork_rng`` so that building it never
    shifts the caller's random stream (a training run's draws do not depend on
    whether a model was built first).
    """
    from transformers import VideoLlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoLlavaForConditionalGeneration(tiny_video_llava_config())
    return model.eval()


_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_TOWER_PREFIXES = ("model.video_tower.", "video_tower.")
"""Checkpoint key prefixes of the video tower: transformers-5 module names, then the
original hub naming (which transformers 5 also writes in ``save_pretrained``)."""


def _tower_key(key: str, prefixes: Sequence[str] = _TOWER_PREFIXES) -> str | None:
    """Checkpoint key -> key in the tower's state dict, or ``None`` if not a tower key.

    Hub checkpoints converted before transformers 5 nest CLIP under
    ``vision_model.``; transformers 5's ``CLIPVisionModel`` does not.
    """
    for prefix in prefixes:
        if key.startswith(prefix):
            return key.removeprefix(prefix).removeprefix("vision_model.")
    return None


def _checkpoint_dir(path: str | None, hf_id: str | None, files: list[str]) -> Path:
    """A local directory holding ``files`` (those that exist in the checkpoint).

    For a hub id only ``files`` are fetched (or found in the HF cache), so the
    7B model's LLM shards are never downloaded.
    """
    if path is not None:
        root = Path(path)
        if not root.is_dir():
            raise NotFound(f"path: student checkpoint directory {str(root)!r} does not exist")
        return root
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hf_id, allow_patterns=files))


def _load_video_llava_tower(
    path: str | None, hf_id: str | None
) -> tuple[VideoLlavaConfig, nn.Module]:
    """Build the video tower from the checkpoint's config and load only its tensors."""
    return _load_tower(path, hf_id, model_type="video_llava", prefixes=_TOWER_PREFIXES)


def _load_tower(
    path: str | None,
    hf_id: str | None,
    *,
    model_type: str,
    prefixes: Sequence[str],
    vision_config: Callable[[object], object] = lambda config: config.vision_config,  # type: ignore[attr-defined]
) -> tuple:
    """The VideoLLM's config and its vision tower, built from ``vision_config(config)``
    and filled with only the checkpoint tensors under one of ``prefixes``."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    source = path if path is not None else hf_id
    root = _checkpoint_dir(path, hf_id, ["config.json", _INDEX_FILE])
    if not (root / "config.json").is_file():
        raise NotFound(f"config.json: not found in student checkpoint {source!r}")
    config = AutoConfig.from_pretrained(root)
    if config.model_type != model_type:
        raise InvalidInput(
            f"config.json of {source!r}: expected model_type {model_type!r}, got {config.model_type!r}"
        )
    if (root / _INDEX_FILE).is_file():
        weight_map = json.loads((root / _INDEX_FILE).read_text())["weight_map"]
        shards = sorted({f for key, f in weight_map.items() if _tower_key(key, prefixes) is not None})
    else:
        shards = [_SINGLE_FILE]
    if not shards:
        raise InvalidInput(f"{_INDEX_FILE} of {source!r}: no key starts with {tuple(prefixes)}")
    if path is None:
        root = _checkpoint_dir(None, hf_id, shards)
    missing_files = [f for f in shards if not (root / f).is_file()]
    if missing_files:
        raise NotFound(
            f"safetensors: {missing_files} not found in student checkpoint {source!r} "
            f"(expected {_SINGLE_FILE}, or {_INDEX_FILE} and its shards)"
        )

    state: dict[str, Tensor] = {}
    for shard in shards:
        with safe_open(root / shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                name = _tower_key(key, prefixes)
                if name is None:
                    continue
                if name in state:
                    raise InvalidInput(f"{source!r}: tower weight {name!r} appears under two names")
                state[name] = f.get_tensor(key)

    # Every tensor is overwritten below, so random init would be wasted work
    # (seconds for ViT-L); non-persistent buffers are still computed.
    with no_init_weights():
        tower = AutoModel.from_config(vision_config(config))
    expected = tower.state_dict()
    problems = {
        "missing": sorted(expected.keys() - state.keys()),
        "unexpected": sorted(state.keys() - expected.keys()),
        "wrong shape": sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    }
    if any(problems.values()):
        summary = "; ".join(
            f"{kind} ({len(keys)}): {keys[:5]}" for kind, keys in problems.items() if keys
        )
        raise InvalidInput(
            f"{source!r}: video-tower weights do not match its config.json ({summary})"
        )
    tower.load_state_dict(state)
    return config, tower.eval()


def _load_video_llava(
    spec: StudentSpec,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    pooling: str,
    path: str | None,
) -> VideoEncoder:
    if path is None and spec.tiny:
        model = build_tiny_video_llava()
        config, tower = model.config, model.model.video_tower
    elif path is None and spec.hf_id is None:
        raise InvalidInput(
            f"path: student {spec.name!r} has no hf_id, so a checkpoint path is required"
        )
    else:
        config, tower = _load_video_llava_tower(path, spec.hf_id)
    return VideoLlavaEncoder(
        spec=spec, tower=tower.to(device=device, dtype=dtype), config=config, pooling=pooling
    )


_FAMILY_LOADERS: dict[str, Callable[..., VideoEncoder]] = {"video-llava": _load_video_llava}


def load_student(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pooling: str = "frame",
    path: str | None = None,
) -> VideoEncoder:
    """The video encoder of the registered student ``name``, in eval mode.

    Tiny presets are built (deterministic, no download) unless ``path`` is
    given; otherwise only the encoder's weights are read from ``path`` (a local
    checkpoint directory of the full VideoLLM) or from the spec's ``hf_id``.
    Parameters that cannot affect F_V are frozen (see the family's class);
    call ``.train()`` and freeze the rest as the training stage needs.
    """
    spec = get_student_spec(name)
    _parse_pooling(pooling)  # fail before fetching weights, not after
    try:
        loader = _FAMILY_LOADERS[spec.family]
    except KeyError:
        raise NotFound(
            f"student family {spec.family!r} of {name!r} has no loader; known: {sorted(_FAMILY_LOADERS)}"
        ) from None
    return loader(spec, device=device, dtype=dtype, pooling=pooling, path=path)
