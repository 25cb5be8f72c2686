"""One interceptor that turns domain errors into gRPC statuses and binds request ids.

Handlers raise ``vidalign.errors`` exceptions; the caller receives the status
code that says what kind of problem it is and the message that says what to
fix. Anything else is a bug: it is logged with its traceback (without local
variables) and answered with INTERNAL and the request id to look it up by.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from vidalign.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VidalignError,
)
from vidalign.log import get_logger

log = get_logger("vidalign.teacher.rpc")

STATUS_OF: list[tuple[type[VidalignError], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(error: VidalignError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


class ErrorInterceptor(grpc.ServerInterceptor):
    """Applies to the methods of one service, named by its full name."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"

    def intercept_service(self, continuation: Callable, handler_call_details: Any):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        # Health Watch and reflection are long-lived streams: leave them alone.
        if handler is None or not method.startswith(self.prefix):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]

        def wrap(behavior: Callable, streaming_response: bool) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                structlog.contextvars.bind_contextvars(request_id=request_id, rpc=method)
                context.set_trailing_metadata((("x-request-id", request_id),))
                start = time.perf_counter()
                try:
                    result = behavior(request_or_iterator, context)
                    if streaming_response:
                        # Materialise here so that errors raised while producing the
                        # stream are mapped too; responses are small (losses, grads).
                        result = list(result)
                    log.info("rpc_ok", duration_ms=round(1e3 * (time.perf_counter() - start), 2))
                    return iter(result) if streaming_response else result
                except VidalignError as err:
                    code = status_of(err)
                    log.warning("rpc_rejected", status=code.name, error=str(err))
                    context.abort(code, str(err))
                except Exception:
                    if context.code() is not None:  # already aborted by the handler
                        raise
                    log.exception("rpc_failed")
                    context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"internal error in the teacher; see its logs for request_id={request_id}",
                    )
                finally:
                    structlog.contextvars.unbind_contextvars("request_id", "rpc")

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary, False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap(handler.stream_stream, True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
