"""Bounds on what clients can make the teacher hold: calls, threads, bytes and time.

A teacher is one process with one model; a client that opens streams and then
waits, or declares huge tensors, must not be able to stop it from answering
others, its health checks included. Four bounds, all in ``ServerConfig``:

- ``max_concurrent_rpcs`` model calls (DenoisingLoss, AttentionPriors) are
  admitted at once (reading their request, waiting for the model, computing);
  ``max_queued`` more wait for a slot without reading anything; any further
  call gets RESOURCE_EXHAUSTED at once, with a message naming both limits.
- Bytes of request tensors count against ``max_inflight_bytes`` as they
  arrive (the codec allocates as pieces arrive, never the declared size up
  front) and are given back when the call ends, however it ends; a piece that
  would pass the budget gets RESOURCE_EXHAUSTED.
- A model call whose client stops sending for ``stream_idle_timeout_s`` while
  its request is being read is cancelled with DEADLINE_EXCEEDED and a message
  naming the timeout; its slot and bytes are freed. So is one whose request
  takes longer than ``request_read_timeout_s`` to arrive in all (a slow sender
  that trickles a message just inside the idle timeout would otherwise hold
  its slot and bytes for as long as it likes).
- The gRPC thread pool has ``workers`` threads beyond the ones admitted and
  queued model calls can hold, so health, GetInfo and reflection always find a
  free thread; gRPC's own ``maximum_concurrent_rpcs`` (``grpc_call_cap``) stops
  a flood of new calls before it queues work behind them. Health ``Watch``
  streams hold no thread (grpcio's health servicer answers them from callbacks),
  so any number of watchers leaves ``Check`` its threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from vidalign.config import ConfigError
from vidalign.errors import ResourceExhausted, Unavailable
from vidalign.log import get_logger

log = get_logger("vidalign.teacher.limits")

MAX_GRPC_MESSAGE_BYTES = (1 << 31) - 1
"""gRPC's message-size options are 32-bit signed integers."""


MAX_BATCH = 4096
"""Most samples one batched model run may join (``max_batch``)."""
MAX_WAIT_MS = 10_000.0
"""Longest wait for a batch to fill (``max_wait_ms``): beyond it a call waits longer than
most models take to answer it."""


class PortUnavailable(ConfigError, OSError):
    """The address cannot be bound: in use (another teacher?) or not local."""


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """ConfigError naming ``name`` unless ``low <= value <= high``."""
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            want = f"at least {_number(low)}"
        elif low is None:
            want = f"at most {_number(high)}"
        else:
            want = f"within {_number(low)}..{_number(high)}"
        raise ConfigError(f"{name} must be {want}, got {_number(value)}")


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_config(config: Any) -> None:
    """ConfigError for any ``ServerConfig`` value out of its range (one line, naming it)."""
    check_range("port", config.port, 0, 65535)
    check_range("metrics_port", config.metrics_port, 0, 65535)
    if config.metrics_port and config.metrics_port in (config.port, config.health_port):
        raise ConfigError(
            f"metrics_port ({config.metrics_port}) must differ from the gRPC and health ports"
        )
    check_range("workers", config.workers, 1, 1024)
    check_range("max_message_bytes", config.max_message_bytes, 2 << 20, MAX_GRPC_MESSAGE_BYTES)
    check_range("max_request_bytes", config.max_request_bytes, 1)
    check_range("latent_cache_bytes", config.latent_cache_bytes, 0)
    check_range("max_concurrent_rpcs", config.max_concurrent_rpcs, 1, 1024)
    check_range("max_queued", config.max_queued, 0, 4096)
    check_range("max_inflight_bytes", config.max_inflight_bytes, 1)
    if config.max_inflight_bytes < config.max_request_bytes:
        raise ConfigError(
            f"max_inflight_bytes ({config.max_inflight_bytes}) must be at least max_request_bytes "
            f"({config.max_request_bytes}): a request of the largest size could never be read"
        )
    check_range("max_batch", config.max_batch, 1, MAX_BATCH)
    if not 0 <= config.max_wait_ms <= MAX_WAIT_MS:  # NaN too
        raise ConfigError(f"max_wait_ms must be within 0..{MAX_WAIT_MS:g}, got {config.max_wait_ms:g}")
    if not config.stream_idle_timeout_s > 0:
        raise ConfigError(
            f"stream_idle_timeout_s must be greater than 0, got {config.stream_idle_timeout_s:g}"
        )
    if not config.request_read_timeout_s > 0:  # NaN too
        raise ConfigError(
            f"request_read_timeout_s must be greater than 0, got {config.request_read_timeout_s:g}"
        )


def grpc_call_cap(max_concurrent_rpcs: int, max_queued: int, workers: int) -> int:
    """gRPC's own limit on calls in progress: the model calls that may be admitted
    or queued, plus room for health, GetInfo and refusals."""
    return max_concurrent_rpcs + max_queued + 4 * workers


def pool_threads(max_concurrent_rpcs: int, max_queued: int, workers: int) -> int:
    """Threads of the gRPC pool: admitted and queued model calls each hold one; the
    ``workers`` more answer everything else."""
    return max_concurrent_rpcs + max_queued + workers


def bind(add_port: Callable[[], int], address: str) -> int:
    """Call ``add_port`` (which binds ``address``); PortUnavailable with a clear message
    where gRPC raises or returns port 0 (grpcio does either, by version)."""
    try:
        port = add_port()
    except RuntimeError as err:
        raise PortUnavailable(_bind_message(address)) from err
    if port == 0:
        raise PortUnavailable(_bind_message(address))
    return port


def _bind_message(address: str) -> str:
    return (
        f"cannot listen on {address}: the port is in use (another teacher?) or the "
        "address is not on this machine; pick another --port or stop the other server"
    )


class ByteBudget:
    """Bytes of request data held by all calls in flight, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                used = self.used
                raise ResourceExhausted(
                    f"the teacher holds {used} bytes of requests in flight; {n} more would pass "
                    f"its limit of {self.limit} bytes (max_inflight_bytes); retry shortly or "
                    "send smaller requests"
                )
            self.used += n

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Admission:
    """At most ``max_concurrent`` calls admitted, ``max_queued`` waiting for a slot."""

    def __init__(self, max_concurrent: int, max_queued: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.active = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def enter(self, context: grpc.ServicerContext) -> None:
        with self._cond:
            if self.active < self.max_concurrent:
                self.active += 1
                return
            if self.waiting >= self.max_queued:
                raise ResourceExhausted(
                    f"the teacher is busy: {self.active} requests in progress "
                    f"(max_concurrent_rpcs={self.max_concurrent}) and {self.waiting} waiting "
                    f"(max_queued={self.max_queued}); retry later"
                )
            self.waiting += 1
            try:
                while self.active >= self.max_concurrent:
                    if not context.is_active():  # the caller left or its deadline passed
                        raise Unavailable("the call ended while it waited for a free slot")
                    self._cond.wait(0.5)
                self.active += 1
            finally:
                self.waiting -= 1

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()


class _Watch:
    __slots__ = ("context", "fired", "last", "started")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.started = self.last = time.monotonic()
        self.fired: str | None = None
        """The message the call was cancelled with, once the watchdog cancelled it."""


class IdleWatchdog:
    """One thread that cancels request streams silent for longer than ``timeout`` s, or
    still being read ``read_timeout`` s after they were admitted (0: no such bound)."""

    def __init__(self, timeout: float, read_timeout: float = 0.0) -> None:
        self.timeout = timeout
        self.read_timeout = read_timeout
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, context: grpc.ServicerContext) -> _Watch:
        entry = _Watch(context)
        with self._lock:
            self._watches.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="teacher-idle-watchdog", daemon=True
                )
                self._thread.start()
        return entry

    def unwatch(self, entry: _Watch) -> None:
        with self._lock:
            self._watches.discard(entry)

    def stop(self) -> None:
        self._stop.set()

    def message(self) -> str:
        return (
            f"no request message for {self.timeout:g} s (stream_idle_timeout_s): the teacher "
            "closed the stream; send all of a request's messages without pausing"
        )

    def read_message(self) -> str:
        return (
            f"the request was still arriving after {self.read_timeout:g} s "
            "(request_read_timeout_s): the teacher closed the stream; send a request's "
            "messages as fast as the network allows, or raise the server's limit"
        )

    def _expired(self, watch: _Watch, now: float) -> tuple[str, str] | None:
        """(log event, message) when ``watch`` is past a bound, else None."""
        if now - watch.last > self.timeout:
            return "stream_idle_timeout", self.message()
        if self.read_timeout and now - watch.started > self.read_timeout:
            return "stream_read_timeout", self.read_message()
        return None

    def _run(self) -> None:
        bounds = [self.timeout, *([self.read_timeout] if self.read_timeout else [])]
        tick = min(1.0, min(bounds) / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                stale = [(w, why) for w in self._watches if (why := self._expired(w, now))]
                for w, _ in stale:
                    self._watches.discard(w)
            for w, (event, why) in stale:
                w.fired = why
                log.warning(event, idle_timeout_s=self.timeout, read_timeout_s=self.read_timeout)
                _cancel(w.context, grpc.StatusCode.DEADLINE_EXCEEDED, why)


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call now with ``code`` and ``details``, from any thread.

    The public ``context.cancel()`` sends a bare CANCELLED; the sync server's call
    object can cancel with a status, which the client then sees.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(getattr(cygrpc.StatusCode, code.name.lower()), details)
    except Exception:  # another grpcio: fall back to the public API
        context.cancel()


class _Metered:
    """The request iterator of one admitted call: counts its bytes against the
    budget and keeps its watchdog entry fresh while the request is read."""

    def __init__(
        self, messages: Iterator[Any], context: grpc.ServicerContext, limits: Limits
    ) -> None:
        self._messages = messages
        self._context = context
        self._limits = limits
        self.held = 0
        self.watch: _Watch | None = limits.watchdog.watch(context) if limits.watchdog else None

    def __iter__(self) -> _Metered:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._messages)
        except StopIteration:
            self._unwatch()  # the request is read; computing may take long
            raise
        if self.watch is not None:
            self.watch.last = time.monotonic()
        n = sum(len(t.data) for t in message.tensors)
        if n:
            self._limits.budget.take(n)
            self.held += n
        return message

    def _unwatch(self) -> None:
        if self.watch is not None and self._limits.watchdog is not None:
            self._limits.watchdog.unwatch(self.watch)

    def close(self) -> None:
        self._unwatch()
        self._limits.budget.give(self.held)
        self.held = 0


class Limits(grpc.ServerInterceptor):
    """Admission, byte budget and idle timeout for the model RPCs named in ``methods``
    (full method paths); every other RPC passes untouched.

    Goes after ``ErrorInterceptor`` in the server's list, so that its refusals are
    mapped to statuses like any handler's.
    """

    def __init__(
        self,
        methods: set[str],
        *,
        max_concurrent_rpcs: int,
        max_queued: int,
        max_inflight_bytes: int,
        stream_idle_timeout_s: float,
        request_read_timeout_s: float = 0.0,
    ) -> None:
        self.methods = methods
        self.admission = Admission(max_concurrent_rpcs, max_queued)
        self.budget = ByteBudget(max_inflight_bytes)
        self.watchdog = (
            IdleWatchdog(stream_idle_timeout_s, request_read_timeout_s)
            if stream_idle_timeout_s > 0 else None
        )

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def intercept_service(self, continuation: Callable, handler_call_details: Any):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler
        if not handler.stream_stream:  # pragma: no cover - the model RPCs are bidi streams
            return handler
        behavior = handler.stream_stream

        def run(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            self.admission.enter(context)
            metered = _Metered(request_iterator, context, self)
            try:
                # Materialised while the slot is held: computing is part of the call.
                return iter(list(behavior(metered, context)))
            except grpc.RpcError:
                # From the request stream: the client left, its deadline passed, or
                # the watchdog cancelled it. The status is already sent; say so.
                if metered.watch is not None and metered.watch.fired:
                    context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
                    context.set_details(metered.watch.fired)
                else:
                    context.set_code(grpc.StatusCode.CANCELLED)
                raise
            finally:
                metered.close()
                self.admission.leave()

        return grpc.stream_stream_rpc_method_handler(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
