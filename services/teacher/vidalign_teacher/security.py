"""The teacher's side of security: TLS, mutual TLS and the bearer token.

- TLS: ``--tls-cert`` and ``--tls-key`` (PEM files) make the port speak TLS
  only; a plaintext client fails the handshake.
- Mutual TLS: ``--tls-client-ca`` also requires every client to present a
  certificate signed by that CA (``require_client_auth``).
- Token: ``--token-file`` makes every call of the teacher's service and of
  server reflection carry ``authorization: Bearer <token>``; the token is
  compared in constant time (``hmac.compare_digest``) and a call without it
  gets UNAUTHENTICATED before any handler runs. The token is read from a file
  only: it never appears on a command line, in a log line or in an error.
- Health is exempt from the token: kubelet's gRPC probes cannot send metadata
  (nor speak TLS; ``--health-port`` serves the health service alone in
  plaintext for them). Health says SERVING or NOT_SERVING and nothing else.

The client's side is ``vidalign.teacher.credentials``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from vidalign.config import ConfigError
from vidalign.errors import VidalignError
from vidalign.log import get_logger
from vidalign.teacher.credentials import read_secret_file, read_token

log = get_logger("vidalign.teacher.security")

HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
"""Methods exempt from the token: grpc.health.v1 (probes cannot send metadata)."""


def check_server_flags(*, tls_cert: str, tls_key: str, tls_client_ca: str) -> None:
    """ConfigError for combinations that cannot work (names only; files are read at bind time)."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("tls_cert and tls_key go together (--tls-cert FILE --tls-key FILE)")
    if tls_client_ca and not tls_cert:
        raise ConfigError("tls_client_ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too")


def _read(path: str, what: str) -> bytes:
    try:
        return read_secret_file(path, what)
    except VidalignError as err:
        raise ConfigError(str(err)) from None


def server_credentials(
    *, tls_cert: str, tls_key: str, tls_client_ca: str
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext. With a client CA: mutual TLS."""
    check_server_flags(tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca)
    if not tls_cert:
        return None
    pair = (_read(tls_key, "tls_key"), _read(tls_cert, "tls_cert"))
    client_ca = _read(tls_client_ca, "tls_client_ca") if tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(
    server: grpc.Server,
    address: str,
    *,
    tls_cert: str,
    tls_key: str,
    tls_client_ca: str,
    token_file: str,
) -> int:
    """Bind ``address`` with TLS or in plaintext; returns the port (0 when binding failed)."""
    credentials = server_credentials(
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca
    )
    log.info(
        "teacher_security",
        tls=credentials is not None,
        client_auth=bool(tls_client_ca),
        token=bool(token_file),
    )
    if token_file and credentials is None:
        log.warning("teacher_token_without_tls", hint="the token crosses the network in clear text")
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def load_token(token_file: str) -> str:
    try:
        return read_token(token_file, "token_file")
    except VidalignError as err:
        raise ConfigError(str(err)) from None


def interceptors(token_file: str) -> list[grpc.ServerInterceptor]:
    """The interceptors that go first in the server's chain: the token check, if any."""
    return [TokenInterceptor(load_token(token_file))] if token_file else []


def _deny(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without reading the request."""

    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        log.warning("rpc_unauthenticated", rpc=method, reason=reason, peer=context.peer())
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token (authorization: Bearer <token>)",
        )

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort, **kwargs)


class TokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every call but health's that lacks the bearer token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("token_file: the token is empty")
        self._expected = f"Bearer {token}".encode()

    def __repr__(self) -> str:
        return "TokenInterceptor(<hidden>)"

    def intercept_service(self, continuation: Callable, handler_call_details: Any):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else ""
                break
        if not given:
            return _deny(handler, method, "missing")
        # Constant time in the token's contents: a wrong guess learns nothing from timing.
        if not hmac.compare_digest(given.encode(), self._expected):
            return _deny(handler, method, "wrong")
        return handler


class HealthPort:
    """The health service alone on its own plaintext port, for probes that speak neither
    TLS nor metadata (kubelet's gRPC probes). It shares the main server's health
    servicer, so both ports report the same status."""

    def __init__(self, servicer: health.HealthServicer, host: str, port: int) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-health")
        )
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the health port {host}:{port}")

    def start(self) -> None:
        self.server.start()
        log.info("teacher_health_listening", port=self.port)

    def stop(self, grace: float) -> None:
        self.server.stop(grace)


__all__ = [
    "HEALTH_PREFIX",
    "HealthPort",
    "TokenInterceptor",
    "add_port",
    "check_server_flags",
    "interceptors",
    "server_credentials",
]
