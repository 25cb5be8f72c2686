"""How a client proves who it is to the teacher, and checks who the teacher is.

One place for the client's side of ``docs/design.md`` (teacher security): TLS
(the CA that signed the teacher's certificate), mutual TLS (this client's
certificate and key) and the bearer token. ``GrpcTeacher`` builds every
channel through ``TeacherCredentials.channel``::

    creds = TeacherCredentials.load(tls_ca="ca.crt", token_file="token")
    teacher = connect("teacher:50051", credentials=creds)

The token comes from ``token_file`` or, when none is given, from the
``VIDALIGN_TEACHER_TOKEN`` environment variable; it is sent as
``authorization: Bearer <token>`` metadata on every call. It never appears in
a repr, a log line or an error message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from vidalign.errors import InvalidInput
from vidalign.log import get_logger

log = get_logger(__name__)

TOKEN_ENV = "VIDALIGN_TEACHER_TOKEN"
"""Environment variable holding the teacher's bearer token (when no token file is given)."""


def _name(prefix: str, key: str) -> str:
    """A setting as the user spelled it: ``teacher.tls_ca`` in configs, ``--tls-ca`` on the CLI."""
    return f"--{key.replace('_', '-')}" if prefix == "--" else f"{prefix}{key}"


def tls_files_problem(*, cert: str, key: str, prefix: str = "") -> str | None:
    """Why a set of client TLS file names cannot work, or None. Names only, no contents."""
    if bool(cert) != bool(key):
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        return (
            f"{_name(prefix, given)} needs {_name(prefix, missing)} "
            "(a client certificate goes with its key)"
        )
    return None


def read_secret_file(path: str | Path, what: str) -> bytes:
    """The bytes of a credential file; InvalidInput naming ``what`` and the path, never the contents."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if not data.strip():
        raise InvalidInput(f"{what}: {path} is empty")
    return data


def read_token(path: str | Path, what: str = "token_file") -> str:
    """A bearer token from a file: one line, surrounding whitespace removed."""
    token = read_secret_file(path, what).decode("utf-8", errors="strict").strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        raise InvalidInput(
            f"{what}: {path} must hold one token without spaces or control characters"
        )
    return token


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "_BearerToken(<hidden>)"

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _Details(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: object
    credentials: object
    wait_for_ready: object
    compression: object


@dataclass(frozen=True, kw_only=True)
class TeacherCredentials:
    """What a client presents to the teacher; empty fields mean plaintext and no token."""

    ca: bytes | None = field(default=None, repr=False)
    """PEM of the CA that signed the teacher's certificate; None with ``tls``: the system roots."""
    cert: bytes | None = field(default=None, repr=False)
    """PEM of this client's certificate (mutual TLS)."""
    key: bytes | None = field(default=None, repr=False)
    """PEM of this client's private key (mutual TLS)."""
    token: str = field(default="", repr=False)
    """Bearer token sent with every call."""
    tls: bool = False
    """Connect over TLS (set by ``load`` when any TLS file is given)."""

    @classmethod
    def load(
        cls,
        *,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        token_file: str = "",
        env: bool = True,
        prefix: str = "",
    ) -> TeacherCredentials:
        """Read the files now, so that a wrong path fails before any call; ``prefix`` names
        the config section or flag family in errors (``teacher.``)."""
        problem = tls_files_problem(cert=tls_cert, key=tls_key, prefix=prefix)
        if problem:
            raise InvalidInput(problem)
        token = ""
        if token_file:
            token = read_token(token_file, _name(prefix, "token_file"))
        elif env and os.environ.get(TOKEN_ENV, "").strip():
            token = os.environ[TOKEN_ENV].strip()
        return cls(
            ca=read_secret_file(tls_ca, _name(prefix, "tls_ca")) if tls_ca else None,
            cert=read_secret_file(tls_cert, _name(prefix, "tls_cert")) if tls_cert else None,
            key=read_secret_file(tls_key, _name(prefix, "tls_key")) if tls_key else None,
            token=token,
            tls=bool(tls_ca or tls_cert),
        )

    def __repr__(self) -> str:
        return (
            f"TeacherCredentials(tls={self.tls}, client_cert={self.cert is not None}, "
            f"token={'yes' if self.token else 'no'})"
        )

    def channel(self, target: str, options: list[tuple[str, object]]) -> grpc.Channel:
        """A channel to ``target`` that uses these credentials on every call."""
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
            )
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            if self.token:
                log.warning("teacher_token_without_tls", target=target)
            channel = grpc.insecure_channel(target, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


__all__ = ["TOKEN_ENV", "TeacherCredentials", "read_secret_file", "read_token", "tls_files_problem"]
