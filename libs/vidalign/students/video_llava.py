"""Video-LLaVA (``LanguageBind/Video-LLaVA-7B-hf``): a CLIP ViT applied frame by frame.

E_phi is the LanguageBind video tower (``model.model.video_tower``); the
multimodal projector comes after it and belongs to the LLM side. F_V is read
out as the VideoLLM reads it (:class:`VideoLlavaEncoder`).

Text: ``USER: <video>\\n{prompt} ASSISTANT: {reply}</s>``; the video path keeps
CLS, so ``<video>`` expands to T x (patches + 1) tokens, and the alignment
grid (``vidalign.motionenhancer.align``) drops the CLS columns (the prior has no CLS
analogue). Parameter groups: the video and image towers are the vision group,
``multi_modal_projector`` the projector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.encoder import CLIP_MEAN, CLIP_STD, VideoEncoder
from vidalign.students.family import (
    StudentFamily,
    StudentSpec,
    VisionGrid,
    encoder_factory,
    family_students,
    register_family,
)
from vidalign.students.loading import TINY_LLM, build_tiny_model

if TYPE_CHECKING:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration


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


TINY_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
"""The LLaVA families' tiny CLIP vision tower: 32 wide, 2 layers, 32 px, 8 px patches."""


def tiny_video_llava_config() -> VideoLlavaConfig:
    """Video-LLaVA at toy size: CLIP ViT 32 wide, 2 layers, 32 px, 8 px patches; tiny Llama.

    Token counts follow the real model: an image has 16 patch tokens (CLS
    dropped), a video 8 frames x 17 tokens (the video path keeps CLS).
    """
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config={**TINY_CLIP_VISION},
        text_config={"model_type": "llama", **TINY_LLM},
        image_token_index=126,
        video_token_index=127,
        image_seq_length=16,
        video_seq_length=8 * 17,
    )


def build_tiny_video_llava(seed: int = 0) -> VideoLlavaForConditionalGeneration:
    """The whole tiny VideoLLM, with weights fixed by ``seed`` (the caller's RNG untouched)."""
    return build_tiny_model("VideoLlavaForConditionalGeneration", tiny_video_llava_config(), seed)


VIDEO_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% else -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' %} {% else -%}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT: {% endif -%}"
)
"""Video-LLaVA's conversation format, ``USER: <video>\\n{prompt} ASSISTANT: {reply}</s>``."""

LLAVA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 126, "<video>": 127}
"""Special tokens of the LLaVA families' tiny tokenizers and their ids in the tiny configs."""

LLAVA_TEXT: dict[str, Any] = {
    "tiny_specials": LLAVA_SPECIALS,
    "tiny_eos": "</s>",
    "chat_template": VIDEO_LLAVA_CHAT_TEMPLATE,
    "placeholder": "<video>",
    "video_token": "<video>",
}
"""The text fields of a :class:`StudentFamily` in Video-LLaVA's conversation format (the
LLaVA families': ``<video>`` is both the placeholder and the token the features fill)."""


def _inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    # The video path keeps CLS: T x (patches + 1) tokens.
    n = pixels.shape[1] * (encoder.patch_grid**2 + 1)
    return {"pixel_values_videos": pixels}, "<video>" * n


def _vision_grid(encoder: Any, config: Any) -> VisionGrid:
    # T frames x (1 CLS + g x g patches); the CLS columns are not grid cells.
    t, g = encoder.num_frames, encoder.patch_grid
    cells = tuple(f * (g * g + 1) + 1 + p for f in range(t) for p in range(g * g))
    return VisionGrid(t, g, g, t * (g * g + 1), cells, 1, t)


FAMILY = register_family(
    StudentFamily(
        name="video-llava",
        students=family_students(
            "video-llava",
            tiny="tiny-videollava",
            tiny_description="Video-LLaVA classes at toy size (CLIP ViT: 32 wide, 2 layers, 32 px); random init.",
            name="video-llava-7b",
            hf_id="LanguageBind/Video-LLaVA-7B-hf",
            description="Video-LLaVA 7B; its LanguageBind video encoder (CLIP ViT-L/14, 224 px) is E_phi.",
        ),
        model_class="VideoLlavaForConditionalGeneration",
        build_tiny=build_tiny_video_llava,
        tower="model.video_tower",
        make_encoder=encoder_factory(VideoLlavaEncoder),
        model_type="video_llava",
        # transformers-5 module names, then the original hub naming (which
        # transformers 5 also writes in save_pretrained).
        checkpoint_prefixes=("model.video_tower.", "video_tower."),
        **LLAVA_TEXT,
        inputs=_inputs,
        vision_grid=_vision_grid,
        vision_modules=("model.video_tower", "model.image_tower"),
        projector_modules=("model.multi_modal_projector",),
    )
)
