"""The teacher gRPC server: one diffusion model per process.

The model decides the RPCs: a diffusion-loss teacher (AnimateDiff, SD 1.5,
``vidalign.vda``) answers DenoisingLoss; a CogVideoX teacher
(``vidalign.motionenhancer.COGVIDEOX_MODELS``) answers AttentionPriors. Either answers
the other RPC with FAILED_PRECONDITION and a message naming the right pool.

Start-up order matters to orchestrators: the port opens first with health
NOT_SERVING (so a probe gets an answer, not a refused connection), the model
loads, adapters load, and only then does health flip to SERVING. On SIGTERM
health flips back to NOT_SERVING at once, new calls get UNAVAILABLE (clients
wait for the restart or go to another replica), the calls in flight run to
completion for up to ``grace_s`` seconds, and the process exits (status 0).

With ``max_batch`` > 1 (``--max-batch``) concurrent DenoisingLoss calls with compatible
shapes share model runs (``vidalign_teacher.batching``).

With ``metrics_port`` (``--metrics-port``) the server also serves Prometheus
metrics over HTTP on that port from the start, while the model loads
(``vidalign_teacher.metrics``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
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
from vidalign.precision import CHOICES as PRECISION_CHOICES
from vidalign.precision import precision_dtype
from vidalign.store import is_store_uri, materialize, open_store, safe_key
from vidalign.teacher import protocol
from vidalign.teacher.client import DEFAULT_MAX_MESSAGE_BYTES
from vidalign.teacher.denoising import PreparedRequest, TeacherEngine
from vidalign.teacher.priors import PriorsEngine, is_cogvideox
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.loss import DenoisingLossResult
from vidalign_teacher.batching import Batcher, describe
from vidalign_teacher.drain import Drain
from vidalign_teacher.errors import ErrorInterceptor
from vidalign_teacher.limits import Limits, bind, check_config, grpc_call_cap, pool_threads
from vidalign_teacher.metrics import TeacherMetrics
from vidalign_teacher.security import HealthPort, add_port, check_server_flags, interceptors

log = get_logger("vidalign.teacher")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


@dataclass(kw_only=True)
class ServerConfig:
    model: str
    """Registry name of the diffusion model (``vidalign models list``) or a local directory."""
    host: str = "127.0.0.1"
    """Address to bind: loopback by default; deployments pass 0.0.0.0 (or [::]) explicitly."""
    port: int = 50051
    """0 picks a free port (tests)."""
    adapters: Sequence[str] = field(default_factory=list)
    """Adapter files or store URIs to load at start; requests address them by content digest."""
    weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged this model's weights; empty: the registry's sources."""
    latent_store: str = ""
    """Store URI for cached VAE latents (behind the memory cache); empty: memory only."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "fp32"
    """Teacher weights' dtype: fp32, bf16 or fp16 (or float32, bfloat16, float16; the loss is
    reduced in float32)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest single gRPC message accepted or sent."""
    max_request_bytes: int = 1 << 30
    """Largest assembled request (all tensors); larger ones get RESOURCE_EXHAUSTED."""
    workers: int = 8
    """Threads for health, GetInfo, reflection and refusals, beyond the ones admitted and
    queued model calls hold; model work is serialised by the engine."""
    latent_cache_bytes: int = 1 << 30
    """Memory cache of VAE latents (bytes); 0: none."""
    max_concurrent_rpcs: int = 8
    """Model calls (DenoisingLoss, AttentionPriors) admitted at once: reading, waiting, computing."""
    max_queued: int = 16
    """Model calls waiting for a slot; beyond them a call gets RESOURCE_EXHAUSTED at once."""
    max_inflight_bytes: int = 2 << 30
    """Request bytes held by all calls together, counted as they arrive (RESOURCE_EXHAUSTED beyond)."""
    stream_idle_timeout_s: float = 30.0
    """A model call whose client sends nothing for this long while its request is read is
    cancelled (DEADLINE_EXCEEDED) and its memory freed."""
    request_read_timeout_s: float = 300.0
    """A model call whose request is still arriving this long after it was admitted is
    cancelled the same way (a slow sender; at the default a 50 MB CogVideoX clip must
    arrive faster than ~170 kB/s). Independent of ``stream_idle_timeout_s``: whichever
    bound a stream passes first ends it."""
    max_batch: int = 1
    """Dynamic batching: DenoisingLoss calls with compatible shapes are joined into one
    model run of up to this many samples (``vidalign_teacher.batching``); 1: off."""
    max_wait_ms: float = 10.0
    """With ``max_batch`` > 1: how long the oldest queued call may wait for others to join
    (less once the batch is full); 0: join only the calls already queued."""
    tls_cert: str = ""
    """PEM certificate (chain) file; with ``tls_key`` the port speaks TLS only."""
    tls_key: str = ""
    """PEM private key file of ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA file: clients must present a certificate it signed (mutual TLS)."""
    token_file: str = ""
    """File holding the bearer token every call but health's must carry; empty: no token."""
    health_port: int = -1
    """Also serve grpc.health.v1 alone, in plaintext, on this port (for probes that cannot
    speak TLS); -1: no extra port, 0: a free one."""
    metrics_port: int = 0
    """Serve Prometheus metrics over plain HTTP at ``host:metrics_port/metrics``; 0: off."""
    grace_s: float = 30.0
    """On SIGTERM, how long the calls in flight may run on (new ones are refused at once);
    keep it below the orchestrator's kill timeout (Kubernetes: terminationGracePeriodSeconds)."""

    def __post_init__(self) -> None:
        check_server_flags(tls_cert=self.tls_cert, tls_key=self.tls_key,
                           tls_client_ca=self.tls_client_ca)
        if self.dtype not in PRECISION_CHOICES:
            raise ConfigError(f"dtype must be fp32, bf16 or fp16 (or float32, bfloat16, float16), "
                              f"got {self.dtype!r}")
        if self.max_message_bytes < (2 << 20):
            raise ConfigError("max_message_bytes must be at least 2 MiB (tensors stream in 1 MiB pieces)")
        if not self.grace_s >= 0:
            raise ConfigError(f"grace_s must be >= 0 seconds, got {self.grace_s}")
        check_config(self)


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: TeacherEngine | PriorsEngine | None = None
        self.batcher: Batcher[PreparedRequest, DenoisingLossResult] | None = None
        """Set by the server when ``max_batch`` > 1: DenoisingLoss calls go through it."""

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
        if self.batcher is None or not isinstance(engine, TeacherEngine):
            result = engine.denoising_loss(request)
        else:
            # Validated here, alone: a bad request fails before it joins a batch.
            prepared = engine.prepare(request)
            result = self.batcher.submit(prepared, key=prepared.key, size=prepared.size, context=context)
        return protocol.result_messages(result)

    def run_batch(self, batch: list[PreparedRequest]) -> list[DenoisingLossResult]:
        engine = self._engine()
        assert isinstance(engine, TeacherEngine)
        return engine.run_batch(batch)

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
        self.drain = Drain(SERVICE_NAME)
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # A second server on a used port must fail, not share the port's connections.
            ("grpc.so_reuseport", 0),
        ]
        # Admission, byte budget and idle timeout of the model calls (vidalign_teacher.limits).
        self.limits = Limits(
            {f"/{SERVICE_NAME}/DenoisingLoss", f"/{SERVICE_NAME}/AttentionPriors"},
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            max_queued=config.max_queued,
            max_inflight_bytes=config.max_inflight_bytes,
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            request_read_timeout_s=config.request_read_timeout_s,
        )
        limit_args = (config.max_concurrent_rpcs, config.max_queued, config.workers)
        rpcs = pb.DESCRIPTOR.services_by_name["TeacherService"].methods_by_name
        self.metrics = (
            TeacherMetrics(SERVICE_NAME, rpcs, self.limits, config.device)
            if config.metrics_port else None
        )
        self._load_start: float | None = None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=pool_threads(*limit_args), thread_name_prefix="teacher"
            ),
            # The metrics first (they count every refusal too), then the token check: a
            # caller without it reaches no handler. Then the drain (counts calls in
            # flight, refuses new ones on shutdown).
            interceptors=[*([self.metrics.interceptor] if self.metrics else []),
                          *interceptors(config.token_file), self.drain, ErrorInterceptor(SERVICE_NAME),
                          self.limits],
            options=options,
            maximum_concurrent_rpcs=grpc_call_cap(*limit_args),
        )
        pb_grpc.add_TeacherServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = bind(lambda: add_port(
            self.server, f"{config.host}:{config.port}", tls_cert=config.tls_cert,
            tls_key=config.tls_key, tls_client_ca=config.tls_client_ca, token_file=config.token_file,
        ), f"{config.host}:{config.port}")
        self.health_port = (
            HealthPort(self.health, config.host, config.health_port) if config.health_port >= 0 else None
        )
        if config.max_batch > 1:
            self.servicer.batcher = Batcher(
                self.servicer.run_batch,
                max_batch=config.max_batch,
                max_wait_s=config.max_wait_ms / 1e3,
                on_batch=self.metrics.observe_batch if self.metrics else None,
            )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)
        serving = status == health_pb2.HealthCheckResponse.SERVING
        if serving and self.metrics is not None and self._load_start is not None:
            self.metrics.model_load.set(time.perf_counter() - self._load_start)

    def start(self) -> None:
        """Open the port, load the model and adapters, then report SERVING."""
        self.server.start()
        if self.health_port is not None:
            self.health_port.start()
        if self.metrics is not None:
            self.metrics.serve(self.config.host, self.config.metrics_port)
        log.info("teacher_listening", port=self.port, model=self.config.model)
        self._load_start = time.perf_counter()
        from vidalign.hub import weights_component
        from vidalign.vda import load_teacher

        dtype = precision_dtype(self.config.dtype)
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
            model_name=protocol.public_name(self.config.model),
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
            **describe(self.servicer.batcher),
        )

    def _start_cogvideox(self, dtype: torch.dtype) -> None:
        from vidalign.motionenhancer import load_cogvideox

        if self.config.adapters:
            raise ConfigError(
                f"{self.config.model} is a CogVideoX teacher (AttentionPriors only): it takes no --adapter"
            )
        if self.config.latent_store:
            log.warning("latent_store_unused", model=self.config.model)
        if self.config.max_batch > 1:  # AttentionPriors calls are not batched (docs/design.md)
            log.warning("max_batch_unused", model=self.config.model, max_batch=self.config.max_batch)
        repo = str(materialize(self.config.weights)) if self.config.weights else None
        teacher = load_cogvideox(self.config.model, device=self.config.device, dtype=dtype, repo=repo)
        engine = PriorsEngine(
            teacher,
            model_name=protocol.public_name(self.config.model),
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

    def stop(self, grace: float | None = None) -> bool:
        """Drain, then stop: health NOT_SERVING and new calls UNAVAILABLE at once; the calls
        in flight get ``grace`` seconds (default ``config.grace_s``), then are cancelled.
        True when every call in flight finished."""
        grace = self.config.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        in_flight = self.drain.close()
        if in_flight:
            log.info("teacher_draining", in_flight=in_flight, grace_s=grace)
        drained = self.drain.wait_idle(grace)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.servicer.batcher is not None:
            self.servicer.batcher.stop()
        self.limits.stop()
        if self.health_port is not None:
            self.health_port.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
        if drained:
            log.info("teacher_stopped", drained=True)
        else:
            log.warning("teacher_stopped", drained=False, grace_s=grace)
        return drained


def serve(config: ServerConfig, server: TeacherServer | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain for ``config.grace_s`` and return (see ``stop``)."""
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
    log.info("teacher_signalled", grace_s=server.config.grace_s)
    if not server.stop():
        # A cancelled call's model work still holds a thread, and interpreter exit would
        # wait for it: leave now, within the grace period.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
