"""The teacher's request and result types, and their gRPC message streams.

``DenoisingLossRequest`` and ``TeacherInfo`` are what both implementations of
the teacher (in-process and gRPC) take and return, so a training loop does not
know which one it talks to. The functions below convert them to and from the
message streams of ``vidalign.teacher.v1`` using the tensor codec in
``vidalign.wire``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from vidalign import wire
from vidalign.diffusion.loss import DenoisingLossResult
from vidalign.errors import InvalidInput
from vidalign.teacher.v1 import teacher_pb2 as pb


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
class AdapterInfo:
    id: str
    feature_dim: int
    projection: str
    lora_rank: int
    source: str


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
    for index, pieces in enumerate(wire.pack(tensors, chunk_bytes)):
        message = pb.DenoisingLossRequest(tensors=pieces)
        if index == 0:
            message.params.CopyFrom(params)
        yield message


def parse_request(
    messages: Iterable[pb.DenoisingLossRequest], max_bytes: int | None = None
) -> DenoisingLossRequest:
    """Assemble a request stream; InvalidInput/ResourceExhausted on malformed or oversized input."""
    assembler = wire.TensorAssembler(max_bytes)
    params: pb.DenoisingLossParams | None = None
    for message in messages:
        if message.HasField("params"):
            if params is not None:
                raise InvalidInput("params were sent twice; send them in the first message only")
            params = message.params
        elif params is None:
            raise InvalidInput("the first message of a DenoisingLoss stream must carry params")
        assembler.add(message.tensors)
    if params is None:
        raise InvalidInput("empty DenoisingLoss request stream")
    tensors = assembler.finish()
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
        model=info.model,
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
                source=a.source,
            )
            for a in info.adapters
        ],
        max_message_bytes=info.max_message_bytes,
        max_request_bytes=info.max_request_bytes,
        version=info.version,
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
    )
