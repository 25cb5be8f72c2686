"""The teacher under clients that lack the right credentials: TLS, mutual TLS and the
bearer token, with real servers on loopback and certificates made here by openssl.

A client without the right credentials gets a failed handshake (TLS) or
UNAUTHENTICATED (token) and never an answer; health answers without a token
(probes cannot send one); GetInfo names no path or store location of the
server; the token never reaches a log line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vidalign.config import ConfigError
from vidalign.errors import InvalidInput, Unauthenticated, Unavailable
from vidalign.teacher.client import GrpcTeacher, channel_options, connect
from vidalign.teacher.credentials import TOKEN_ENV, TeacherCredentials
from vidalign.teacher.protocol import TeacherInfo, info_message, public_name
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc

MODEL = "tiny-animatediff"
TOKEN = "tok-7f3a9c1e5b2d4e6f8a0b1c2d3e4f5a6b"
WRONG = "tok-00000000000000000000000000000000"
HEALTH = "vidalign.teacher.v1.TeacherService"


# --- certificates -------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, ca: str, name: str, cn: str, ext: str) -> None:
    """An EC key and a certificate for ``cn`` signed by ``ca`` with the extensions ``ext``."""
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca (signs the server and a client), rogue (an unrelated CA with its own client)."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN=vidalign test {ca}",
            cwd=d,
        )
    _issue(
        d,
        "ca",
        "server",
        "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _issue(d, "ca", "client", "trainer", "extendedKeyUsage=clientAuth\n")
    _issue(d, "rogue", "intruder", "trainer", "extendedKeyUsage=clientAuth\n")
    (d / "token").write_text(TOKEN + "\n")
    (d / "wrong-token").write_text(WRONG + "\n")
    return d


def _server(pki: Path, adapters: list[str], **security):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(
        ServerConfig(
            model=MODEL,
            port=0,
            adapters=adapters,
            device="cpu",
            workers=4,
            tls_cert=str(pki / "server.crt"),
            tls_key=str(pki / "server.key"),
            **security,
        )
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def servers(pki, adapter_paths):
    """tls: TLS + token + a plaintext health port; mtls: mutual TLS, no token."""
    adapter = adapter_paths[MODEL].resolve()
    tls = _server(
        pki,
        # One adapter by absolute path, one by store URI: GetInfo must show neither.
        [str(adapter), adapter_paths[f"{MODEL}+lora"].resolve().as_uri()],
        token_file=str(pki / "token"),
        health_port=0,
    )
    mtls = _server(pki, [str(adapter)], tls_client_ca=str(pki / "ca.crt"))
    yield {"tls": tls, "mtls": mtls}
    tls.stop(grace=0)
    mtls.stop(grace=0)


def _address(server) -> str:
    return f"127.0.0.1:{server.port}"


def _client(server, **creds) -> GrpcTeacher:
    return GrpcTeacher(
        _address(server),
        timeout=20.0,
        wait_s=0,
        credentials=TeacherCredentials.load(env=False, **creds),
    )


# --- TLS -----------------------------------------------------------------------------


def test_a_plaintext_client_fails_the_handshake_and_gets_no_answer(servers, pki):
    client = _client(servers["tls"], token_file=str(pki / "token"))  # the token, but no TLS
    with pytest.raises(Unavailable):
        client.info()
    client.close()


def test_a_client_that_trusts_another_ca_refuses_the_server(servers, pki):
    client = _client(servers["tls"], tls_ca=str(pki / "rogue.crt"), token_file=str(pki / "token"))
    with pytest.raises(Unavailable):
        client.info()
    client.close()


def test_a_client_with_the_ca_and_the_token_is_served(servers, pki):
    client = _client(servers["tls"], tls_ca=str(pki / "ca.crt"), token_file=str(pki / "token"))
    info = client.info()
    client.close()
    assert info.model == MODEL and len(info.adapters) == 2


# --- the token -----------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_without_the_right_token_every_rpc_is_unauthenticated(servers, pki, token):
    creds = {"tls_ca": str(pki / "ca.crt")}
    if token:
        creds["token_file"] = str(pki / token)
    client = _client(servers["tls"], **creds)
    with pytest.raises(Unauthenticated) as err:
        client.info()
    assert "UNAUTHENTICATED" in str(err.value)
    assert TOKEN not in str(err.value) and WRONG not in str(err.value)
    client.close()

    # The streaming RPC and reflection are refused before any handler reads the stream.
    channel = TeacherCredentials.load(env=False, **creds).channel(
        _address(servers["tls"]), channel_options()
    )
    with pytest.raises(grpc.RpcError) as rpc:
        list(
            pb_grpc.TeacherServiceStub(channel).DenoisingLoss(
                iter([pb.DenoisingLossRequest()]), timeout=10
            )
        )
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as rpc:
        list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_reflection_answers_with_the_token(servers, pki):
    creds = TeacherCredentials.load(
        env=False, tls_ca=str(pki / "ca.crt"), token_file=str(pki / "token")
    )
    channel = creds.channel(_address(servers["tls"]), channel_options())
    (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    channel.close()
    assert HEALTH in {s.name for s in answer.list_services_response.service}


def test_the_token_comes_from_the_environment_when_no_file_is_given(servers, pki, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    teacher = connect(
        _address(servers["tls"]),
        wait_s=0,
        credentials=TeacherCredentials.load(tls_ca=str(pki / "ca.crt")),
    )
    assert teacher.info().model == MODEL
    teacher.close()


def test_health_answers_without_a_token_and_the_health_port_serves_only_health(servers, pki):
    server = servers["tls"]
    # On the TLS port, without a token (kubelet cannot send one).
    channel = TeacherCredentials.load(env=False, tls_ca=str(pki / "ca.crt")).channel(
        _address(server), channel_options()
    )
    status = (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=HEALTH), timeout=10)
        .status
    )
    channel.close()
    assert status == health_pb2.HealthCheckResponse.SERVING
    # On the plaintext health port: health, and nothing else.
    plain = grpc.insecure_channel(f"127.0.0.1:{server.health_port.port}")
    status = (
        health_pb2_grpc.HealthStub(plain)
        .Check(health_pb2.HealthCheckRequest(service=HEALTH), timeout=10)
        .status
    )
    assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as rpc:
        pb_grpc.TeacherServiceStub(plain).GetInfo(
            pb.GetInfoRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
    assert rpc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    plain.close()


# --- mutual TLS ----------------------------------------------------------------------


def test_mtls_refuses_a_client_without_a_certificate(servers, pki):
    client = _client(servers["mtls"], tls_ca=str(pki / "ca.crt"))
    with pytest.raises(Unavailable):
        client.info()
    client.close()


def test_mtls_refuses_a_certificate_from_another_ca(servers, pki):
    client = _client(
        servers["mtls"],
        tls_ca=str(pki / "ca.crt"),
        tls_cert=str(pki / "intruder.crt"),
        tls_key=str(pki / "intruder.key"),
    )
    with pytest.raises(Unavailable):
        client.info()
    client.close()


def test_mtls_serves_a_client_with_a_certificate_the_ca_signed(servers, pki):
    client = _client(
        servers["mtls"],
        tls_ca=str(pki / "ca.crt"),
        tls_cert=str(pki / "client.crt"),
        tls_key=str(pki / "client.key"),
    )
    assert client.info().model == MODEL
    client.close()


# --- what GetInfo reveals ------------------------------------------------------------


def test_getinfo_names_no_path_or_store_location_of_the_server(servers, pki, adapter_paths):
    client = _client(servers["tls"], tls_ca=str(pki / "ca.crt"), token_file=str(pki / "token"))
    response = client._stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    client.close()
    text = str(response)
    directory = str(adapter_paths[MODEL].resolve().parent)
    assert directory not in text and "file://" not in text
    sources = sorted(a.source for a in response.adapters)
    assert sources == sorted(adapter_paths[n].name for n in (MODEL, f"{MODEL}+lora"))
    assert all(a.id.startswith("sha256:") for a in response.adapters)  # what clients address


def test_getinfo_reduces_model_dirs_and_store_uris_to_their_last_component():
    info = TeacherInfo(
        model="s3://models-bucket/teachers/sd15-dir/",
        family="sd15",
        cond_dim=8,
        frames=1,
        resolution=8,
        latent_channels=4,
        vae_scale_factor=8,
        num_train_timesteps=1000,
    )
    assert info_message(info).model == "sd15-dir"
    assert public_name("/srv/models/animatediff") == "animatediff"
    assert public_name("tiny-animatediff") == "tiny-animatediff"


# --- configuration errors ------------------------------------------------------------


def test_bad_security_settings_fail_before_binding_and_name_the_setting(pki, tmp_path):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        ServerConfig(model=MODEL, tls_cert=str(pki / "server.crt"))
    with pytest.raises(ConfigError, match=r"tls_client_ca .* needs TLS"):
        ServerConfig(model=MODEL, tls_client_ca=str(pki / "ca.crt"))
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"token_file: .* is empty"):
        TeacherServer(ServerConfig(model=MODEL, port=0, token_file=str(empty)))
    with pytest.raises(InvalidInput, match=r"teacher\.tls_key needs teacher\.tls_cert"):
        TeacherCredentials.load(tls_key=str(pki / "client.key"), prefix="teacher.")


def test_credentials_never_show_the_token():
    creds = TeacherCredentials(token=TOKEN, tls=True)
    assert TOKEN not in repr(creds) and TOKEN not in str(creds)


def test_the_default_bind_address_is_loopback():
    from vidalign_cli.main import build_parser
    from vidalign_teacher.server import ServerConfig

    assert ServerConfig(model=MODEL).host == "127.0.0.1"
    args = build_parser().parse_args(["teacher", "serve", "--teacher-model", MODEL])
    assert args.host == "127.0.0.1"


# --- the CLI, in its own process -----------------------------------------------------


def test_cli_serve_with_tls_and_token_serves_only_the_right_client_and_logs_no_token(pki, tmp_path):
    port_file = tmp_path / "port"
    log_path = tmp_path / "teacher.log"
    env = {**os.environ, "VIDALIGN_LOG_FORMAT": "json", "OMP_NUM_THREADS": "2"}
    env.pop(TOKEN_ENV, None)
    command = [
        sys.executable,
        "-m",
        "vidalign_cli.main",
        "teacher",
        "serve",
        "--teacher-model",
        MODEL,
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--device",
        "cpu",
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--token-file",
        str(pki / "token"),
    ]
    assert TOKEN not in " ".join(command)
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the teacher did not bind within 120 s"
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text()}"
        right = GrpcTeacher(
            address,
            timeout=60.0,
            wait_s=0,
            credentials=TeacherCredentials.load(
                env=False, tls_ca=str(pki / "ca.crt"), token_file=str(pki / "token")
            ),
        )
        right.wait_ready(timeout=60.0)
        # Health flips to SERVING once the model has loaded.
        channel = TeacherCredentials.load(env=False, tls_ca=str(pki / "ca.crt")).channel(
            address, channel_options()
        )
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest(service=HEALTH), timeout=10).status != (
            health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        channel.close()
        wrong = GrpcTeacher(
            address,
            timeout=30.0,
            wait_s=0,
            credentials=TeacherCredentials.load(
                env=False, tls_ca=str(pki / "ca.crt"), token_file=str(pki / "wrong-token")
            ),
        )
        with pytest.raises(Unauthenticated):
            wrong.info()
        wrong.close()
        plaintext = GrpcTeacher(
            address, timeout=30.0, wait_s=0, credentials=TeacherCredentials(token=TOKEN)
        )
        with pytest.raises(Unavailable):
            plaintext.info()
        plaintext.close()
        assert right.info().model == MODEL
        right.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    logs = log_path.read_text()
    assert "rpc_unauthenticated" in logs and "teacher_security" in logs  # logs were captured
    assert TOKEN not in logs and WRONG not in logs
