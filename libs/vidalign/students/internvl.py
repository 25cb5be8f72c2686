"""InternVL3 (``OpenGVLab/InternVL3-8B-hf``, ``InternVLForConditionalGeneration``;
module ``model.model.vision_tower``).

E_phi is the InternViT vision tower only. The pixel-shuffle + MLP projector
(``multi_modal_projector``) is left out, as Video-LLaVA's projector is: it maps
into the LLM and is the LLM side's interface; the tower's ``hidden_size`` is
the natural feature width. Frames go in as images (InternVL has no video
path), 448 px with ImageNet mean/std. F_V: hidden states at
``vision_feature_layer`` (-1: ``last_hidden_state``), CLS dropped for the
``"default"`` strategy; ``"frame"`` averages the patch tokens of a frame,
``"grid:G"`` pools the patch grid.

Text: ChatML; frames as images, ``pixel_values`` (B*T, 3, S, S) and
``Frame{i}: <img><IMG_CONTEXT> x k</img>`` per frame, as its processor writes.
Alignment grid: T frames x (g * downsample_ratio)^2 pixel-shuffled tokens; only
the IMG_CONTEXT positions count. Parameter groups: ``vision_tower`` /
``multi_modal_projector``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.encoder import VideoEncoder, pool_grid
from vidalign.students.family import (
    StudentFamily,
    StudentSpec,
    VisionGrid,
    encoder_factory,
    family_students,
    register_family,
)
from vidalign.students.loading import TINY_LLM, build_tiny_model
from vidalign.students.tokenizer import chatml_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet pixel mean (RGB); InternViT uses it."""
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            # Layers after the feature layer and the final layernorm cannot influence F_V.
            deepest = self.feature_layer % (vision.num_hidden_layers + 1)
            for unused in (*tower.encoder.layer[deepest:], tower.layernorm):
                unused.requires_grad_(False)

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
        pooled = pool_grid(hidden[:, 1:].unflatten(1, (g, g)), self.grid)
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
        text_config={"model_type": "qwen2", **TINY_LLM, "bos_token_id": 1, "eos_token_id": 2},
        image_token_id=127,
        image_seq_length=4,
    )


def build_tiny_internvl(seed: int = 0) -> Any:
    """The whole tiny InternVL, weights fixed by ``seed``."""
    return build_tiny_model("InternVLForConditionalGeneration", tiny_internvl_config(), seed)


def _inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    # Frames as images, each "Frame{i}: <img><IMG_CONTEXT> x k</img>\n" as InternVL's processor writes it.
    k = int(encoder.patch_grid * config.downsample_ratio) ** 2
    frames = "".join(
        f"Frame{i + 1}: <img>{'<IMG_CONTEXT>' * k}</img>\n" for i in range(pixels.shape[1])
    )
    return {"pixel_values": pixels.flatten(0, 1)}, frames


def _vision_grid(encoder: Any, config: Any) -> VisionGrid:
    return VisionGrid.dense(encoder.num_frames, int(encoder.patch_grid * config.downsample_ratio))


FAMILY = register_family(
    StudentFamily(
        name="internvl",
        students=family_students(
            "internvl",
            tiny="tiny-internvl3",
            tiny_description="InternVL classes at toy size (InternViT 32 wide, 2 layers, 32 px); random init.",
            name="internvl3-8b",
            hf_id="OpenGVLab/InternVL3-8B-hf",
            description="InternVL3 8B; its InternViT-300M vision tower (448 px, frames as images) is E_phi.",
        ),
        model_class="InternVLForConditionalGeneration",
        build_tiny=build_tiny_internvl,
        tower="model.vision_tower",
        make_encoder=encoder_factory(InternVLEncoder),
        model_type="internvl",
        checkpoint_prefixes=("model.vision_tower.", "vision_tower."),
        **chatml_text(
            specials={"<img>": 118, "</img>": 119, "<IMG_CONTEXT>": 127},
            video="{{ '<video>\\n' }}",
            image="{{ '<image>\\n' }}",
            placeholder="<video>",
            video_token="<IMG_CONTEXT>",
        ),
        inputs=_inputs,
        vision_grid=_vision_grid,
        vision_modules=("model.vision_tower",),
        projector_modules=("model.multi_modal_projector",),
    )
)
