"""Numeric precision, one vocabulary for the trainers (``train.precision``) and the teacher
(``teacher serve --dtype``, ``teacher.dtype``).

``fp32``, ``bf16`` and ``fp16`` (``float32``, ``bfloat16`` and ``float16`` are accepted as
the same names). What a trainer does at each (docs/design.md, "Precision"):

- ``fp32``: everything in float32 (the exactness tests run here).
- ``bf16`` / ``fp16``: frozen weights are stored in the half type (half the memory);
  trainable parameters stay float32 (the master weights AdamW updates: a 1e-5 step is
  below bfloat16's resolution for weights near 1, so pure-half training would lose it);
  forward passes run under ``torch.autocast`` so matmuls and convolutions compute in the
  half type. Under DeepSpeed the engine's own ``bf16`` / ``fp16`` section keeps the fp32
  master copy and casts the module; ``fp16`` without DeepSpeed scales the loss with
  ``torch.amp.GradScaler`` (fp16's narrow range underflows small gradients otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vidalign.errors import InvalidInput

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CHOICES = (*PRECISIONS, *ALIASES)


def precision_name(value: str, what: str = "precision") -> str:
    """The canonical name (fp32, bf16, fp16) of ``value``; InvalidInput naming ``what``."""
    name = ALIASES.get(value, value)
    if name not in PRECISIONS:
        raise InvalidInput(f"{what}: expected one of fp32, bf16, fp16 (or float32, bfloat16, "
                           f"float16), got {value!r}")
    return name


def precision_dtype(value: str, what: str = "precision") -> torch.dtype:
    return PRECISIONS[precision_name(value, what)]


def is_half(value: str) -> bool:
    return precision_name(value) != "fp32"


@contextlib.contextmanager
def autocast(value: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast`` to the half type for ``bf16`` / ``fp16``; nothing for ``fp32``."""
    name = precision_name(value)
    if name == "fp32":
        yield
        return
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, dtype=PRECISIONS[name]):
        yield


def enable_gradient_checkpointing(module: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every Hugging Face model inside ``module`` (a
    student's vision tower and LLM, a diffusers UNet): their layers' activations are
    recomputed in the backward pass instead of kept. transformers' is set non-reentrant, so
    frozen inputs need no grad hooks; the numbers are the same. Returns how many models
    took it; none is an error naming the module."""
    enabled = 0
    for sub in module.modules():
        if getattr(sub, "supports_gradient_checkpointing", False) and hasattr(
            sub, "gradient_checkpointing_enable"
        ):  # transformers
            if not getattr(sub, "is_gradient_checkpointing", False):
                sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            enabled += 1
        elif getattr(sub, "_supports_gradient_checkpointing", False) and hasattr(
            sub, "enable_gradient_checkpointing"
        ):  # diffusers
            sub.enable_gradient_checkpointing()
            enabled += 1
    if not enabled:
        raise InvalidInput(
            f"train.gradient_checkpointing: {type(module).__name__} holds no model that supports it"
        )
    return enabled


def keep_trainable_fp32(module: torch.nn.Module) -> int:
    """Cast the parameters that require grad to float32 (the master weights); returns how
    many were cast. Frozen parameters keep their (half) storage."""
    cast = 0
    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
