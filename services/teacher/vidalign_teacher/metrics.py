"""Prometheus metrics of the teacher, served over plain HTTP on their own port.

``vidalign teacher serve --metrics-port N`` (0, the default: off) serves
``http://HOST:N/metrics`` from a registry of this server's own (several servers
in one process, as in the tests, do not share one):

    vidalign_teacher_requests_total{rpc,code}             calls ended, by status code
    vidalign_teacher_request_duration_seconds{rpc}        histogram: call latency
                                                          (reading, waiting, computing)
    vidalign_teacher_requests_in_flight{rpc}              calls in progress
    vidalign_teacher_received_bytes_total{rpc}            request message bytes received
    vidalign_teacher_model_load_seconds                   start to SERVING: model, adapters
    vidalign_teacher_model_calls_admitted                 model calls holding a slot
    vidalign_teacher_model_calls_queued                   model calls waiting for one
    vidalign_teacher_request_bytes_held                   request bytes held (the budget)
    vidalign_teacher_batch_samples                        histogram: samples per model run
                                                          (--max-batch > 1 only)
    vidalign_teacher_batch_requests                       histogram: calls per model run (idem)
    vidalign_teacher_batch_wait_seconds                   histogram: the oldest call's wait (idem)
    vidalign_teacher_gpu_memory_allocated_bytes           CUDA only: allocated now
    vidalign_teacher_gpu_memory_max_allocated_bytes       CUDA only: the peak so far

``rpc`` is the method's name (``GetInfo``, ``DenoisingLoss``, ``AttentionPriors``),
``code`` the gRPC status name (``OK``, ``INVALID_ARGUMENT``, ...). The counts and
latencies come from ``MetricsInterceptor``, the first interceptor of the chain, so
they include calls refused by the token check, the drain and the limits. Health
and reflection are not counted (probes would drown the calls).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from vidalign.log import get_logger
from vidalign_teacher.limits import Limits, PortUnavailable

log = get_logger("vidalign.teacher.metrics")

PREFIX = "vidalign_teacher"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Seconds: GetInfo answers in milliseconds; a real model's DenoisingLoss takes seconds and
AttentionPriors minutes."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class TeacherMetrics:
    """The registry, the metrics and the HTTP server of one teacher."""

    def __init__(self, service: str, rpcs: Iterable[str], limits: Limits, device: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Calls ended, by RPC and gRPC status code.",
                                ["rpc", "code"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                 "Call latency in seconds, by RPC.", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Calls in progress, by RPC.",
                               ["rpc"], registry=r)
        self.received = Counter(f"{PREFIX}_received_bytes",
                                "Request message bytes received, by RPC.", ["rpc"], registry=r)
        self.model_load = Gauge(f"{PREFIX}_model_load_seconds",
                                "Seconds from start to SERVING: the model and its adapters.",
                                registry=r)
        Gauge(f"{PREFIX}_model_calls_admitted", "Model calls holding a slot (max_concurrent_rpcs).",
              registry=r).set_function(lambda: limits.admission.active)
        Gauge(f"{PREFIX}_model_calls_queued", "Model calls waiting for a slot (max_queued).",
              registry=r).set_function(lambda: limits.admission.waiting)
        Gauge(f"{PREFIX}_request_bytes_held",
              "Request bytes held by the calls in flight (max_inflight_bytes).",
              registry=r).set_function(lambda: limits.budget.used)
        self.batch_samples = Histogram(f"{PREFIX}_batch_samples",
                                       "Samples per model run (dynamic batching, --max-batch).",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(f"{PREFIX}_batch_requests",
                                        "DenoisingLoss calls per model run (dynamic batching).",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram(f"{PREFIX}_batch_wait_seconds",
                                    "How long the oldest call of a model run waited for it.",
                                    buckets=WAIT_BUCKETS, registry=r)
        dev = torch.device(device)
        if dev.type == "cuda":
            Gauge(f"{PREFIX}_gpu_memory_allocated_bytes", "GPU memory allocated by tensors now.",
                  registry=r).set_function(lambda: torch.cuda.memory_allocated(dev))
            Gauge(f"{PREFIX}_gpu_memory_max_allocated_bytes",
                  "Peak GPU memory allocated by tensors since start.",
                  registry=r).set_function(lambda: torch.cuda.max_memory_allocated(dev))
        for rpc in rpcs:  # every series exists from the start, at 0
            self.latency.labels(rpc)
            self.in_flight.labels(rpc)
            self.received.labels(rpc)
        self.interceptor = MetricsInterceptor(service, self)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def observe_batch(self, record: Any) -> None:
        """One model run of the batcher (``vidalign_teacher.batching.BatchRecord``)."""
        self.batch_samples.observe(record.samples)
        self.batch_requests.observe(record.requests)
        self.batch_wait.observe(record.wait_s)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (a daemon thread); returns the port."""
        addr = host.strip("[]")
        try:
            self._httpd, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            raise PortUnavailable(
                f"cannot serve metrics on {host}:{port}: the port is in use or the address is "
                "not on this machine; pick another --metrics-port"
            ) from err
        self.port = int(self._httpd.server_port)
        log.info("teacher_metrics_listening", port=self.port, path="/metrics")
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def _code_name(code: Any) -> str | None:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # an int from another grpcio
        if status.value[0] == code:
            return status.name
    return str(code)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and sizes the calls of one service (named by its full name)."""

    def __init__(self, service: str, metrics: TeacherMetrics) -> None:
        self.prefix = f"/{service}/"
        self.metrics = metrics

    def intercept_service(self, continuation: Callable, handler_call_details: Any):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        rpc = method[len(self.prefix):]
        m = self.metrics
        received = m.received.labels(rpc)
        deserialize = handler.request_deserializer

        def counted(data: bytes) -> Any:
            received.inc(len(data))
            return deserialize(data) if deserialize is not None else data

        def wrap(behavior: Callable, streaming_response: bool) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                in_flight = m.in_flight.labels(rpc)
                in_flight.inc()
                start = time.perf_counter()
                code = "UNKNOWN"
                try:
                    result = behavior(request_or_iterator, context)
                    if streaming_response:
                        result = list(result)  # the inner interceptors already materialised it
                    code = _code_name(context.code()) or "OK"
                    return iter(result) if streaming_response else result
                except BaseException:
                    code = _code_name(context.code()) or "UNKNOWN"
                    raise
                finally:
                    m.latency.labels(rpc).observe(time.perf_counter() - start)
                    m.requests.labels(rpc, code).inc()
                    in_flight.dec()

            return run

        kwargs = dict(request_deserializer=counted, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kwargs)
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kwargs)
