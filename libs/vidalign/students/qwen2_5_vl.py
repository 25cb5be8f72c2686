"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``; module ``model.model.visual``).

E_phi is the whole vision transformer *including the patch merger* (the 2 x 2
merge MLP that maps into the LLM width): Qwen has no separate projector, the
merger is its last vision layer. Frames go in as one video with Qwen's own
temporal patching: 2 consecutive frames form one temporal patch (an odd frame
count repeats the last frame, as Qwen's processor does), patches are
flattened in the order of Qwen's video processor. F_V has one step per
temporal patch, ``T' = ceil(T / 2)``: ``"frame"`` averages the merged tokens of
a temporal patch, ``"grid:G"`` pools the merged grid to G x G. d_v =
``vision_config.out_hidden_size`` (the LLM width, 3584 for 7B). Frames are
resized to a fixed ``image_size`` (224 for the real model, a multiple of patch
14 x merge 2; Qwen's dynamic resolution is not used).

Text: ChatML, ``<|vision_start|><|video_pad|> x n<|vision_end|>`` with Qwen's
flattened video patches + ``video_grid_thw``. Alignment grid: ceil(T / 2)
temporal patches x (S / (patch * merge))^2 merged tokens. Parameter groups:
the merger is the projector, the rest of ``visual`` the vision group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.encoder import CLIP_MEAN, CLIP_STD, VideoEncoder, pool_grid
from vidalign.students.family import (
    StudentFamily,
    StudentSpec,
    VisionGrid,
    family_students,
    register_family,
)
from vidalign.students.loading import TINY_LLM, build_tiny_model
from vidalign.students.tokenizer import chatml_text

QWEN_IMAGE_SIZE = 224
"""Fixed frame size for the real Qwen2.5-VL encoder (multiple of 14 x 2)."""
TINY_QWEN_IMAGE_SIZE = 16


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
        tokens = pool_grid(merged.view(b * gt, g, g, -1), self.grid)
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
            **TINY_LLM,
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


def build_tiny_qwen2_5_vl(seed: int = 0) -> Any:
    """The whole tiny Qwen2.5-VL, weights fixed by ``seed``."""
    return build_tiny_model("Qwen2_5_VLForConditionalGeneration", tiny_qwen2_5_vl_config(), seed)


def _make_encoder(spec: StudentSpec, tower: nn.Module, config: Any, pooling: str) -> VideoEncoder:
    return Qwen25VLEncoder(
        spec=spec,
        tower=tower,
        config=config,
        pooling=pooling,
        image_size=TINY_QWEN_IMAGE_SIZE if spec.tiny else QWEN_IMAGE_SIZE,
    )


def _inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    patches, grid_thw = encoder.patchify(pixels)
    n = int(grid_thw[0].prod()) // encoder.merge**2
    return {"pixel_values_videos": patches, "video_grid_thw": grid_thw}, "<|video_pad|>" * n


def _vision_grid(encoder: Any, config: Any) -> VisionGrid:
    return VisionGrid.dense(encoder.num_frames, encoder.merged_grid, encoder.frames_per_step)


FAMILY = register_family(
    StudentFamily(
        name="qwen2.5-vl",
        students=family_students(
            "qwen2.5-vl",
            tiny="tiny-qwen2.5-vl",
            tiny_description="Qwen2.5-VL classes at toy size (ViT 32 wide, 2 blocks, patch 4, 16 px); random init.",
            name="qwen2.5-vl-7b",
            hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
            description="Qwen2.5-VL 7B Instruct; its vision transformer + merger (224 px, 2-frame temporal patches) is E_phi.",
            num_frames=16,
        ),
        model_class="Qwen2_5_VLForConditionalGeneration",
        build_tiny=build_tiny_qwen2_5_vl,
        tower="model.visual",
        make_encoder=_make_encoder,
        model_type="qwen2_5_vl",
        checkpoint_prefixes=("model.visual.", "visual."),
        **chatml_text(
            specials={
                "<|vision_start|>": 123,
                "<|vision_end|>": 124,
                "<|image_pad|>": 125,
                "<|video_pad|>": 126,
            },
            video="<|vision_start|><|video_pad|><|vision_end|>",
            image="<|vision_start|><|image_pad|><|vision_end|>",
            placeholder="<|video_pad|>",
            video_token="<|video_pad|>",
        ),
        inputs=_inputs,
        vision_grid=_vision_grid,
        vision_modules=("model.visual",),
        projector_modules=("model.visual.merger",),
    )
)
