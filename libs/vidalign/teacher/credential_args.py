"""The command-line flags of teacher security, free of heavy imports (no grpc, no torch)
so that building the ``vidalign`` parser stays fast.

Server (``vidalign teacher serve``): ``--tls-cert``, ``--tls-key``,
``--tls-client-ca``, ``--token-file``, ``--health-port``. Client (``teacher
info|gap``, ``priors extract --teacher``): ``--tls-ca``, ``--tls-cert``,
``--tls-key``, ``--token-file``; stage 2's config keys are the same names
under ``teacher.``. Secrets are read from files only: no flag takes a token.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vidalign.teacher.credentials import TeacherCredentials


def add_server_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (docs/design.md, teacher service)")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (chain): serve TLS only (with --tls-key)",
    )
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA: require client certificates it signed (mutual TLS)",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token every call but health's must send "
        "(authorization: Bearer TOKEN)",
    )
    group.add_argument(
        "--health-port",
        type=int,
        default=-1,
        metavar="PORT",
        help="also serve grpc.health.v1 alone, in plaintext, on PORT (for probes "
        "that cannot speak TLS); -1: none, 0: a free port",
    )


def add_client_credential_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher credentials (configs: teacher.tls_ca, ...)")
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM CA that signed the teacher's certificate: connect over TLS",
    )
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM client certificate, for a teacher that requires mutual TLS",
    )
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the teacher's bearer token (default: the "
        "VIDALIGN_TEACHER_TOKEN environment variable, if set)",
    )


def client_credentials(args: argparse.Namespace) -> TeacherCredentials:
    """The credentials the client flags name, files read now (InvalidInput on a bad one)."""
    from vidalign.teacher.credentials import TeacherCredentials

    return TeacherCredentials.load(
        tls_ca=args.tls_ca or "",
        tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "",
        token_file=args.token_file or "",
        prefix="--",
    )
