"""The CogVideoX teacher's request logic, shared by the gRPC service and the in-process teacher.

``PriorsEngine`` owns one loaded ``CogVideoXTeacher`` and answers
``AttentionPriorsRequest`` with MotionEnhancer's priors
(``vidalign.motionenhancer.extract_priors``). Like ``vidalign.teacher.denoising.TeacherEngine`` it
validates every request before touching the model, so a bad request raises a
``vidalign.errors`` exception naming the field, identically over gRPC and in
process. A CogVideoX teacher does not answer DenoisingLoss (FailedPrecondition).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

import vidalign
from vidalign.errors import FailedPrecondition, InvalidInput, NotFound
from vidalign.log import get_logger
from vidalign.motionenhancer.cogvideox import COGVIDEOX_MODELS, CogVideoXTeacher
from vidalign.motionenhancer.inversion import Priors, extract_priors
from vidalign.teacher.protocol import AttentionPriorsRequest, DenoisingLossRequest, TeacherInfo

log = get_logger(__name__)

FAMILY = "cogvideox"
MAX_STEPS = 200
"""Upper bound on DDIM steps per request (the paper uses 5; 50 is a full schedule)."""


def is_cogvideox(model: str) -> bool:
    """True for a CogVideoX registry name or a local CogVideoX pipeline directory."""
    if model in COGVIDEOX_MODELS:
        return True
    config = Path(model) / "transformer" / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "CogVideoXTransformer3DModel"
    except (OSError, json.JSONDecodeError):
        return False


class PriorsEngine:
    """Validates and answers AttentionPriors requests against one CogVideoX teacher."""

    def __init__(
        self,
        teacher: CogVideoXTeacher,
        *,
        model_name: str | None = None,
        max_message_bytes: int = 0,
        max_request_bytes: int = 0,
    ) -> None:
        self.teacher = teacher
        self.model_name = model_name or teacher.spec.name
        self.max_message_bytes = max_message_bytes
        self.max_request_bytes = max_request_bytes
        # Attention capture swaps the transformer's processors: one request at a time.
        self._lock = threading.Lock()

    @property
    def pixel_multiple(self) -> int:
        """H and W must be multiples of this: VAE downsampling x transformer patch size."""
        return self.teacher.vae_scale_spatial * self.teacher.transformer.config.patch_size

    def info(self) -> TeacherInfo:
        t, spec = self.teacher, self.teacher.spec
        return TeacherInfo(
            model=self.model_name,
            family=FAMILY,
            cond_dim=int(t.transformer.config.text_embed_dim),
            frames=spec.frames,
            resolution=spec.height,
            latent_channels=int(t.vae.config.latent_channels),
            vae_scale_factor=t.vae_scale_spatial,
            num_train_timesteps=int(t.scheduler.config.num_train_timesteps),
            adapters=[],
            max_message_bytes=self.max_message_bytes,
            max_request_bytes=self.max_request_bytes,
            version=vidalign.__version__,
            height=spec.height,
            width=spec.width,
        )

    def denoising_loss(self, request: DenoisingLossRequest):
        raise FailedPrecondition(
            f"DenoisingLoss is not served by a CogVideoX teacher ('{self.model_name}' hosts "
            "AttentionPriors only); point the client at a diffusion-loss teacher pool "
            "(e.g. `vidalign teacher serve --teacher-model tiny-animatediff`)"
        )

    def attention_priors(self, request: AttentionPriorsRequest) -> Priors:
        """Validate, then run DDIM inversion + capture + MHS + MTTI on the clip."""
        video = self._validate(request)
        with self._lock:
            priors = extract_priors(
                self.teacher,
                video,
                request.prompt,
                steps=request.steps,
                guidance=request.guidance,
                chunk_size=request.chunk_size,
                head_ratio=request.head_ratio,
                token_ratio=request.token_ratio,
                negative_prompt=request.negative_prompt,
                memory=request.memory,
            )
        priors.metadata["model"] = self.model_name
        return priors

    def _validate(self, request: AttentionPriorsRequest) -> np.ndarray:
        spec = self.teacher.spec
        if request.model and request.model != self.model_name:
            raise NotFound(
                f"model '{request.model}' is not hosted here: this teacher serves "
                f"'{self.model_name}'; point the client at the right teacher pool"
            )
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidInput(f"prompt: expected a non-empty str, got {request.prompt!r}")
        if not isinstance(request.negative_prompt, str):
            raise InvalidInput(f"negative_prompt: expected a str, got {request.negative_prompt!r}")
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise InvalidInput(f"steps: expected an int in [1, {MAX_STEPS}], got {request.steps!r}")
        if not math.isfinite(request.guidance) or request.guidance < 0:
            raise InvalidInput(f"guidance: expected a finite number >= 0, got {request.guidance!r}")
        for name in ("head_ratio", "token_ratio"):
            value = getattr(request, name)
            if not 0 < value <= 1:
                raise InvalidInput(f"{name}: expected a fraction in (0, 1], got {value!r}")
        if isinstance(request.chunk_size, bool) or not isinstance(request.chunk_size, int) \
                or request.chunk_size < 0:
            raise InvalidInput(f"chunk_size: expected an int >= 0 (0: auto), got {request.chunk_size!r}")

        video = request.video
        if video is None:
            raise InvalidInput("video: missing; send a uint8 (F, H, W, 3) tensor")
        if isinstance(video, torch.Tensor):
            if video.dtype != torch.uint8:
                raise InvalidInput(f"video: expected dtype uint8, got {video.dtype}")
            video = video.detach().cpu().contiguous().numpy()
        elif not isinstance(video, np.ndarray) or video.dtype != np.uint8:
            raise InvalidInput(
                f"video: expected dtype uint8, got {getattr(video, 'dtype', type(video).__name__)}"
            )
        if video.ndim != 4 or video.shape[-1] != 3:
            raise InvalidInput(f"video: expected shape (F, H, W, 3), got {list(video.shape)}")
        frames, height, width, _ = video.shape
        temporal = self.teacher.vae_scale_temporal
        if frames < 1 or (frames - 1) % temporal or frames > spec.frames:
            raise InvalidInput(
                f"video: {frames} frames; {self.model_name} takes {temporal}k + 1 frames, "
                f"at most {spec.frames} (e.g. {spec.frames})"
            )
        step = self.pixel_multiple
        if height == 0 or width == 0 or height % step or width % step:
            raise InvalidInput(
                f"video: frame size {height}x{width} must be a positive multiple of {step} "
                f"for {self.model_name} (native {spec.height}x{spec.width})"
            )
        if frames * height * width > spec.frames * spec.height * spec.width:
            raise InvalidInput(
                f"video: {frames}x{height}x{width} is larger than {self.model_name}'s native "
                f"{spec.frames}x{spec.height}x{spec.width}; send fewer or smaller frames"
            )
        return np.ascontiguousarray(video)
