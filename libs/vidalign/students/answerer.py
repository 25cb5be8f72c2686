"""A trained student as an evaluation ``Answerer``: base VideoLLM + stage-2 encoder + LLM LoRA.

    llm = load_trained_videollm("video-llava-7b", encoder="s3://.../stage2/encoder",
                                lora="s3://.../stage3/lora")
    results = vidalign.eval.evaluate(items, videollm_answerer(llm), ...)

Each part is optional, so the same code scores the baseline, +stage 2 and
+stage 3 (the VDA table). Locations are store URIs, directories or files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vidalign.errors import NotFound
from vidalign.store import materialize
from vidalign.students.videollm import VideoLLM, load_videollm


def load_encoder_artifact(location: str) -> dict[str, torch.Tensor]:
    """The stage-2 ``VideoEncoder`` state dict at a store URI, directory or file."""
    from safetensors.torch import load_file

    local = materialize(location)
    path = local / "encoder.safetensors" if local.is_dir() else local
    if not path.is_file():
        raise NotFound(f"encoder: {location} holds no encoder.safetensors")
    return load_file(path)


def load_trained_videollm(
    student: str,
    *,
    path: str | None = None,
    encoder: str = "",
    lora: str = "",
    device: str = "cpu",
) -> VideoLLM:
    llm = load_videollm(student, device=device, path=path)
    if encoder:
        llm.load_encoder_state(load_encoder_artifact(encoder))
    if lora:
        from peft import PeftModel

        llm.model = PeftModel.from_pretrained(llm.model, str(materialize(lora)))
    llm.model.eval()
    return llm


def videollm_answerer(llm: VideoLLM, *, max_new_tokens: int = 16) -> Callable:
    """``answerer(items, videos) -> outputs`` with the model's own chat template and greedy decoding."""

    def answer(items, videos: list[np.ndarray]) -> list[str]:
        prompts = [item.prompt for item in items]
        shapes = {v.shape for v in videos}
        if len(shapes) == 1:
            batch = torch.from_numpy(np.stack(videos))
            return llm.generate(batch, prompts, max_new_tokens=max_new_tokens)
        # Videos of different sizes cannot share a batch tensor: one at a time.
        return [
            llm.generate(torch.from_numpy(v[None]), [p], max_new_tokens=max_new_tokens)[0]
            for v, p in zip(videos, prompts, strict=True)
        ]

    return answer
