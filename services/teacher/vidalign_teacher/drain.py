"""Graceful shutdown: count the calls in flight, refuse new ones while draining.

``Drain`` is the outermost server interceptor of the teacher service's methods.
Every call it lets in is counted until its handler returns (the error
interceptor inside it materialises streamed responses, so that is when the
work is done). ``close()`` starts the drain: from then on a new call gets
UNAVAILABLE at once (a client then waits for this teacher's restart or goes to
another replica), while the calls in flight run to completion;
``wait_idle(timeout)`` waits for them. Health and reflection are not counted
and keep answering, so a probe sees NOT_SERVING during the drain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from vidalign.log import get_logger

log = get_logger("vidalign.teacher.rpc")

SHUTTING_DOWN = "the teacher is shutting down; retry on another replica or after it restarts"


class Drain(grpc.ServerInterceptor):
    """Applies to the methods of one service, named by its full name."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"
        self._cond = threading.Condition()
        self._in_flight = 0
        self.draining = False

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def close(self) -> int:
        """Refuse new calls from now on; returns the number still in flight."""
        with self._cond:
            self.draining = True
            return self._in_flight

    def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight; False if some still are after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=max(timeout, 0.0))

    def intercept_service(self, continuation: Callable, handler_call_details: Any):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        request_id = dict(handler_call_details.invocation_metadata or ()).get("x-request-id")

        def wrap(behavior: Callable) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                with self._cond:
                    refused = self.draining
                    if not refused:
                        self._in_flight += 1
                if refused:
                    log.info("rpc_refused_draining", rpc=method, request_id=request_id)
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                log.debug("rpc_started", rpc=method, request_id=request_id)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    with self._cond:
                        self._in_flight -= 1
                        self._cond.notify_all()

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
