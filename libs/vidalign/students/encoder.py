"""The student's video encoder E_phi: a video becomes F_V in R^{T x d_v}.

VDA trains only this part of a VideoLLM in stage 2 (the denoising loss reaches
it through W_proj), so a :class:`VideoEncoder` holds exactly the trainable
module (``tower``) and the two steps around it that decide what F_V means:

- :meth:`VideoEncoder.preprocess` -- uint8 frames -> normalised pixels, with the
  student's own frame sampling, resolution and mean/std, so that features match
  what the VideoLLM sees at inference;
- :meth:`VideoEncoder.forward` -- pixels -> F_V (float32, differentiable with
  respect to ``tower``'s parameters).

Plug-in point: any ``nn.Module`` that maps preprocessed frames
``(B, T, 3, S, S)`` to ``(B, T, d)`` features can be wrapped with
:meth:`VideoEncoder.from_module` and used wherever a registered student is.

Families. Each family's module (``vidalign.students.video_llava``, ...) holds
its :class:`VideoEncoder` subclass (how features are read out of the tower)
and registers a :class:`~vidalign.students.StudentFamily` that says how the
tower is built, tiny or from a checkpoint (the shared reader is
``vidalign.students.loading``); :func:`load_student` dispatches to it.

transformers is imported inside the functions that need it: importing it takes
seconds, and listing students (``STUDENT_MODELS``) should not pay for that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.family import StudentSpec, get_family, get_student_spec
from vidalign.video import check_video, uniform_indices

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP pixel mean (RGB, on [0, 1] pixels); Video-LLaVA's and Qwen2.5-VL's towers use it."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP pixel std (RGB)."""


def _parse_pooling(pooling: str) -> int | None:
    """``"frame"`` -> ``None``; ``"grid:G"`` -> ``G``."""
    if pooling == "frame":
        return None
    match = re.fullmatch(r"grid:([1-9][0-9]*)", pooling)
    if match is None:
        raise InvalidInput(
            f"pooling: expected 'frame' or 'grid:G' with an integer G >= 1, got {pooling!r}"
        )
    return int(match.group(1))


class VideoEncoder(nn.Module):
    """E_phi of one student: ``preprocess`` then ``forward`` gives F_V.

    Attributes: ``spec`` (what the student is), ``tower`` (the trainable
    parameters of stage 2; nothing else in this module has any), ``d_v``,
    ``num_frames`` (T sampled by ``preprocess``), ``image_size`` (S),
    ``mean``/``std``, ``pooling`` (``"frame"``: one token per frame;
    ``"grid:G"``: G x G tokens per frame) and ``tokens_per_frame`` (F_V has
    ``T * tokens_per_frame`` tokens, frame-major) and ``frames_per_step``
    (frames that become one temporal position: 1, except Qwen2.5-VL's
    temporal patches of 2; F_V then has ``ceil(T / frames_per_step)`` steps).

    The base class runs ``tower`` on the whole pixel tensor, which is the
    contract of a wrapped module (:meth:`from_module`); families override
    :meth:`_features` to read features out of their own tower.
    """

    def __init__(
        self,
        *,
        spec: StudentSpec,
        tower: nn.Module,
        d_v: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        pooling: str = "frame",
    ) -> None:
        super().__init__()
        for field, value in (
            ("d_v", d_v),
            ("image_size", image_size),
            ("num_frames", spec.num_frames),
        ):
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{field}: expected an integer >= 1, got {value!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InvalidInput(
                f"mean/std: expected 3 values each (RGB) with std > 0, got mean={tuple(mean)}, std={tuple(std)}"
            )
        self.spec = spec
        self.tower = tower
        self.d_v = d_v
        self.num_frames = spec.num_frames
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pooling = pooling
        self.grid = _parse_pooling(pooling)
        self.tokens_per_frame = 1 if self.grid is None else self.grid**2
        self.frames_per_step = 1

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        d_v: int,
        num_frames: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "custom",
    ) -> VideoEncoder:
        """Wrap a module mapping ``(B, T, 3, S, S)`` pixels to ``(B, T, d_v)`` features.

        ``mean``/``std`` are the normalisation the module was trained with; its
        output shape is checked on every call, so a wrong ``d_v`` fails loudly.
        """
        spec = StudentSpec(
            name=name,
            family="custom",
            hf_id=None,
            tiny=False,
            num_frames=num_frames,
            description=f"wrapped {type(module).__name__}",
        )
        return VideoEncoder(
            spec=spec, tower=module, d_v=d_v, image_size=image_size, mean=mean, std=std
        )

    def preprocess(self, video: Tensor) -> Tensor:
        """uint8 ``(B, N, H, W, 3)`` -> float32 ``(B, T, 3, S, S)`` on the video's device.

        T = ``num_frames`` indices spread uniformly over the N frames
        (``vidalign.video.uniform_indices``; frames repeat when N < T), each frame resized
        (bilinear, antialiased when shrinking) to S x S = ``image_size``,
        scaled to [0, 1] and normalised with the student's mean/std. The resize
        ignores aspect ratio: the toy and demo clips are square, and a crop
        policy belongs to the dataset, not to the encoder.
        """
        if not isinstance(video, Tensor):
            raise InvalidInput(f"video: expected a torch.Tensor, got {type(video).__name__}")
        check_video(video)
        indices = torch.tensor(uniform_indices(video.shape[1], self.num_frames), device=video.device)
        frames = video[:, indices]
        b, t, h, w, _ = frames.shape
        s = self.image_size
        x = frames.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).float().div_(255.0)
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).view(b, t, 3, s, s)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``(B, T, 3, S, S)`` pixels -> F_V ``(B, T' * tokens_per_frame, d_v)`` float32.

        ``T' = ceil(T / frames_per_step)``: T itself for per-frame towers.

        T need not equal ``num_frames``: the towers are per-frame, and a caller
        may encode more frames than the VideoLLM samples. Pixels are moved to
        the tower's device and dtype; F_V comes back in float32 because the
        teacher's loss and its gradient are computed in float32.
        """
        s = self.image_size
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
            actual = (
                pixel_values.dtype
                if isinstance(pixel_values, Tensor)
                else type(pixel_values).__name__
            )
            raise InvalidInput(
                f"pixel_values: expected a floating-point torch.Tensor (see preprocess), got {actual}"
            )
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, s, s) or 0 in pixel_values.shape:
            raise InvalidInput(
                f"pixel_values: expected shape (B, T, 3, {s}, {s}), got {tuple(pixel_values.shape)}"
            )
        param = next(self.tower.parameters(), None)
        if param is not None:
            pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        features = self._features(pixel_values)
        b, t = pixel_values.shape[:2]
        steps = -(-t // self.frames_per_step)
        expected = (b, steps * self.tokens_per_frame, self.d_v)
        if tuple(features.shape) != expected:
            raise InvalidInput(
                f"features of {type(self.tower).__name__}: expected shape {expected} "
                f"(B, T * tokens_per_frame, d_v), got {tuple(features.shape)}; check d_v and pooling"
            )
        return features.float()

    def _features(self, pixel_values: Tensor) -> Tensor:
        """Tower output for ``(B, T, 3, S, S)`` pixels on the tower's device and dtype."""
        return self.tower(pixel_values)


def pool_grid(tokens: Tensor, grid: int | None) -> Tensor:
    """``(N, h, w, d)`` token grids -> ``(N, 1, d)`` mean or ``(N, G*G, d)`` pooled."""
    if grid is None:
        return tokens.flatten(1, 2).mean(dim=1, keepdim=True)
    pooled = F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid)
    return pooled.flatten(2).transpose(1, 2)


def load_student(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pooling: str = "frame",
    path: str | None = None,
) -> VideoEncoder:
    """The video encoder of the registered student ``name``, in eval mode.

    Tiny presets are built (deterministic, no download) unless ``path`` is
    given; otherwise only the encoder's weights are read from ``path`` (a local
    checkpoint directory of the full VideoLLM) or from the spec's ``hf_id``.
    Parameters that cannot affect F_V are frozen (see the family's class);
    call ``.train()`` and freeze the rest as the training stage needs.
    """
    spec = get_student_spec(name)
    _parse_pooling(pooling)  # fail before fetching weights, not after
    family = get_family(spec)
    return family.load_encoder(spec, device=device, dtype=dtype, pooling=pooling, path=path)
