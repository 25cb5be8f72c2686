"""Student families beyond Video-LLaVA: Qwen2.5-VL, InternVL3, LLaVA-NeXT-Video.

For each family, "the video encoder" E_phi is the module stage 2 trains (the
``tower`` of its :class:`VideoEncoder`, a submodule of the full VideoLLM, so
its state dict loads back into it) and F_V is read out of it as follows.

Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``; module ``model.model.visual``)
    E_phi is the whole vision transformer *including the patch merger* (the
    2 x 2 merge MLP that maps into the LLM width): Qwen has no separate
    projector, the merger is its last vision layer. Frames go in as one video
    with Qwen's own temporal patching: 2 consecutive frames form one temporal
    patch (an odd frame count repeats the last frame, as Qwen's processor
    does), patches are flattened in the order of Qwen's video processor. F_V
    has one step per temporal patch, ``T' = ceil(T / 2)``: ``"frame"`` averages
    the merged tokens of a temporal patch, ``"grid:G"`` pools the merged grid to
    G x G. d_v = ``vision_config.out_hidden_size`` (the LLM width, 3584 for 7B).
    Frames are resized to a fixed ``image_size`` (224 for the real model, a
    multiple of patch 14 x merge 2; Qwen's dynamic resolution is not used).

InternVL3 (``OpenGVLab/InternVL3-8B-hf``, ``InternVLForConditionalGeneration``;
module ``model.model.vision_tower``)
    E_phi is the InternViT vision tower only. The pixel-shuffle + MLP projector
    (``multi_modal_projector``) is left out, as Video-LLaVA's projector is: it
    maps into the LLM and is the LLM side's interface; the tower's
    ``hidden_size`` is the natural feature width. Frames go in as images
    (InternVL has no video path), 448 px with ImageNet mean/std. F_V: hidden
    states at ``vision_feature_layer`` (-1: ``last_hidden_state``), CLS dropped
    for the ``"default"`` strategy; ``"frame"`` averages the patch tokens of a
    frame, ``"grid:G"`` pools the patch grid.

LLaVA-NeXT-Video (``llava-hf/LLaVA-NeXT-Video-7B-hf``; module
``model.model.vision_tower``)
    E_phi is the CLIP ViT-L/14-336 vision tower. The 2 x 2 average-pool
    resampler and the projector come after it and belong to the LLM side. F_V
    is read exactly as for Video-LLaVA (:class:`VideoLlavaEncoder`): hidden
    states at ``vision_feature_layer`` (-2), CLS dropped, frame mean or grid.

Each family also has a tiny preset (random-init config of the real classes,
deterministic under a seed, built inside ``torch.random.fork_rng``) and reads
a real checkpoint's tower tensors by key prefix (:func:`_load_tower`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.encoder import (
    _FAMILY_LOADERS,
    CLIP_MEAN,
    CLIP_STD,
    VideoEncoder,
    VideoLlavaEncoder,
    _load_tower,
)
from vidalign.students.registry import StudentSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet pixel mean (RGB); InternViT uses it."""
IMAGENET_STD = (0.229, 0.224, 0.225)

QWEN_IMAGE_SIZE = 224
"""Fixed frame size for the real Qwen2.5-VL encoder (multiple of 14 x 2)."""


def _build(cls_name: str, config: Any, seed: int) -> Any:
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config)
    return model.eval()


def _pool_grid(tokens: Tensor, grid: int | None) -> Tensor:
    """``(N, h, w, d)`` token grids -> ``(N, 1, d)`` mean or ``(N, G*G, d)`` pooled."""
    if grid is None:
        return tokens.flatten(1, 2).mean(dim=1, keepdim=True)
    pooled = F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid)
    return pooled.flatten(2).transpose(1, 2)


def _freeze_after(layers: nn.ModuleList, deepest: int, extra: list[nn.Module]) -> None:
    """Freeze layers ``deepest..`` and ``extra``: they cannot influence F_V."""
    for unused in (*layers[deepest:], *extra):
        unused.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL


class Qwen25VLEncoder(VideoEncoder):
    """Qwen2.5-VL's vision transformer + merger on a video (see the module docstring)."""

    def __init__(
        self, *, spec: StudentSpec, tower: nn.Module, config: Any, pooling: str, image_size: int
    ) -> None:
        vision = config.vision_config
        super().__init__(
            spec=spec,
            tower=tower,
            d_v=vision.out_hidden_size,
            image_size=image_size,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            pooling=pooling,
        )
        self.patch_size = vision.patch_size
        self.merge = vision.spatial_merge_size
        self.frames_per_step = vision.temporal_patch_size
        unit = self.patch_size * self.merge
        if image_size % unit:
            raise InvalidInput(
                f"image_size: must be a multiple of patch x merge = {unit}, got {image_size}"
            )
        self.merged_grid = image_size // unit
        if self.grid is not None and self.grid > self.merged_grid:
            raise InvalidInput(
                f"pooling: grid size must be at most the merged token grid ({self.merged_grid}), got {pooling!r}"
            )

    def patchify(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, 3, S, S)`` pixels -> Qwen's flattened video patches and ``video_grid_thw``.

        The model's own input format (``pixel_values_videos``, ``video_grid_thw``);
        each video gives ``t * h * w / merge**2`` merged tokens.
        """
        b, t, c, s, _ = pixel_values.shape
        tp, p, m = self.frames_per_step, self.patch_size, self.merge
        if t % tp:  # Qwen's processor repeats the last frame to fill a temporal patch
            pad = pixel_values[:, -1:].expand(b, tp - t % tp, c, s, s)
            pixel_values = torch.cat([pixel_values, pad], dim=1)
            t = pixel_values.shape[1]
        gt, gh = t // tp, s // p
        # Qwen2-VL video processor order: (t, h/m, w/m, m, m) tokens of (c, tp, p, p) values.
        patches = (
            pixel_values.reshape(b, gt, tp, c, gh // m, m, p, gh // m, m, p)
            .permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
            .reshape(b * gt * gh * gh, c * tp * p * p)
        )
        grid_thw = torch.tensor([[gt, gh, gh]] * b, device=pixel_values.device)
        return patches, grid_thw

    def _features(self, pixel_values: Tensor) -> Tensor:
        b = pixel_values.shape[0]
        patches, grid_thw = self.patchify(pixel_values)
        gt, gh = int(grid_thw[0, 0]), int(grid_thw[0, 1])
        merged = self.tower(patches, grid_thw=grid_thw).pooler_output
        g = gh // self.merge
        tokens = _pool_grid(merged.view(b * gt, g, g, -1), self.grid)
        return tokens.reshape(b, gt * tokens.shape[1], -1)


def tiny_qwen2_5_vl_config() -> Any:
    """Qwen2.5-VL at toy size: ViT 32 wide, 2 blocks, patch 4, merge 2; 16 px frames -> 2 x 2
    merged tokens per temporal patch; tiny Qwen2 LLM (head_dim 16, mrope [2, 3, 3])."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 10000.0,
            },
        },
        image_token_id=125,
        video_token_id=126,
        vision_start_token_id=123,
        vision_end_token_id=124,
    )


TINY_QWEN_IMAGE_SIZE = 16


def build_tiny_qwen2_5_vl(seed: int = 0) -> Any:
    """The whole tiny Qwen2.5-VL, weights fixed by ``seed``."""
    return _build("Qwen2_5_VLForConditionalGeneration", tiny_qwen2_5_vl_config(), seed)


def _load_qwen2_5_vl(
    spec: StudentSpec, *, device, dtype, pooling: str, path: str | None
) -> VideoEncoder:
    image_size = TINY_QWEN_IMAGE_SIZE if spec.tiny else QWEN_IMAGE_SIZE
    if path is None and spec.tiny:
        model = build_tiny_qwen2_5_vl()
        config, tower = model.config, model.model.visual
    else:
        _require_source(spec, path)
        config, tower = _load_tower(
            path, spec.hf_id, model_type="qwen2_5_vl", prefixes=("model.visual.", "visual.")
        )
    return Qwen25VLEncoder(
        spec=spec,
        tower=tower.to(device=device, dtype=dtype),
        config=config,
        pooling=pooling,
        image_size=image_size,
    )


# --------------------------------------------------------------------------------------------
# InternVL3


class InternVLEncoder(VideoEncoder):
    """InternVL's InternViT on each frame as an image (see the module docstring)."""

    def __init__(self, *, spec: StudentSpec, tower: nn.Module, config: Any, pooling: str) -> None:
        vision = config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        super().__init__(
            spec=spec,
            tower=tower,
            d_v=vision.hidden_size,
            image_size=size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling=pooling,
        )
        self.feature_layer = config.vision_feature_layer
        if not isinstance(self.feature_layer, int):
            raise InvalidInput(
                f"vision_feature_layer: expected one layer, got {self.feature_layer!r}"
            )
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.patch_grid = size // patch
        if self.grid is not None and self.grid > self.patch_grid:
            raise InvalidInput(
                f"pooling: grid size must be at most the patch grid ({self.patch_grid}), got {pooling!r}"
            )
        if self.feature_layer != -1:
            deepest = self.feature_layer % (vision.num_hidden_layers + 1)
            _freeze_after(tower.encoder.layer, deepest, [tower.layernorm])

    def _features(self, pixel_values: Tensor) -> Tensor:
        b, t = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)
        if self.feature_layer == -1:  # the model reads last_hidden_state (after layernorm)
            hidden = self.tower(frames).last_hidden_state
        else:
            hidden = self.tower(frames, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.grid is None:
            tokens = hidden[:, 1:] if self.drop_cls else hidden
            return tokens.mean(dim=1).view(b, t, -1)
        g = self.patch_grid
        pooled = _pool_grid(hidden[:, 1:].unflatten(1, (g, g)), self.grid)
        return pooled.reshape(b, t * self.grid**2, -1)


def tiny_internvl_config() -> Any:
    """InternVL3 at toy size: InternViT 32 wide, 2 layers, 32 px, 8 px patches (4 tokens per
    frame after pixel shuffle); tiny Qwen2 LLM."""
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [32, 32],
            "patch_size": [8, 8],
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        image_token_id=127,
        image_seq_length=4,
    )


def build_tiny_internvl(seed: int = 0) -> Any:
    """The whole tiny InternVL, weights fixed by ``seed``."""
    return _build("InternVLForConditionalGeneration", tiny_internvl_config(), seed)


def _load_internvl(
    spec: StudentSpec, *, device, dtype, pooling: str, path: str | None
) -> VideoEncoder:
    if path is None and spec.tiny:
        model = build_tiny_internvl()
        config, tower = model.config, model.model.vision_tower
    else:
        _require_source(spec, path)
        config, tower = _load_tower(
            path,
            spec.hf_id,
            model_type="internvl",
            prefixes=("model.vision_tower.", "vision_tower."),
        )
    return InternVLEncoder(
        spec=spec, tower=tower.to(device=device, dtype=dtype), config=config, pooling=pooling
    )


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT-Video


class LlavaNextVideoEncoder(VideoLlavaEncoder):
    """LLaVA-NeXT-Video's CLIP vision tower, read out as Video-LLaVA's is."""


def tiny_llava_next_video_config() -> Any:
    """LLaVA-NeXT-Video at toy size: CLIP ViT 32 wide, 2 layers, 32 px, 8 px patches (16 patch
    tokens, 2 x 2 = 4 per frame after the stride-2 resampler); tiny Llama."""
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(
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
        image_grid_pinpoints=[[32, 32]],
        image_seq_length=16,
        video_seq_length=4,
    )


def build_tiny_llava_next_video(seed: int = 0) -> Any:
    """The whole tiny LLaVA-NeXT-Video, weights fixed by ``seed``."""
    return _build("LlavaNextVideoForConditionalGeneration", tiny_llava_next_video_config(), seed)


def _load_llava_next_video(
    spec: StudentSpec, *, device, dtype, pooling: str, path: str | None
) -> VideoEncoder:
    if path is None and spec.tiny:
        model = build_tiny_llava_next_video()
        config, tower = model.config, model.model.vision_tower
    else:
        _require_source(spec, path)
        config, tower = _load_tower(
            path,
            spec.hf_id,
            model_type="llava_next_video",
            prefixes=("model.vision_tower.", "vision_tower."),
        )
    return LlavaNextVideoEncoder(
        spec=spec, tower=tower.to(device=device, dtype=dtype), config=config, pooling=pooling
    )


def _require_source(spec: StudentSpec, path: str | None) -> None:
    if path is None and spec.hf_id is None:
        raise InvalidInput(
            f"path: student {spec.name!r} has no hf_id, so a checkpoint path is required"
        )


_FAMILY_LOADERS.update(
    {
        "qwen2.5-vl": _load_qwen2_5_vl,
        "internvl": _load_internvl,
        "llava-next-video": _load_llava_next_video,
    }
)
