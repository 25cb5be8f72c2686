"""The teacher's request and result types, and their gRPC message streams.

``DenoisingLossRequest`` and ``TeacherInfo`` are what both implementations of
the teacher (in-process and gRPC) take and return, so a training loop does not
know which one it talks to. The functions below convert them to and from the
message streams of ``vidalign.teacher.v1`` using the tensor codec in
``vidalign.teacher.wire``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vidalign.errors import InvalidInput
from vidalign.teacher import wire
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.vda.loss import DenoisingLossResult

if TYPE_CHECKING:  # the motion package pulls in CogVideoX classes: import on use
    from vidalign.motionenhancer.inversion import Priors


@dataclass(kw_only=True)
class DenoisingLossRequest:
    """One batch for the teacher's denoising loss (VDA eq. 3/4)."""

    sample_ids: list[str]
    """One id per sample; with ``seed`` it fixes that sample's timesteps and noise."""
    features: torch.Tensor | None = None
    """Encoder features F_V, (B, T, d_v) float; None for a caption-only loss."""
    latents: torch.Tensor | None = None
    """Clean video latents z_0, (B, C, F, h, w) float (scaled as the UNet expects)."""
    pixels: torch.Tensor | None = None
    """Or raw frames, (B, F, H, W, 3) uint8: the teacher VAE-encodes and caches them."""
    captions: list[str] | None = None
    """One caption per sample, or None for the no-text ablation."""
    adapter_id: str = ""
    """Content digest of the adapter whose W_proj maps the features."""
    seed: int = 0
    num_draws: int = 1
    """Noise draws K per sample; the per-sample loss is their mean."""
    timestep_range: tuple[int, int] | None = None
    """Half-open range to draw timesteps from; None: the whole schedule."""
    timesteps: list[int] | None = None
    """Explicit timesteps, one per draw; overrides ``timestep_range``."""
    want_grad: bool = False
    """Also return dL/dF_V."""
    model: str = ""
    """The model the caller expects the teacher to host; empty accepts any."""


@dataclass(kw_only=True)
class AttentionPriorsRequest:
    """One clip for MotionEnhancer prior extraction on a CogVideoX teacher.

    Defaults are ``vidalign.motionenhancer.extract_priors``'s. Extraction is
    deterministic, so there is no seed.
    """

    video: torch.Tensor | np.ndarray
    """uint8 (F, H, W, 3) RGB frames, F = 4k + 1, H and W multiples of the patch size in pixels."""
    prompt: str
    """The clip's caption (or question); must not be empty."""
    negative_prompt: str = ""
    steps: int = 5
    guidance: float = 6.0
    head_ratio: float = 0.5
    token_ratio: float = 0.5
    chunk_size: int = 0
    """Query rows per attention-capture chunk; 0: chosen from the token count and device."""
    memory: bool = True
    model: str = ""
    """The model the caller expects the teacher to host; empty accepts any."""


@dataclass(kw_only=True)
class AdapterInfo:
    id: str
    feature_dim: int
    projection: str
    lora_rank: int
    source: str
    """Where the adapter was loaded from; over gRPC only its file name (``public_name``)."""


def public_name(location: str) -> str:
    """What GetInfo says about a model or adapter location: a registry name as it is, of a
    path or store URI only the last component, so that no directory, bucket or host of the
    server reaches a client."""
    return location.rstrip("/").rsplit("/", 1)[-1] if "/" in location else location


@dataclass(kw_only=True)
class TeacherInfo:
    model: str
    family: str
    cond_dim: int
    frames: int
    resolution: int
    latent_channels: int
    vae_scale_factor: int
    num_train_timesteps: int
    adapters: list[AdapterInfo] = field(default_factory=list)
    max_message_bytes: int = 0
    max_request_bytes: int = 0
    version: str = ""
    height: int = 0
    """Pixel height the model expects (0 from servers older than this field: use resolution)."""
    width: int = 0


# --- requests ---------------------------------------------------------------


def request_messages(
    request: DenoisingLossRequest, chunk_bytes: int = wire.CHUNK_BYTES
) -> Iterator[pb.DenoisingLossRequest]:
    """The request as a message stream: parameters first, then tensor pieces."""
    params = pb.DenoisingLossParams(
        sample_ids=request.sample_ids,
        captions=request.captions or [],
        adapter_id=request.adapter_id,
        seed=request.seed,
        num_draws=request.num_draws,
        timesteps=request.timesteps or [],
        want_grad=request.want_grad,
        model=request.model,
    )
    if request.timestep_range is not None:
        params.timestep_range.min, params.timestep_range.max = request.timestep_range
    tensors = {
        name: value
        for name, value in (
            ("features", request.features),
            ("latents", request.latents),
            ("pixels", request.pixels),
        )
        if value is not None
    }
    yield from _stream(pb.DenoisingLossRequest, "params", params, tensors, chunk_bytes)


def parse_request(
    messages: Iterable[pb.DenoisingLossRequest], max_bytes: int | None = None
) -> DenoisingLossRequest:
    """Assemble a request stream; InvalidInput/ResourceExhausted on malformed or oversized input."""
    params, tensors = _assemble(messages, max_bytes, "DenoisingLoss")
    unknown = set(tensors) - {"features", "latents", "pixels"}
    if unknown:
        raise InvalidInput(
            f"unknown tensors {sorted(unknown)}; a request carries features, latents or pixels"
        )
    return DenoisingLossRequest(
        sample_ids=list(params.sample_ids),
        features=tensors.get("features"),
        latents=tensors.get("latents"),
        pixels=tensors.get("pixels"),
        captions=list(params.captions) if params.captions else None,
        adapter_id=params.adapter_id,
        seed=params.seed,
        num_draws=params.num_draws,
        timestep_range=(
            (params.timestep_range.min, params.timestep_range.max)
            if params.HasField("timestep_range")
            else None
        ),
        timesteps=list(params.timesteps) or None,
        want_grad=params.want_grad,
        model=params.model,
    )


def _stream(
    message_type: Any, header_field: str, header: Any, tensors: dict[str, torch.Tensor],
    chunk_bytes: int,
) -> Iterator[Any]:
    """``tensors`` in pieces as a stream of ``message_type`` messages, ``header`` (params or
    a selection) in the ``header_field`` of the first one only."""
    for index, pieces in enumerate(wire.pack(tensors, chunk_bytes)):
        message = message_type(tensors=pieces)
        if index == 0:
            getattr(message, header_field).CopyFrom(header)
        yield message


def _assemble(
    messages: Iterable[Any], max_bytes: int | None, rpc: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The params and the tensors of ``rpc``'s request stream, whose first message, and only
    that one, carries the params; ResourceExhausted past ``max_bytes``."""
    assembler = wire.TensorAssembler(max_bytes)
    params = None
    for message in messages:
        if message.HasField("params"):
            if params is not None:
                raise InvalidInput("params were sent twice; send them in the first message only")
            params = message.params
        elif params is None:
            article = "an" if rpc[0] in "AEIOU" else "a"
            raise InvalidInput(f"the first message of {article} {rpc} stream must carry params")
        assembler.add(message.tensors)
    if params is None:
        raise InvalidInput(f"empty {rpc} request stream")
    return params, assembler.finish()


# --- results ----------------------------------------------------------------


def result_messages(
    result: DenoisingLossResult, chunk_bytes: int = wire.CHUNK_BYTES
) -> Iterator[pb.DenoisingLossResponse]:
    tensors = {"losses": result.losses, "timesteps": result.timesteps}
    if result.grad is not None:
        tensors["grad"] = result.grad
    for pieces in wire.pack(tensors, chunk_bytes):
        yield pb.DenoisingLossResponse(tensors=pieces)


def parse_result(messages: Iterable[pb.DenoisingLossResponse]) -> DenoisingLossResult:
    assembler = wire.TensorAssembler()
    for message in messages:
        assembler.add(message.tensors)
    tensors = assembler.finish()
    return DenoisingLossResult(
        losses=tensors["losses"], timesteps=tensors["timesteps"], grad=tensors.get("grad")
    )


# --- info -------------------------------------------------------------------


def info_message(info: TeacherInfo) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(
        model=public_name(info.model),
        family=info.family,
        cond_dim=info.cond_dim,
        frames=info.frames,
        resolution=info.resolution,
        latent_channels=info.latent_channels,
        vae_scale_factor=info.vae_scale_factor,
        num_train_timesteps=info.num_train_timesteps,
        adapters=[
            pb.AdapterInfo(
                id=a.id,
                feature_dim=a.feature_dim,
                projection=a.projection,
                lora_rank=a.lora_rank,
                source=public_name(a.source),
            )
            for a in info.adapters
        ],
        max_message_bytes=info.max_message_bytes,
        max_request_bytes=info.max_request_bytes,
        version=info.version,
        height=info.height,
        width=info.width,
    )


def parse_info(message: pb.GetInfoResponse) -> TeacherInfo:
    return TeacherInfo(
        model=message.model,
        family=message.family,
        cond_dim=message.cond_dim,
        frames=message.frames,
        resolution=message.resolution,
        latent_channels=message.latent_channels,
        vae_scale_factor=message.vae_scale_factor,
        num_train_timesteps=message.num_train_timesteps,
        adapters=[
            AdapterInfo(
                id=a.id,
                feature_dim=a.feature_dim,
                projection=a.projection,
                lora_rank=a.lora_rank,
                source=a.source,
            )
            for a in message.adapters
        ],
        max_message_bytes=message.max_message_bytes,
        max_request_bytes=message.max_request_bytes,
        version=message.version,
        height=message.height or message.resolution,
        width=message.width or message.resolution,
    )


# --- attention priors -------------------------------------------------------

_PRIORS_TENSORS = ("prior", "head_scores", "token_scores")


def priors_request_messages(
    request: AttentionPriorsRequest, chunk_bytes: int = wire.CHUNK_BYTES
) -> Iterator[pb.AttentionPriorsRequest]:
    """The request as a message stream: parameters first, then the video's pieces."""
    params = pb.AttentionPriorsParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        guidance=request.guidance,
        head_ratio=request.head_ratio,
        token_ratio=request.token_ratio,
        chunk_size=request.chunk_size,
        memory=request.memory,
        model=request.model,
    )
    video = request.video
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    yield from _stream(pb.AttentionPriorsRequest, "params", params, {"video": video}, chunk_bytes)


def parse_priors_request(
    messages: Iterable[pb.AttentionPriorsRequest], max_bytes: int | None = None
) -> AttentionPriorsRequest:
    """Assemble a request stream; InvalidInput/ResourceExhausted on malformed or oversized input."""
    params, tensors = _assemble(messages, max_bytes, "AttentionPriors")
    unknown = set(tensors) - {"video"}
    if unknown:
        raise InvalidInput(f"unknown tensors {sorted(unknown)}; an AttentionPriors request carries video")
    if "video" not in tensors:
        raise InvalidInput("video: missing; send the clip as a uint8 (F, H, W, 3) tensor 'video'")
    defaults = AttentionPriorsRequest(video=torch.empty(0), prompt="")
    optional = {
        name: getattr(params, name) if params.HasField(name) else getattr(defaults, name)
        for name in ("steps", "guidance", "head_ratio", "token_ratio", "chunk_size", "memory")
    }
    return AttentionPriorsRequest(
        video=tensors["video"],
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        model=params.model,
        **optional,
    )


def priors_result_messages(
    priors: Priors, chunk_bytes: int = wire.CHUNK_BYTES
) -> Iterator[pb.AttentionPriorsResponse]:
    selection = pb.AttentionPriorsSelection(
        selected_heads=[int(h) for h in priors.selected_heads],
        selected_tokens=[
            pb.SelectedToken(
                index=t.index, start=t.span[0], end=t.span[1], text=t.text, score=t.score
            )
            for t in priors.selected_tokens
        ],
        metadata_json=json.dumps(priors.metadata, default=str),
    )
    tensors = {
        name: getattr(priors, name).detach().float().cpu().contiguous() for name in _PRIORS_TENSORS
    }
    yield from _stream(pb.AttentionPriorsResponse, "selection", selection, tensors, chunk_bytes)


def parse_priors_result(messages: Iterable[pb.AttentionPriorsResponse]) -> Priors:
    from vidalign.motionenhancer.inversion import Priors
    from vidalign.motionenhancer.mtti import SelectedToken

    assembler = wire.TensorAssembler()
    selection: pb.AttentionPriorsSelection | None = None
    for message in messages:
        if message.HasField("selection"):
            selection = message.selection
        assembler.add(message.tensors)
    tensors = assembler.finish()
    if selection is None or not set(_PRIORS_TENSORS) <= tensors.keys():
        raise InvalidInput("the teacher's AttentionPriors response lacks the selection or a tensor")
    metadata: dict[str, Any] = json.loads(selection.metadata_json or "{}")
    return Priors(
        head_scores=tensors["head_scores"],
        selected_heads=list(selection.selected_heads),
        token_scores=tensors["token_scores"],
        selected_tokens=[
            SelectedToken(index=t.index, span=(t.start, t.end), text=t.text, score=t.score)
            for t in selection.selected_tokens
        ],
        prior=tensors["prior"],
        metadata=metadata,
    )
