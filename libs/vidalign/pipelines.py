"""diffusers pipeline folders, whichever teacher they hold (AnimateDiff/SD1.5, CogVideoX).

The two teacher registries (``vidalign.vda.registry``, ``vidalign.motionenhancer.cogvideox``)
load components and read configs the same way; the shared part lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vidalign.errors import NotFound


def from_pretrained(cls: Any, location: str, subfolder: str | None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(location, subfolder=subfolder)``; missing files or an unreachable
    hub raise :class:`NotFound` naming the class and where it was looked for."""
    try:
        return cls.from_pretrained(location, subfolder=subfolder, **kwargs)
    except OSError as e:  # missing files or an unreachable hub: both mean "not here"
        where = f"{location}/{subfolder}" if subfolder else location
        raise NotFound(f"cannot load {cls.__name__} from {where}: {e}") from e


def vae_scale_factor(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent along a side: each VAE down block but the last halves the side, as in
    the diffusers pipelines."""
    return 2 ** (len(block_out_channels) - 1)
