"""LLaVA-NeXT-Video (``llava-hf/LLaVA-NeXT-Video-7B-hf``; module ``model.model.vision_tower``).

E_phi is the CLIP ViT-L/14-336 vision tower. The 2 x 2 average-pool resampler
and the projector come after it and belong to the LLM side. F_V is read
exactly as for Video-LLaVA (:class:`~vidalign.students.VideoLlavaEncoder`):
hidden states at ``vision_feature_layer`` (-2), CLS dropped, frame mean or grid.

Text: Video-LLaVA's conversation format; ``<video>`` expands to T x
(g / stride)^2 pooled patch tokens (``pixel_values_videos``), which are also
the alignment grid. Parameter groups: ``vision_tower`` /
``multi_modal_projector`` (``image_newline`` is with the LLM).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vidalign.students.family import (
    StudentFamily,
    VisionGrid,
    encoder_factory,
    family_students,
    register_family,
)
from vidalign.students.loading import TINY_LLM, build_tiny_model
from vidalign.students.video_llava import LLAVA_TEXT, TINY_CLIP_VISION, VideoLlavaEncoder


class LlavaNextVideoEncoder(VideoLlavaEncoder):
    """LLaVA-NeXT-Video's CLIP vision tower, read out as Video-LLaVA's is."""


def tiny_llava_next_video_config() -> Any:
    """LLaVA-NeXT-Video at toy size: CLIP ViT 32 wide, 2 layers, 32 px, 8 px patches (16 patch
    tokens, 2 x 2 = 4 per frame after the stride-2 resampler); tiny Llama."""
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(
        vision_config={**TINY_CLIP_VISION},
        text_config={"model_type": "llama", **TINY_LLM},
        image_token_index=126,
        video_token_index=127,
        image_grid_pinpoints=[[32, 32]],
        image_seq_length=16,
        video_seq_length=4,
    )


def build_tiny_llava_next_video(seed: int = 0) -> Any:
    """The whole tiny LLaVA-NeXT-Video, weights fixed by ``seed``."""
    return build_tiny_model(
        "LlavaNextVideoForConditionalGeneration", tiny_llava_next_video_config(), seed
    )


def _inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    # CLS dropped, then the stride-s average-pool resampler: T x (grid // s)^2 tokens.
    n = pixels.shape[1] * (encoder.patch_grid // config.spatial_pool_stride) ** 2
    return {"pixel_values_videos": pixels}, "<video>" * n


def _vision_grid(encoder: Any, config: Any) -> VisionGrid:
    return VisionGrid.dense(encoder.num_frames, encoder.patch_grid // config.spatial_pool_stride)


FAMILY = register_family(
    StudentFamily(
        name="llava-next-video",
        students=family_students(
            "llava-next-video",
            tiny="tiny-llava-next-video",
            tiny_description="LLaVA-NeXT-Video classes at toy size (CLIP ViT 32 wide, 2 layers, 32 px); random init.",
            name="llava-next-video-7b",
            hf_id="llava-hf/LLaVA-NeXT-Video-7B-hf",
            description="LLaVA-NeXT-Video 7B; its CLIP ViT-L/14 (336 px) vision tower is E_phi.",
        ),
        model_class="LlavaNextVideoForConditionalGeneration",
        build_tiny=build_tiny_llava_next_video,
        tower="model.vision_tower",
        make_encoder=encoder_factory(LlavaNextVideoEncoder),
        model_type="llava_next_video",
        checkpoint_prefixes=("model.vision_tower.", "vision_tower."),
        **LLAVA_TEXT,
        inputs=_inputs,
        vision_grid=_vision_grid,
        vision_modules=("model.vision_tower",),
        projector_modules=("model.multi_modal_projector",),
    )
)
