"""The diffusion teacher of VDA: models, the conditioning adapter and the denoising loss.

``load_teacher`` gives a frozen AnimateDiff or SD1.5 teacher (real checkpoint or
tiny preset); an ``Adapter`` holds W_proj and the UNet LoRA; ``denoising_loss``
and ``loss_and_grad`` compute VDA's loss and dL/dF_V from seeded draws.
"""

from vidalign.vda.adapter import Adapter, file_digest
from vidalign.vda.diffusion import DiffusionTeacher
from vidalign.vda.loss import (
    DenoisingLossResult,
    denoising_loss,
    draw_generator,
    loss_and_grad,
)
from vidalign.vda.registry import TEACHER_MODELS, TeacherSpec, load_teacher, tiny_components
from vidalign.vda.tokenizer import tiny_clip_tokenizer

__all__ = [
    "TEACHER_MODELS",
    "Adapter",
    "DenoisingLossResult",
    "DiffusionTeacher",
    "TeacherSpec",
    "denoising_loss",
    "draw_generator",
    "file_digest",
    "load_teacher",
    "loss_and_grad",
    "tiny_clip_tokenizer",
    "tiny_components",
]
