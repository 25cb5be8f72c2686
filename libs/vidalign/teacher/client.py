"""vidalign's Python client for the teacher, and the differentiable remote loss.

``connect(address)`` returns a teacher: ``"local"`` runs the diffusion model in
this process; ``"host:port"`` or ``"dns:///name:port"`` talks to the gRPC
teacher service (a ``dns:///`` name resolving to several replicas is balanced
round-robin). Both answer the same ``DenoisingLossRequest`` with the same
``DenoisingLossResult`` and raise the same ``vidalign.errors`` exceptions.

A teacher that is UNAVAILABLE (restarting, loading, draining) is waited for
within a time budget, ``wait_s``: capped exponential backoff with jitter,
polling the gRPC health service and resending the call once it reports
SERVING. Resending is safe because randomness is part of the request.

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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vidalign.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VidalignError,
)
from vidalign.log import get_logger
from vidalign.teacher import protocol
from vidalign.teacher.credentials import TeacherCredentials
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

DEFAULT_WAIT_S = 300.0
"""How long a call waits for an UNAVAILABLE teacher to come back (a restart
reloads the model: tens of seconds for real ones)."""
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0
"""Waits start near 0.5 s and double, each jittered by x0.5-1.5, never over 10 s."""
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


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
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # dns:/// names with several A records: spread calls over all replicas.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 0),  # retries are ours: bounded, logged, with backoff
        # Reconnect soon after a restarted teacher reopens its port (gRPC's own
        # reconnect backoff grows to 120 s, longer than our waits).
        ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(BACKOFF_CAP_S * 1000)),
    ]


_SERVING = health_pb2.HealthCheckResponse.SERVING


class _Wait:
    """Waiting for an UNAVAILABLE teacher, within ``budget_s`` seconds of the first failure.

    Capped exponential backoff with jitter. Each step polls the teachers' health
    (``grpc.health.v1.Health/Check``, waiting for the channel to connect) and
    ends early once one reports SERVING, so that large requests are not re-sent
    blindly. Every step is logged (``teacher_wait``: attempt, elapsed, budget).
    """

    def __init__(self, budget_s: float, **fields: object) -> None:
        self.budget_s = budget_s
        self.fields = fields
        self.start = time.monotonic()
        self.attempt = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def until_serving(self, teachers: Sequence[GrpcTeacher], status: str) -> int | None:
        """Index of a teacher that is back; None once the budget is spent."""
        while True:
            remaining = self.budget_s - self.elapsed
            if remaining <= 0:
                return None
            backoff = BACKOFF_FIRST_S * 2 ** min(self.attempt, 20) * (0.5 + random.random())
            delay = min(BACKOFF_CAP_S, backoff, remaining)
            self.attempt += 1
            log.warning(
                "teacher_wait",
                attempt=self.attempt,
                elapsed_s=round(self.elapsed, 2),
                budget_s=self.budget_s,
                delay_s=round(delay, 2),
                status=status,
                **self.fields,
            )
            end = time.monotonic() + delay
            back, status = _first_serving(teachers, delay)
            if back is not None:
                return back
            time.sleep(max(0.0, end - time.monotonic()))


def _first_serving(teachers: Sequence[GrpcTeacher], timeout: float) -> tuple[int | None, str]:
    """Index of a teacher whose health says SERVING within ``timeout`` seconds (else None),
    and what the health checks saw (``NOT_SERVING``, or the check's own status code).

    One that has no health service (UNIMPLEMENTED) or does not know the service's
    name (NOT_FOUND) counts as back: the call itself will tell.
    """
    done = threading.Event()
    lock = threading.Lock()
    found: list[int] = []
    seen: set[str] = set()
    left = [len(teachers)]

    def on_done(i: int, future: grpc.Future) -> None:
        try:
            status = future.result().status
            ok, name = status == _SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as err:
            ok = err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
            name = err.code().name
        except grpc.FutureCancelledError:
            ok, name = False, "DEADLINE_EXCEEDED"
        with lock:
            seen.add(name)
            if ok:
                found.append(i)
            left[0] -= 1
            if ok or left[0] == 0:
                done.set()

    checks = []
    for i, teacher in enumerate(teachers):
        check = teacher._health.Check.future(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME),
            timeout=max(timeout, 0.05),
            wait_for_ready=True,  # wait for the channel to connect: the port may be reopening
        )
        check.add_done_callback(lambda f, i=i: on_done(i, f))
        checks.append(check)
    done.wait(timeout + 1.0)
    for check in checks:
        check.cancel()
    with lock:
        return (found[0] if found else None), ",".join(sorted(seen)) or "DEADLINE_EXCEEDED"


class GrpcTeacher:
    """A teacher service reached over gRPC.

    Calls are safe to retry (randomness is part of the request), so a call that
    finds the teacher UNAVAILABLE waits for it for up to ``wait_s`` seconds
    (jittered backoff, health-checked: see ``_Wait``) and is then sent again;
    once the budget is spent, ``Unavailable`` names the address and the budget.
    ``wait_s=0`` fails at once (a pool's replicas: the pool waits).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 600.0,
        wait_s: float = DEFAULT_WAIT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = 1 << 20,
        credentials: TeacherCredentials | None = None,
    ) -> None:
        """``credentials``: TLS files and token (``vidalign.teacher.credentials``); None:
        plaintext, with the token of ``VIDALIGN_TEACHER_TOKEN`` if that is set."""
        if wait_s < 0:
            raise InvalidInput(f"wait_s must be >= 0, got {wait_s}")
        self.target = target
        self.timeout = timeout
        self.wait_s = wait_s
        self.chunk_bytes = chunk_bytes
        credentials = credentials or TeacherCredentials.load()
        self._channel = credentials.channel(target, channel_options(max_message_bytes))
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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
        wait: _Wait | None = None
        while True:
            try:
                result = fn(metadata)
            except grpc.RpcError as err:
                code = err.code()
                if code in _RETRYABLE and self.wait_s > 0:
                    wait = wait or _Wait(self.wait_s, rpc=name, target=self.target, request_id=request_id)
                    if wait.until_serving([self], code.name) is not None:
                        continue
                    raise Unavailable(
                        f"teacher {self.target} {name} failed [{code.name}]: {err.details()}; "
                        f"still unavailable after waiting {wait.elapsed:.0f} s "
                        f"(budget wait_s={self.wait_s:g} s) (request_id={request_id})"
                    ) from None
                error = _STATUS_TO_ERROR.get(code, VidalignError)
                raise error(
                    f"teacher {self.target} {name} failed [{code.name}]: {err.details()} "
                    f"(request_id={request_id})"
                ) from None
            if wait is not None:
                log.info("teacher_back", rpc=name, target=self.target, waited_s=round(wait.elapsed, 2),
                         attempts=wait.attempt, request_id=request_id)
            return result

    def info(self) -> TeacherInfo:
        response = self._call(
            "GetInfo",
            lambda md: self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout, metadata=md),
        )
        return protocol.parse_info(response)

    def _streaming(self, name: str, stub_method, messages: Callable[[], Iterator], parse):
        """A streaming RPC through ``_call``: ``stub_method`` takes the stream ``messages()``
        makes and ``parse`` reads its response stream."""

        def call(md):
            # A fresh message iterator per attempt: a retry resends the whole request.
            responses = stub_method(messages(), timeout=self.timeout, metadata=md)
            return parse(responses)

        return self._call(name, call)

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult:
        return self._streaming(
            "DenoisingLoss",
            self._stub.DenoisingLoss,
            lambda: protocol.request_messages(request, self.chunk_bytes),
            protocol.parse_result,
        )

    def attention_priors(self, request: AttentionPriorsRequest) -> Priors:
        """MotionEnhancer priors of one clip from a CogVideoX teacher service."""
        return self._streaming(
            "AttentionPriors",
            self._stub.AttentionPriors,
            lambda: protocol.priors_request_messages(request, self.chunk_bytes),
            protocol.parse_priors_result,
        )

    def close(self) -> None:
        self._channel.close()


class PooledTeacher:
    """Several teacher replicas named by address; calls go round-robin.

    A replica that is UNAVAILABLE is skipped and the call goes at once to the
    next; when every replica is down the pool waits for one to come back, for
    up to ``wait_s`` seconds (jittered backoff, polling every replica's health,
    resending to the first that reports SERVING). The replicas themselves do
    not wait (``wait_s=0``). Safe because randomness is part of the request:
    any replica gives the same answer.
    """

    def __init__(self, teachers: Sequence[GrpcTeacher], *, wait_s: float = DEFAULT_WAIT_S) -> None:
        if not teachers:
            raise InvalidInput("a teacher pool needs at least one address")
        if wait_s < 0:
            raise InvalidInput(f"wait_s must be >= 0, got {wait_s}")
        self.teachers = list(teachers)
        self.wait_s = wait_s
        self.target = ",".join(t.target for t in self.teachers)
        self._turn = itertools.count()

    def _call(self, name: str, fn):
        start = next(self._turn) % len(self.teachers)
        wait: _Wait | None = None
        while True:
            for i in range(len(self.teachers)):
                teacher = self.teachers[(start + i) % len(self.teachers)]
                try:
                    result = fn(teacher)
                except Unavailable as err:
                    last = str(err)
                    continue
                if wait is not None:
                    log.info("teacher_back", rpc=name, target=teacher.target,
                             waited_s=round(wait.elapsed, 2), attempts=wait.attempt)
                return result
            wait = wait or _Wait(self.wait_s, rpc=name, target=self.target)
            back = wait.until_serving(self.teachers, "UNAVAILABLE")
            if back is None:
                raise Unavailable(
                    f"no teacher replica of {self.target} answered {name} within the "
                    f"wait_s={self.wait_s:g} s budget; last error: {last}"
                )
            start = back

    def info(self) -> TeacherInfo:
        """The replicas' model; replicas that are down are skipped (all down: wait as a call does)."""
        infos = []
        for teacher in self.teachers:
            try:
                infos.append(teacher.info())
            except Unavailable as err:
                log.warning("teacher_replica_unavailable", target=teacher.target, error=str(err))
        if not infos:
            infos = [self._call("GetInfo", lambda t: t.info())]
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
    wait_s: float = DEFAULT_WAIT_S,
    credentials: TeacherCredentials | None = None,
) -> Teacher:
    """A teacher by address.

    ``local`` (needs ``model``) runs it in this process; ``host:port`` or
    ``dns:///name:port`` (round-robin over the name's addresses) reach the
    service; ``host1:port,host2:port`` is a pool of replicas, round-robin with
    failover. ``credentials`` (TLS, mutual TLS, bearer token) apply to every channel.
    ``timeout`` is one call's deadline; ``wait_s`` how long a call waits for an
    UNAVAILABLE teacher (every replica of a pool) to come back.
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
        return GrpcTeacher(addresses[0], timeout=timeout, wait_s=wait_s, credentials=credentials)
    return PooledTeacher(
        [GrpcTeacher(a, timeout=timeout, wait_s=0, credentials=credentials) for a in addresses],
        wait_s=wait_s,
    )


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
