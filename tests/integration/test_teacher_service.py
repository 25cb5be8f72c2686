"""The teacher service: bad input gets the right status and a message a person
can act on, and the server keeps serving afterwards; health and reflection."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vidalign.errors import InvalidInput, NotFound, ResourceExhausted
from vidalign.teacher import protocol, wire
from vidalign.teacher.client import GrpcTeacher, channel_options
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import file_digest

from ..conftest import MAX_MESSAGE_BYTES

MODEL = "tiny-animatediff"


@pytest.fixture(scope="module")
def address(teacher_servers):
    return teacher_servers[MODEL]


@pytest.fixture(scope="module")
def stub(address):
    channel = grpc.insecure_channel(address, options=channel_options(64 << 20))
    yield pb_grpc.TeacherServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def info(address):
    client = GrpcTeacher(address)
    yield client.info()
    client.close()


@pytest.fixture(scope="module")
def adapter_id(adapter_paths):
    return file_digest(adapter_paths[MODEL])


def good_request(info, default_adapter, **overrides) -> DenoisingLossRequest:
    b, d_v = 2, info.adapters[0].feature_dim
    fields = dict(
        sample_ids=["a", "b"],
        features=torch.randn(b, 8, d_v),
        latents=torch.randn(b, info.latent_channels, 4, 8, 8),
        captions=["a red square", "a blue square"],
        adapter_id=default_adapter,
        seed=3,
        want_grad=True,
    )
    fields.update(overrides)
    return DenoisingLossRequest(**fields)


def call(stub, messages):
    return protocol.parse_result(stub.DenoisingLoss(iter(messages), timeout=30))


def assert_still_serving(stub, info, adapter_id):
    result = call(stub, protocol.request_messages(good_request(info, adapter_id)))
    assert result.losses.shape == (2, 1) and torch.isfinite(result.losses).all()
    assert result.grad.shape == (2, 8, info.adapters[0].feature_dim)


def test_get_info_describes_model_and_adapters(info, adapter_paths):
    assert info.model == MODEL and info.family == "animatediff"
    assert info.cond_dim > 0 and info.frames > 0 and info.resolution > 0
    assert {a.id for a in info.adapters} == {
        file_digest(adapter_paths[MODEL]), file_digest(adapter_paths[MODEL + "+lora"])
    }
    assert info.max_message_bytes == MAX_MESSAGE_BYTES


BAD = [
    ("features-2d", lambda i, a: good_request(i, a, features=torch.randn(2, 16)),
     grpc.StatusCode.INVALID_ARGUMENT, r"features: expected 3 dims \(B, T, d_v\), got shape \[2, 16\]"),
    ("features-wrong-dv", lambda i, a: good_request(i, a, features=torch.randn(2, 8, 5)),
     grpc.StatusCode.INVALID_ARGUMENT, r"features: d_v is 5, adapter sha256:\w+ expects"),
    ("features-int", lambda i, a: good_request(i, a, features=torch.ones(2, 8, i.adapters[0].feature_dim, dtype=torch.int64)),
     grpc.StatusCode.INVALID_ARGUMENT, r"features: expected a float dtype"),
    ("features-nan", lambda i, a: good_request(i, a, features=torch.full((2, 8, i.adapters[0].feature_dim), float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT, r"features: \d+ of \d+ values are NaN or Inf"),
    ("latents-inf", lambda i, a: good_request(i, a, latents=torch.full((2, i.latent_channels, 4, 8, 8), float("inf"))),
     grpc.StatusCode.INVALID_ARGUMENT, r"latents: \d+ of \d+ values are NaN or Inf"),
    ("latents-channels", lambda i, a: good_request(i, a, latents=torch.randn(2, 3, 4, 8, 8)),
     grpc.StatusCode.INVALID_ARGUMENT, r"latents: 3 channels, tiny-animatediff expects"),
    ("batch-mismatch", lambda i, a: good_request(i, a, sample_ids=["a"]),
     grpc.StatusCode.INVALID_ARGUMENT, r"batch 2 does not match 1 sample_ids"),
    ("pixels-float", lambda i, a: good_request(i, a, latents=None, pixels=torch.zeros(2, 4, 32, 32, 3)),
     grpc.StatusCode.INVALID_ARGUMENT, r"pixels: expected dtype uint8"),
    ("no-video", lambda i, a: good_request(i, a, latents=None),
     grpc.StatusCode.INVALID_ARGUMENT, r"exactly one of the tensors 'latents' or 'pixels'"),
    ("timestep-out-of-range", lambda i, a: good_request(i, a, timesteps=[5000]),
     grpc.StatusCode.INVALID_ARGUMENT, r"timesteps \[5000\] are outside \[0, 1000\)"),
    ("unknown-adapter", lambda i, a: good_request(i, a, adapter_id="sha256:" + "0" * 64),
     grpc.StatusCode.NOT_FOUND, r"adapter 'sha256:0+' is not loaded on this teacher \(loaded: sha256:"),
    ("unknown-model", lambda i, a: good_request(i, a, model="cogvideox-5b"),
     grpc.StatusCode.NOT_FOUND, r"model 'cogvideox-5b' is not hosted here: this teacher serves 'tiny-animatediff'"),
]


@pytest.mark.parametrize("build,code,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_status_and_server_keeps_serving(stub, info, adapter_id, build, code, message):
    with pytest.raises(grpc.RpcError) as err:
        call(stub, protocol.request_messages(build(info, adapter_id)))
    assert err.value.code() == code
    assert re.search(message, err.value.details()), err.value.details()
    assert_still_serving(stub, info, adapter_id)


def test_byte_count_that_does_not_match_shape(stub, info, adapter_id):
    messages = list(protocol.request_messages(good_request(info, adapter_id)))
    features = next(t for t in messages[0].tensors if t.name == "features")
    features.data = features.data[:-4]
    with pytest.raises(grpc.RpcError) as err:
        call(stub, messages)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'features': received" in err.value.details() and "needs" in err.value.details()
    assert_still_serving(stub, info, adapter_id)


def test_message_over_the_limit(stub, info, adapter_id):
    # One message larger than the server's per-message limit: gRPC refuses it.
    request = good_request(info, adapter_id, latents=torch.randn(2, info.latent_channels, 4, 256, 256))
    messages = list(protocol.request_messages(request, chunk_bytes=64 << 20))
    assert messages[0].ByteSize() > MAX_MESSAGE_BYTES
    with pytest.raises(grpc.RpcError) as err:
        call(stub, messages)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub, info, adapter_id)


def test_request_over_the_total_limit(address, info, adapter_id):
    # Streamed in small pieces, but the tensors add up to more than max_request_bytes.
    client = GrpcTeacher(address)
    big = torch.zeros(2, info.latent_channels, 16, 256, 256)  # 33.5 MB > 32 MiB
    try:
        with pytest.raises(ResourceExhausted, match="over this server's limit"):
            client.denoising_loss(good_request(info, adapter_id, latents=big))
        # The client maps statuses back to vidalign's exceptions.
        with pytest.raises(InvalidInput, match="features: expected 3 dims"):
            client.denoising_loss(good_request(info, adapter_id, features=torch.randn(2, 4)))
        with pytest.raises(NotFound, match="not loaded"):
            client.denoising_loss(good_request(info, adapter_id, adapter_id="sha256:" + "1" * 64))
        assert client.denoising_loss(good_request(info, adapter_id)).losses.shape == (2, 1)
    finally:
        client.close()


def test_stream_without_params(stub, info, adapter_id):
    pieces = next(wire.pack({"features": torch.zeros(1, 1, 1)}))
    with pytest.raises(grpc.RpcError) as err:
        call(stub, [pb.DenoisingLossRequest(tensors=pieces)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry params" in err.value.details()


def test_request_id_comes_back(stub, info, adapter_id):
    responses = stub.DenoisingLoss(
        protocol.request_messages(good_request(info, adapter_id)), metadata=(("x-request-id", "abc123"),)
    )
    list(responses)
    assert ("x-request-id", "abc123") in tuple(responses.trailing_metadata())


def test_health_and_reflection(address):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vidalign.teacher.v1.TeacherService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "vidalign.teacher.v1.TeacherService" in names and "grpc.health.v1.Health" in names


def test_health_is_not_serving_before_the_model_loads(adapter_paths):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(model=MODEL, host="127.0.0.1", port=0, device="cpu"))
    server.server.start()  # port open, model not loaded yet
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TeacherServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in err.value.details()
    finally:
        server.stop(grace=0)


def test_serve_unknown_model_exits_with_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve", "--teacher-model", "no-such-model",
         "--host", "127.0.0.1", "--port", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no-such-model" in proc.stderr and "tiny-animatediff" in proc.stderr
