"""Fuzzing the teacher's RPCs with structurally valid messages.

Hypothesis draws message streams whose every message parses (so they reach the
handlers, not gRPC's decoder) but whose fields, tensor pieces and order are
random: params missing, repeated or late; tensors with any name, dtype and
shape, cut into random pieces, short, long, declared twice, interleaved; and
near-valid requests with one field bent. Against real servers on loopback
(tiny-animatediff for DenoisingLoss, tiny-cogvideox for AttentionPriors), every
answer is OK or a status that names the caller's mistake: never UNKNOWN or
INTERNAL, the server keeps running, and health says SERVING afterwards.
"""

from __future__ import annotations

import collections
import itertools
import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidalign.teacher import wire
from vidalign.teacher.client import channel_options
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import file_digest

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(
    max_examples=200, deadline=None, database=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MIB = 1 << 20


def _server(model: str, adapters: list[str]):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(
        model=model, host="127.0.0.1", port=0, device="cpu", adapters=adapters, workers=2,
        max_message_bytes=4 * MIB, max_request_bytes=2 * MIB, max_inflight_bytes=8 * MIB,
        stream_idle_timeout_s=10,
    ))
    server.start()
    return server


@pytest.fixture(scope="module")
def animatediff(adapter_paths):
    server = _server("tiny-animatediff", [str(adapter_paths["tiny-animatediff"])])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options(8 * MIB))
    stub = pb_grpc.TeacherServiceStub(channel)
    yield stub, stub.GetInfo(pb.GetInfoRequest(), timeout=10), file_digest(adapter_paths["tiny-animatediff"])
    assert_serving(channel)
    channel.close()
    server.stop(grace=0)


@pytest.fixture(scope="module")
def cogvideox():
    server = _server("tiny-cogvideox", [])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options(8 * MIB))
    yield pb_grpc.TeacherServiceStub(channel)
    assert_serving(channel)
    channel.close()
    server.stop(grace=0)


def assert_serving(channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def outcome(call) -> grpc.StatusCode:
    try:
        list(call)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, (err.code(), err.details())
        return err.code()


# --- strategies --------------------------------------------------------------------------

text = st.text(max_size=12)
small_int = st.integers(-3, 12)
odd_int = st.sampled_from([-(2**31), -1, 0, 1, 2, 3, 999, 1000, 2**31 - 1, 2**62])
int32 = odd_int.filter(lambda n: -(2**31) <= n < 2**31)
odd_float = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 1.5, 1e30])
dtypes = st.sampled_from([*wire.DTYPES, "", "complex64", "float8"])


@st.composite
def tensor_bytes(draw, dtype: str, shape: list[int]) -> bytes:
    size = wire.nbytes(wire.DTYPES[dtype], shape) if dtype in wire.DTYPES and all(d >= 0 for d in shape) else 0
    if size > 1 << 16:  # declared larger than we care to send: send a little
        return draw(st.binary(max_size=64))
    skew = draw(st.sampled_from([0, 0, 0, -1, 1, -size]))
    n = max(0, size + skew)
    if draw(st.booleans()):  # finite floats (or plain bytes for integer dtypes)
        if dtype in ("float32", "float16", "bfloat16", "float64") and size:
            values = torch.randn(n // wire.DTYPES[dtype].itemsize + 1, dtype=torch.float64)
            return values.to(wire.DTYPES[dtype]).view(torch.uint8).numpy().tobytes()[:n]
        return bytes(n)
    return draw(st.binary(min_size=min(n, 64), max_size=min(n, 64))) + bytes(max(0, n - 64))


@st.composite
def tensor_pieces(draw, names: list[str], shapes: st.SearchStrategy) -> list[pb.Tensor]:
    """One tensor as a list of pieces: random name, dtype, shape, byte count and cuts."""
    name = draw(st.sampled_from(names))
    dtype = draw(dtypes)
    shape = draw(shapes)
    data = draw(tensor_bytes(dtype, shape))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    bounds = [0, *cuts, len(data)]
    pieces = [pb.Tensor(name=name, data=data[a:b]) for a, b in itertools.pairwise(bounds)]
    if draw(st.integers(0, 9)):  # usually: the first piece declares dtype and shape
        pieces[0].dtype = dtype
        pieces[0].shape.extend(shape)
    if not draw(st.integers(0, 9)):  # sometimes: a later piece declares them again
        pieces.append(pb.Tensor(name=name, dtype=dtype, shape=shape, data=b""))
    return pieces


random_shape = st.one_of(
    st.lists(st.integers(0, 5), max_size=6),
    st.lists(st.sampled_from([-1, 0, 1, 2**20, 2**40, 2**62]), min_size=1, max_size=4),
    st.lists(st.integers(1, 2), min_size=9, max_size=10),
)


@st.composite
def stream(draw, params: st.SearchStrategy, tensors: st.SearchStrategy, message: type) -> list:
    """Messages: params first (usually), tensor pieces spread over messages, maybe shuffled."""
    pieces = [p for t in draw(st.lists(tensors, max_size=3)) for p in t]
    if draw(st.booleans()):
        pieces = draw(st.permutations(pieces))
    cuts = sorted(draw(st.lists(st.integers(0, len(pieces)), max_size=3)))
    bounds = [0, *cuts, len(pieces)]
    messages = [message(tensors=pieces[a:b]) for a, b in itertools.pairwise(bounds)]
    where = draw(st.sampled_from(["first", "first", "first", "none", "late", "twice"]))
    if where != "none":
        p = draw(params)
        if where == "late" and len(messages) > 1:
            messages[-1].params.CopyFrom(p)
        else:
            messages[0].params.CopyFrom(p)
            if where == "twice":
                messages.append(message(params=p))
    if draw(st.integers(0, 9)) == 0:
        messages.insert(draw(st.integers(0, len(messages))), message())  # an empty message
    return messages


@st.composite
def denoising_params(draw, adapter_id: str) -> pb.DenoisingLossParams:
    b = draw(st.integers(0, 3))
    p = pb.DenoisingLossParams(
        sample_ids=draw(st.lists(text, min_size=b, max_size=b)),
        captions=draw(st.one_of(st.just([]), st.lists(text, max_size=3))),
        adapter_id=draw(st.sampled_from(["", adapter_id, "sha256:" + "0" * 64, "x"])),
        seed=draw(st.integers(0, 2**64 - 1)),
        num_draws=draw(st.one_of(small_int, int32)),
        timesteps=draw(st.lists(st.one_of(small_int, int32), max_size=3)),
        want_grad=draw(st.booleans()),
        model=draw(st.sampled_from(["", "tiny-animatediff", "tiny-cogvideox", "x"])),
    )
    if draw(st.booleans()):
        lo, hi = draw(st.tuples(st.integers(-5, 1200), st.integers(-5, 1200)))
        p.timestep_range.min, p.timestep_range.max = lo, hi
    return p


@st.composite
def near_valid_denoising(draw, info: pb.GetInfoResponse, adapter_id: str) -> list:
    """A well-formed request with a random batch and one value bent, cut into random pieces."""
    b = draw(st.integers(1, 2))
    d_v = info.adapters[0].feature_dim
    features = torch.randn(b, draw(st.integers(1, 3)), draw(st.sampled_from([d_v, d_v, 1])))
    frames = draw(st.integers(1, 3))
    if draw(st.booleans()):
        video = ("latents", torch.randn(b, draw(st.sampled_from([info.latent_channels, 1])), frames, 8, 8))
    else:
        video = ("pixels", torch.randint(0, 255, (b, frames, 32, 32, 3), dtype=torch.uint8))
    bend = draw(st.sampled_from(["none", "nan", "dtype", "batch"]))
    if bend == "nan":
        features[0, 0, 0] = math.nan
    elif bend == "dtype":
        features = features.to(torch.float16)
    elif bend == "batch":
        b = b + 1
    params = pb.DenoisingLossParams(
        sample_ids=[str(i) for i in range(b)], adapter_id=adapter_id, seed=draw(st.integers(0, 9)),
        num_draws=draw(st.integers(0, 3)), want_grad=draw(st.booleans()),
        captions=draw(st.sampled_from([[], ["a square"] * b])),
    )
    chunk = draw(st.sampled_from([97, 1024, 4096, wire.CHUNK_BYTES]))
    messages = [pb.DenoisingLossRequest(tensors=p) for p in wire.pack(dict([("features", features), video]), chunk)]
    messages[0].params.CopyFrom(params)
    return messages


@st.composite
def priors_params(draw) -> pb.AttentionPriorsParams:
    p = pb.AttentionPriorsParams(
        prompt=draw(st.sampled_from(["", "a red square moves left", "x" * 300])) + draw(text),
        negative_prompt=draw(text), model=draw(st.sampled_from(["", "tiny-cogvideox", "tiny-animatediff"])),
    )
    if draw(st.booleans()):
        p.steps = draw(st.sampled_from([-1, 0, 1, 2, 201, 2**31 - 1]))
    else:
        p.steps = 1  # keep the valid ones cheap
    if draw(st.booleans()):
        p.guidance = draw(odd_float)
    if draw(st.booleans()):
        p.head_ratio = draw(odd_float)
    if draw(st.booleans()):
        p.token_ratio = draw(odd_float)
    if draw(st.booleans()):
        p.chunk_size = draw(st.sampled_from([-1, 0, 1, 64, 2**31 - 1]))
    if draw(st.booleans()):
        p.memory = draw(st.booleans())
    return p


@st.composite
def near_valid_priors(draw) -> list:
    """A well-formed clip and prompt with one value bent, cut into random pieces."""
    frames = draw(st.sampled_from([5, 9]))
    video = torch.randint(0, 255, (frames, 32, 32, 3), dtype=torch.uint8)
    params = pb.AttentionPriorsParams(prompt="a red square moves left", steps=1,
                                      head_ratio=draw(st.sampled_from([0.25, 0.5, 1.0])),
                                      token_ratio=draw(st.sampled_from([0.25, 0.5, 1.0])),
                                      memory=draw(st.booleans()))
    bend = draw(st.sampled_from(["none", "none", "frames", "dtype", "prompt", "ratio"]))
    if bend == "frames":
        video = video[:4]
    elif bend == "dtype":
        video = video.float()
    elif bend == "prompt":
        params.prompt = ""
    elif bend == "ratio":
        params.head_ratio = draw(odd_float)
    chunk = draw(st.sampled_from([1000, 4096, wire.CHUNK_BYTES]))
    messages = [pb.AttentionPriorsRequest(tensors=p) for p in wire.pack({"video": video}, chunk)]
    messages[0].params.CopyFrom(params)
    return messages


video_shape = st.one_of(
    st.tuples(st.sampled_from([0, 1, 2, 5, 9]), st.sampled_from([0, 8, 16, 32]),
              st.sampled_from([8, 16, 32]), st.sampled_from([3, 1])).map(list),
    random_shape,
)


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.slow
def test_denoising_loss_never_fails_internally(animatediff):
    stub, info, adapter_id = animatediff
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @FUZZ
    @given(messages=st.one_of(
        stream(denoising_params(adapter_id),
               tensor_pieces(["features", "latents", "pixels", "junk", ""], random_shape),
               pb.DenoisingLossRequest),
        near_valid_denoising(info, adapter_id),
    ))
    def run(messages):
        seen.update([outcome(stub.DenoisingLoss(iter(messages), timeout=60))])

    run()
    print({code.name: n for code, n in seen.items()})
    # The fuzz reached the model (OK) and the checks (INVALID_ARGUMENT), not just the parser.
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen.keys(), seen


@pytest.mark.slow
def test_attention_priors_never_fails_internally(cogvideox):
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @FUZZ
    @given(messages=st.one_of(
        stream(priors_params(), tensor_pieces(["video", "video", "junk"], video_shape),
               pb.AttentionPriorsRequest),
        near_valid_priors(),
    ))
    def run(messages):
        seen.update([outcome(cogvideox.AttentionPriors(iter(messages), timeout=60))])

    run()
    print({code.name: n for code, n in seen.items()})
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen.keys(), seen


@pytest.mark.slow
def test_each_model_refuses_the_other_rpc_cleanly(animatediff, cogvideox):
    stub, _, _ = animatediff

    @settings(max_examples=15, deadline=None, database=None, derandomize=True)
    @given(data=st.data())
    def run(data):
        d = data.draw(stream(priors_params(), tensor_pieces(["video"], video_shape), pb.AttentionPriorsRequest))
        assert outcome(stub.AttentionPriors(iter(d), timeout=30)) != grpc.StatusCode.OK
        g = data.draw(stream(denoising_params(""), tensor_pieces(["features"], random_shape),
                             pb.DenoisingLossRequest))
        assert outcome(cogvideox.DenoisingLoss(iter(g), timeout=30)) != grpc.StatusCode.OK
        assert cogvideox.GetInfo(pb.GetInfoRequest(), timeout=10).model == "tiny-cogvideox"

    run()
