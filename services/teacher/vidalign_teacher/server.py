"""The teacher gRPC server: one diffusion model per process.

The model decides the RPCs: a diffusion-loss teacher (AnimateDiff, SD 1.5,
``vidalign.vda``) answers DenoisingLoss; a CogVideoX teacher
(``vidalign.motionenhancer.COGVIDEOX_MODELS``) answers AttentionPriors. Either answers
the other RPC with FAILED_PRECONDITION and a message naming the right pool.

Start-up order matters to orchestrators: the port opens first with health
NOT_SERVING (so a probe gets an answer, not a refused connection), the model
loads, adapters load, and only then does health flip to SERVING. On SIGTERM
health flips back to NOT_SERVING and in-flight calls get ``grace`` seconds.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vidalign.config import ConfigError
from vidalign.errors import Unavailable
from vidalign.log import get_logger
from vidalign.store import is_store_uri, materialize, open_store, safe_key
from vidalign.teacher import protocol
from vidalign.teacher.client import DEFAULT_MAX_MESSAGE_BYTES
from vidalign.teacher.denoising import TeacherEngine
from vidalign.teacher.priors import PriorsEngine, is_cogvideox
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign_teacher.errors import ErrorInterceptor

log = get_logger("vidalign.teacher")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


@dataclass(kw_only=True)
class ServerConfig:
    model: str
    """Registry name of the diffusion model (``vidalign models list``) or a local directory."""
    host: str = "[::]"
    port: int = 50051
    """0 picks a free port (tests)."""
    adapters: Sequence[str] = field(default_factory=list)
    """Adapter files or store URIs to load at start; requests address them by content digest."""
    weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged this model's weights; empty: the registry's sources."""
    latent_store: str = ""
    """Store URI for cached VAE latents (behind the memory cache); empty: memory only."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"
    """Teacher weights' dtype: float32, float16 or bfloat16 (the loss is reduced in float32)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest single gRPC message accepted or sent."""
    max_request_bytes: int = 1 << 30
    """Largest assembled request (all tensors); larger ones get RESOURCE_EXHAUSTED."""
    workers: int = 8
    """Threads accepting calls; model work is serialised by the engine."""
    latent_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_message_bytes < (2 << 20):
            raise ConfigError("max_message_bytes must be at least 2 MiB (tensors stream in 1 MiB pieces)")


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: TeacherEngine | PriorsEngine | None = None

    def _engine(self) -> TeacherEngine | PriorsEngine:
        if self.engine is None:
            raise Unavailable(f"the teacher is still loading {self.config.model}; retry shortly")
        return self.engine

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        return protocol.info_message(self._engine().info())

    def DenoisingLoss(
        self, request_iterator: Iterator[pb.DenoisingLossRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DenoisingLossResponse]:
        engine = self._engine()
        request = protocol.parse_request(request_iterator, self.config.max_request_bytes)
        log.info(
            "denoising_loss",
            batch=len(request.sample_ids),
            draws=request.num_draws,
            want_grad=request.want_grad,
            adapter_id=request.adapter_id or None,
            text=request.captions is not None,
        )
        result = engine.denoising_loss(request)
        return protocol.result_messages(result)

    def AttentionPriors(
        self, request_iterator: Iterator[pb.AttentionPriorsRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.AttentionPriorsResponse]:
        engine = self._engine()
        if not isinstance(engine, PriorsEngine):
            engine.attention_priors(None)  # FailedPrecondition, before reading the stream
        request = protocol.parse_priors_request(request_iterator, self.config.max_request_bytes)
        log.info(
            "attention_priors",
            frames=int(request.video.shape[0]) if request.video.ndim else 0,
            steps=request.steps,
            prompt_chars=len(request.prompt),
        )
        priors = engine.attention_priors(request)
        return protocol.priors_result_messages(priors)


class TeacherServer:
    """Owns the gRPC server, the health service and the loaded engine."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.servicer = TeacherServicer(config)
        self.health = health.HealthServicer()
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="teacher"),
            interceptors=[ErrorInterceptor(SERVICE_NAME)],
            options=options,
        )
        pb_grpc.add_TeacherServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self) -> None:
        """Open the port, load the model and adapters, then report SERVING."""
        self.server.start()
        log.info("teacher_listening", port=self.port, model=self.config.model)
        from vidalign.hub import weights_component
        from vidalign.vda import load_teacher

        dtype = getattr(torch, self.config.dtype)
        model = self.config.model
        if is_cogvideox(model):
            self._start_cogvideox(dtype)
            return
        sources: dict[str, str | None] = {}
        if self.config.weights:
            sources = {
                "base": weights_component(self.config.weights, "base"),
                "motion_adapter": weights_component(self.config.weights, "motion_adapter"),
            }
        elif is_store_uri(model):  # an SD1.5-layout pipeline committed to the store
            model = str(materialize(model))
        teacher = load_teacher(model, device=self.config.device, dtype=dtype, **sources)
        latent_store = None
        if self.config.latent_store:
            # Latents depend on the VAE: one namespace per model.
            latent_store = open_store(self.config.latent_store).child(
                safe_key(self.config.model.replace("://", "/"))
            )
        engine = TeacherEngine(
            teacher,
            model_name=self.config.model,
            max_message_bytes=self.config.max_message_bytes,
            max_request_bytes=self.config.max_request_bytes,
            latent_cache_bytes=self.config.latent_cache_bytes,
            latent_store=latent_store,
        )
        for location in self.config.adapters:
            engine.load_adapter(location)
        self.servicer.engine = engine
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        info = engine.info()
        log.info(
            "teacher_serving",
            port=self.port,
            model=info.model,
            family=info.family,
            device=self.config.device,
            dtype=self.config.dtype,
            adapters=[a.id for a in info.adapters],
        )

    def _start_cogvideox(self, dtype: torch.dtype) -> None:
        from vidalign.motionenhancer import load_cogvideox

        if self.config.adapters:
            raise ConfigError(
                f"{self.config.model} is a CogVideoX teacher (AttentionPriors only): it takes no --adapter"
            )
        if self.config.latent_store:
            log.warning("latent_store_unused", model=self.config.model)
        repo = str(materialize(self.config.weights)) if self.config.weights else None
        teacher = load_cogvideox(self.config.model, device=self.config.device, dtype=dtype, repo=repo)
        engine = PriorsEngine(
            teacher,
            model_name=self.config.model,
            max_message_bytes=self.config.max_message_bytes,
            max_request_bytes=self.config.max_request_bytes,
        )
        self.servicer.engine = engine
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "teacher_serving",
            port=self.port,
            model=self.config.model,
            family=engine.info().family,
            device=self.config.device,
            dtype=self.config.dtype,
        )

    def stop(self, grace: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        log.info("teacher_stopped")


def serve(config: ServerConfig, server: TeacherServer | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    server = server or TeacherServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except BaseException:
        server.stop(grace=0)
        raise
    stop.wait()
    server.stop()
