"""The AttentionPriors RPC: a CogVideoX teacher answers with the same priors as
in-process extraction, bad input gets the right status (and the server keeps
serving), and each model family refuses the other family's RPC."""

from __future__ import annotations

import json
import re

import grpc
import numpy as np
import pytest
import torch

from vidalign.data.synth import generate
from vidalign.errors import FailedPrecondition
from vidalign.motionenhancer import extract_priors, load_cogvideox
from vidalign.teacher import protocol
from vidalign.teacher.client import GrpcTeacher, LocalTeacher, channel_options
from vidalign.teacher.protocol import AttentionPriorsRequest, DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc

MODEL = "tiny-cogvideox"


def _server(model: str):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(model=model, host="127.0.0.1", port=0, device="cpu", workers=4))
    server.start()
    return server


@pytest.fixture(scope="module")
def address():
    server = _server(MODEL)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=0)


@pytest.fixture(scope="module")
def animatediff_address():
    server = _server("tiny-animatediff")
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=0)


@pytest.fixture(scope="module")
def stub(address):
    channel = grpc.insecure_channel(address, options=channel_options(64 << 20))
    yield pb_grpc.TeacherServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def client(address):
    client = GrpcTeacher(address, chunk_bytes=4096, wait_s=0)  # the 27 KB video spans 7 messages
    yield client
    client.close()


@pytest.fixture(scope="module")
def clip():
    return generate(1, seed=5, frames=9, size=32)[0]


def request(clip, **overrides) -> AttentionPriorsRequest:
    fields = dict(video=clip.video, prompt=clip.caption, steps=2)
    fields.update(overrides)
    return AttentionPriorsRequest(**fields)


def call(stub, messages):
    return protocol.parse_priors_result(stub.AttentionPriors(iter(messages), timeout=60))


def assert_same_priors(got, want):
    for name in ("prior", "head_scores", "token_scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # Exact: the server runs the same extract_priors on the same uint8 video, prompt and
        # parameters (chunk_size included), with the same deterministic tiny weights, in this
        # process (one intra-op thread pool: the same reduction order); float32 travels as raw
        # bytes. A parameter not reaching the extraction changes priors by O(their size).
        assert torch.equal(a, b), (name, (a - b).abs().max().item())
    assert list(got.selected_heads) == list(want.selected_heads)
    assert got.selected_tokens == want.selected_tokens
    strip = lambda m: json.loads(json.dumps({k: v for k, v in m.items() if k != "seconds"}))  # noqa: E731
    assert strip(got.metadata) == strip(want.metadata)


def test_get_info_describes_cogvideox(client):
    info = client.info()
    assert info.model == MODEL and info.family == "cogvideox"
    assert (info.frames, info.height, info.width, info.resolution) == (9, 32, 32, 32)
    assert info.adapters == [] and info.cond_dim == 32


def test_grpc_priors_equal_in_process_extraction(client, clip):
    want = extract_priors(load_cogvideox(MODEL), clip.video, clip.caption, steps=2, guidance=6.0)
    got = client.attention_priors(request(clip))
    assert got.prior.shape == want.prior.shape and got.prior.shape[0] == len(got.selected_tokens)
    assert_same_priors(got, want)
    local = LocalTeacher(MODEL).attention_priors(request(clip, video=torch.from_numpy(clip.video)))
    assert_same_priors(local, want)


def test_parameters_reach_the_extraction(client, clip):
    want = extract_priors(
        load_cogvideox(MODEL), clip.video, "a red bar slides up", steps=1, guidance=1.0,
        head_ratio=1.0, token_ratio=0.25, chunk_size=7, memory=False,
    )
    got = client.attention_priors(request(
        clip, prompt="a red bar slides up", steps=1, guidance=1.0, head_ratio=1.0,
        token_ratio=0.25, chunk_size=7, memory=False, model=MODEL,
    ))
    assert_same_priors(got, want)
    assert got.selected_heads == [0, 1]


def assert_still_serving(stub, clip):
    priors = call(stub, protocol.priors_request_messages(request(clip, steps=1)))
    assert torch.isfinite(priors.prior).all() and len(priors.selected_tokens) > 0


BAD = [
    ("video-float", lambda c: request(c, video=c.video.astype(np.float32)),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: expected dtype uint8, got torch.float32"),
    ("video-3d", lambda c: request(c, video=c.video[..., 0]),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: expected shape \(F, H, W, 3\), got \[9, 32, 32\]"),
    ("frames-not-4k+1", lambda c: request(c, video=c.video[:8]),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: 8 frames; tiny-cogvideox takes 4k \+ 1 frames, at most 9"),
    ("too-many-frames", lambda c: request(c, video=np.concatenate([c.video, c.video[:4]])),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: 13 frames"),
    ("size-not-multiple", lambda c: request(c, video=c.video[:, :28, :28]),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: frame size 28x28 must be a positive multiple of 8"),
    ("too-large", lambda c: request(c, video=np.zeros((9, 64, 64, 3), np.uint8)),
     grpc.StatusCode.INVALID_ARGUMENT, r"video: 9x64x64 is larger than tiny-cogvideox's native 9x32x32"),
    ("empty-prompt", lambda c: request(c, prompt=""),
     grpc.StatusCode.INVALID_ARGUMENT, r"prompt: expected a non-empty str, got ''"),
    ("blank-prompt", lambda c: request(c, prompt="   "),
     grpc.StatusCode.INVALID_ARGUMENT, r"prompt: expected a non-empty str"),
    ("steps-0", lambda c: request(c, steps=0),
     grpc.StatusCode.INVALID_ARGUMENT, r"steps: expected an int in \[1, 200\], got 0"),
    ("head-ratio-0", lambda c: request(c, head_ratio=0.0),
     grpc.StatusCode.INVALID_ARGUMENT, r"head_ratio: expected a fraction in \(0, 1\], got 0.0"),
    ("token-ratio-2", lambda c: request(c, token_ratio=2.0),
     grpc.StatusCode.INVALID_ARGUMENT, r"token_ratio: expected a fraction in \(0, 1\]"),
    ("chunk-size-negative", lambda c: request(c, chunk_size=-1),
     grpc.StatusCode.INVALID_ARGUMENT, r"chunk_size: expected an int >= 0 \(0: auto\), got -1"),
    ("guidance-nan", lambda c: request(c, guidance=float("nan")),
     grpc.StatusCode.INVALID_ARGUMENT, r"guidance: expected a finite number >= 0"),
    ("unknown-model", lambda c: request(c, model="cogvideox-5b"),
     grpc.StatusCode.NOT_FOUND, r"model 'cogvideox-5b' is not hosted here: this teacher serves 'tiny-cogvideox'"),
]


@pytest.mark.parametrize("build,code,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_status_and_server_keeps_serving(stub, clip, build, code, message):
    with pytest.raises(grpc.RpcError) as err:
        call(stub, protocol.priors_request_messages(build(clip)))
    assert err.value.code() == code
    assert re.search(message, err.value.details()), err.value.details()
    assert_still_serving(stub, clip)


def test_stream_without_video_or_params(stub, clip):
    params = pb.AttentionPriorsParams(prompt="a cat")
    for messages, message in [
        ([pb.AttentionPriorsRequest(params=params)], "video: missing"),
        ([pb.AttentionPriorsRequest()], "must carry params"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(stub, messages)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
    assert_still_serving(stub, clip)


def test_unset_optional_params_take_the_defaults(stub, clip):
    messages = list(protocol.priors_request_messages(request(clip)))
    messages[0].params.Clear()
    messages[0].params.prompt = clip.caption
    priors = call(stub, messages)
    assert priors.metadata["steps"] == 5 and priors.metadata["guidance"] == 6.0
    assert priors.metadata["head_ratio"] == 0.5 and priors.metadata["memory"] is True


def test_denoising_loss_on_cogvideox_is_failed_precondition(client, stub, clip):
    loss = DenoisingLossRequest(sample_ids=["a"], latents=torch.zeros(1, 4, 3, 8, 8), captions=["x"])
    with pytest.raises(grpc.RpcError) as err:
        protocol.parse_result(stub.DenoisingLoss(protocol.request_messages(loss), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "DenoisingLoss is not served by a CogVideoX teacher" in err.value.details()
    with pytest.raises(FailedPrecondition, match="FAILED_PRECONDITION"):
        client.denoising_loss(loss)
    assert_still_serving(stub, clip)


def test_attention_priors_on_animatediff_is_failed_precondition(animatediff_address, clip):
    teacher = GrpcTeacher(animatediff_address, wait_s=0)
    try:
        assert teacher.info().family == "animatediff"
        with pytest.raises(FailedPrecondition, match=r"AttentionPriors needs a CogVideoX teacher; "
                           r"this one serves 'tiny-animatediff' \(animatediff\)"):
            teacher.attention_priors(request(clip))
        assert teacher.info().model == "tiny-animatediff"  # still serving
    finally:
        teacher.close()


def test_local_teacher_refuses_the_other_family(clip):
    with pytest.raises(FailedPrecondition, match="DenoisingLoss is not served"):
        LocalTeacher(MODEL).denoising_loss(DenoisingLossRequest(sample_ids=["a"], captions=["x"]))
    with pytest.raises(FailedPrecondition, match="AttentionPriors needs a CogVideoX teacher"):
        LocalTeacher("tiny-animatediff").attention_priors(request(clip))
