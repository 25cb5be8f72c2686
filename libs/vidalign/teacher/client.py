"""vidalign's Python client for the teacher, and the differentiable remote loss.

``connect(address)`` returns a teacher: ``"local"`` runs the diffusion model in
this process; ``"host:port"`` or ``"dns:///name:port"`` talks to the gRPC
teacher service (a ``dns:///`` name resolving to several replicas is balanced
round-robin). Both answer the same ``DenoisingLossRequest`` with the same
``DenoisingLossResult`` and raise the same ``vidalign.errors`` exceptions.

``RemoteDenoisingLoss`` wraps a teacher as a loss module. Its forward sends
F_V and returns each sample's denoising loss as a tensor; its backward hands
back the teacher's dL/dF_V scaled by the incoming gradient. The chain rule is
exact, so ``loss.backward()`` works unchanged under plain PyTorch, DDP
(gradient hooks fire on the encoder's parameters as usual) and DeepSpeed
(``engine.backward(loss)`` scales the incoming gradient)::

    from vidalign.teacher.client import RemoteDenoisingLoss, connect

    teacher = connect("dns:///teacher.vidalign.svc:50051")
    criterion = RemoteDenoisingLoss(teacher, adapter_id="sha256:...", num_draws=1)
    for step, batch in enumerate(loader):
        features = encoder(batch.frames)                     # (B, T, d_v), requires grad
        loss = criterion(features, pixels=batch.video, captions=batch.static_captions,
                         sample_ids=batch.ids, seed=step).mean()
        loss.backward()                                      # dL/dphi through the teacher
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
import torch

from vidalign.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VidalignError,
)
from vidalign.log import get_logger
from vidalign.teacher import protocol
from vidalign.teacher.protocol import AttentionPriorsRequest, DenoisingLossRequest, TeacherInfo
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.loss import DenoisingLossResult

if TYPE_CHECKING:
    from vidalign.motionenhancer.inversion import Priors
    from vidalign.teacher.denoising import TeacherEngine
    from vidalign.teacher.priors import PriorsEngine

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
"""Per-message gRPC limit on both sides. Tensors stream in 1 MiB pieces, so
only a misbehaving peer comes near it."""


class Teacher(Protocol):
    """What a training loop needs from a teacher, local or remote."""

    def info(self) -> TeacherInfo: ...

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult: ...

    def close(self) -> None: ...


# --- in-process -------------------------------------------------------------


class LocalTeacher:
    """The teacher in this process: same engine, same validation, no network."""

    def __init__(
        self,
        model: str,
        *,
        adapters: Sequence[str | Path] = (),
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from vidalign.teacher.priors import PriorsEngine, is_cogvideox

        self.engine: TeacherEngine | PriorsEngine
        if is_cogvideox(model):  # MotionEnhancer priors: AttentionPriors only
            from vidalign.motionenhancer import load_cogvideox

            if adapters:
                raise InvalidInput("adapters: a CogVideoX teacher takes no conditioning adapters")
            self.engine = PriorsEngine(
                load_cogvideox(model, device=device, dtype=dtype), model_name=model
            )
            return
        from vidalign.teacher.denoising import TeacherEngine
        from vidalign.vda import load_teacher

        self.engine = TeacherEngine(load_teacher(model, device=device, dtype=dtype), model_name=model)
        for path in adapters:
            self.engine.load_adapter(path)

    def info(self) -> TeacherInfo:
        return self.engine.info()

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult:
        # The engine may move or cast inputs; never hand it the caller's autograd graph.
        detached = replace(
            request, features=None if request.features is None else request.features.detach()
        )
        return self.engine.denoising_loss(detached)

    def attention_priors(self, request: AttentionPriorsRequest) -> Priors:
        """MotionEnhancer priors of one clip (CogVideoX teachers only)."""
        return self.engine.attention_priors(request)

    def close(self) -> None:
        pass


# --- gRPC -------------------------------------------------------------------

_STATUS_TO_ERROR: dict[grpc.StatusCode, type[VidalignError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # dns:/// names with several A records: spread calls over all replicas.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 0),  # retries are ours: bounded, logged, with backoff
    ]


class GrpcTeacher:
    """A teacher service reached over gRPC.

    Calls are safe to retry (randomness is part of the request), so UNAVAILABLE
    is retried with jittered exponential backoff up to ``retries`` times.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 600.0,
        retries: int = 5,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.TeacherServiceStub(self._channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the channel connects; Unavailable after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"teacher at {self.target} did not answer within {timeout:.0f} s; "
                "is `vidalign teacher serve` running and reachable?"
            ) from None

    def _call(self, name: str, fn):
        request_id = uuid.uuid4().hex[:16]
        metadata = (("x-request-id", request_id),)
        for attempt in range(self.retries + 1):
            try:
                return fn(metadata)
            except grpc.RpcError as err:
                code = err.code()
                if code in _RETRYABLE and attempt < self.retries:
                    delay = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
                    log.warning(
                        "teacher_retry",
                        rpc=name,
                        target=self.target,
                        attempt=attempt + 1,
                        delay_s=round(delay, 2),
                        status=code.name,
                        request_id=request_id,
                    )
                    time.sleep(delay)
                    continue
                error = _STATUS_TO_ERROR.get(code, VidalignError)
                raise error(
                    f"teacher {self.target} {name} failed [{code.name}]: {err.details()} "
                    f"(request_id={request_id})"
                ) from None
        raise AssertionError("unreachable")

    def info(self) -> TeacherInfo:
        response = self._call(
            "GetInfo",
            lambda md: self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout, metadata=md),
        )
        return protocol.parse_info(response)

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult:
        def call(md):
            # A fresh message iterator per attempt: a retry resends the whole request.
            responses = self._stub.DenoisingLoss(
                protocol.request_messages(request, self.chunk_bytes),
                timeout=self.timeout,
                metadata=md,
            )
            return protocol.parse_result(responses)

        return self._call("DenoisingLoss", call)

    def attention_priors(self, request: AttentionPriorsRequest) -> Priors:
        """MotionEnhancer priors of one clip from a CogVideoX teacher service."""

        def call(md):
            responses = self._stub.AttentionPriors(
                protocol.priors_request_messages(request, self.chunk_bytes),
                timeout=self.timeout,
                metadata=md,
            )
            return protocol.parse_priors_result(responses)

        return self._call("AttentionPriors", call)

    def close(self) -> None:
        self._channel.close()


class PooledTeacher:
    """Several teacher replicas named by address; calls go round-robin.

    A replica that is UNAVAILABLE is skipped and the call goes to the next;
    when every replica is down the pool waits (jittered backoff) and tries
    again, up to ``retries`` rounds. Safe because randomness is part of the
    request: any replica gives the same answer.
    """

    def __init__(self, teachers: Sequence[GrpcTeacher], *, retries: int = 5) -> None:
        if not teachers:
            raise InvalidInput("a teacher pool needs at least one address")
        self.teachers = list(teachers)
        self.retries = retries
        self._turn = itertools.count()

    def _call(self, name: str, fn):
        start = next(self._turn)
        errors = []
        for round_ in range(self.retries + 1):
            for i in range(len(self.teachers)):
                teacher = self.teachers[(start + i) % len(self.teachers)]
                try:
                    return fn(teacher)
                except Unavailable as err:
                    errors.append(str(err))
            if round_ < self.retries:
                time.sleep(min(30.0, 0.5 * 2**round_) * (0.5 + random.random()))
        raise Unavailable(f"no teacher replica answered {name}: {errors[-1]}")

    def info(self) -> TeacherInfo:
        infos = [t.info() for t in self.teachers]
        models = {i.model for i in infos}
        if len(models) > 1:
            raise InvalidInput(f"the teacher replicas host different models: {sorted(models)}")
        return infos[0]

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult:
        return self._call("DenoisingLoss", lambda t: t.denoising_loss(request))

    def attention_priors(self, request: AttentionPriorsRequest) -> Priors:
        return self._call("AttentionPriors", lambda t: t.attention_priors(request))

    def close(self) -> None:
        for teacher in self.teachers:
            teacher.close()


def connect(
    address: str,
    *,
    model: str | None = None,
    adapters: Sequence[str | Path] = (),
    device: str = "cpu",
    timeout: float = 600.0,
    retries: int = 5,
) -> Teacher:
    """A teacher by address.

    ``local`` (needs ``model``) runs it in this process; ``host:port`` or
    ``dns:///name:port`` (round-robin over the name's addresses) reach the
    service; ``host1:port,host2:port`` is a pool of replicas, round-robin with
    failover.
    """
    if address == "local":
        if not model:
            raise InvalidInput("address 'local' needs a model name (e.g. tiny-animatediff)")
        return LocalTeacher(model, adapters=adapters, device=device)
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    bad = [a for a in addresses if ":" not in a]
    if not addresses or bad:
        raise InvalidInput(
            f"teacher address '{address}' is not 'local', 'host:port', 'dns:///name:port' "
            "or a comma-separated list of them"
        )
    if len(addresses) == 1:
        return GrpcTeacher(addresses[0], timeout=timeout, retries=retries)
    return PooledTeacher([GrpcTeacher(a, timeout=timeout, retries=0) for a in addresses], retries=retries)


# --- the differentiable loss ------------------------------------------------


class _DenoisingLossFn(torch.autograd.Function):
    """Forward: the teacher's per-sample loss. Backward: grad_output x the teacher's dL/dF_V."""

    @staticmethod
    def forward(ctx, features, result):  # type: ignore[override]
        if ctx.needs_input_grad[0]:
            if result.grad is None or result.grad.shape != features.shape:
                raise Unavailable(
                    "the teacher returned no gradient of the features' shape; was the request "
                    "sent with want_grad (features that require grad, grad mode on)?"
                )
            ctx.save_for_backward(result.grad.to(features.device, features.dtype))
        return result.losses.mean(dim=1).to(features.device, torch.float32)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_output.to(grad.dtype)[:, None, None] * grad, None


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="teacher-call")
    return _EXECUTOR


class PendingLoss:
    """A teacher call in flight; ``result()`` waits and returns the differentiable loss."""

    def __init__(self, owner: RemoteDenoisingLoss, features: torch.Tensor, future: Future) -> None:
        self._owner, self._features, self._future = owner, features, future

    def result(self) -> torch.Tensor:
        result = self._future.result()
        self._owner.last_result = result
        return _DenoisingLossFn.apply(self._features, result)


class RemoteDenoisingLoss(torch.nn.Module):
    """The teacher's denoising loss as a differentiable function of F_V.

    Returns one loss per sample, the mean over its ``num_draws`` noise draws.
    The last call's per-draw losses and timesteps are in ``last_result``.
    ``submit`` sends a call and returns at once, so the caller can compute the
    next micro-batch's features while the teacher works (the weights do not
    change within an optimizer step, so this is exact).
    """

    def __init__(
        self,
        teacher: Teacher,
        *,
        adapter_id: str,
        model: str = "",
        num_draws: int = 1,
        timestep_range: tuple[int, int] | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.adapter_id = adapter_id
        self.model = model
        self.num_draws = num_draws
        self.timestep_range = timestep_range
        self.timesteps = list(timesteps) if timesteps is not None else None
        self.last_result: DenoisingLossResult | None = None

    def _request(
        self,
        features: torch.Tensor,
        sample_ids: Sequence[str],
        seed: int,
        latents: torch.Tensor | None,
        pixels: torch.Tensor | None,
        captions: Sequence[str] | None,
    ) -> DenoisingLossRequest:
        return DenoisingLossRequest(
            sample_ids=list(sample_ids),
            features=features.detach(),
            latents=None if latents is None else latents.detach().cpu(),
            pixels=None if pixels is None else pixels.detach().cpu(),
            captions=None if captions is None else list(captions),
            adapter_id=self.adapter_id,
            model=self.model,
            seed=seed,
            num_draws=self.num_draws,
            timestep_range=self.timestep_range,
            timesteps=self.timesteps,
            want_grad=features.requires_grad and torch.is_grad_enabled(),
        )

    def forward(
        self,
        features: torch.Tensor,
        *,
        sample_ids: Sequence[str],
        seed: int,
        latents: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> torch.Tensor:
        request = self._request(features, sample_ids, seed, latents, pixels, captions)
        self.last_result = self.teacher.denoising_loss(request)
        return _DenoisingLossFn.apply(features, self.last_result)

    def submit(
        self,
        features: torch.Tensor,
        *,
        sample_ids: Sequence[str],
        seed: int,
        latents: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> PendingLoss:
        request = self._request(features, sample_ids, seed, latents, pixels, captions)
        return PendingLoss(self, features, _executor().submit(self.teacher.denoising_loss, request))
