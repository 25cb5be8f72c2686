"""Frame sampling and resizing shared by students, teachers and data loaders."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vidalign.errors import InvalidInput


def uniform_indices(available: int, wanted: int) -> list[int]:
    """``wanted`` frame indices spread evenly over ``available`` frames.

    Both ends are included; with fewer frames than wanted, frames repeat.
    """
    if available < 1:
        raise InvalidInput("the video has no frames")
    if wanted < 1:
        raise InvalidInput(f"cannot sample {wanted} frames")
    return np.linspace(0, available - 1, wanted).round().astype(int).tolist()


def check_video(video: torch.Tensor, name: str = "video") -> None:
    """InvalidInput unless ``video`` is uint8 (B, F, H, W, 3) with no empty dimension."""
    if video.dtype != torch.uint8:
        raise InvalidInput(f"{name}: expected dtype uint8, got {video.dtype}")
    if video.dim() != 5 or video.shape[-1] != 3:
        raise InvalidInput(f"{name}: expected shape (B, F, H, W, 3), got {list(video.shape)}")
    if 0 in video.shape:
        raise InvalidInput(f"{name}: shape {list(video.shape)} has an empty dimension")


def sample_frames(video: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """uint8 (B, N, H, W, 3) -> uint8 (B, frames, size, size, 3): uniform in time, bilinear in space."""
    check_video(video)
    picked = video[:, uniform_indices(video.shape[1], frames)]
    b, f, h, w, _ = picked.shape
    if (h, w) == (size, size):
        return picked.contiguous()
    x = picked.reshape(b * f, h, w, 3).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).reshape(b, f, size, size, 3).contiguous()
