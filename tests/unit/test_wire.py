"""The tensor codec round-trips bit-exactly, chunked or not, and rejects malformed pieces."""

import pytest
import torch

from vidalign.errors import InvalidInput, ResourceExhausted
from vidalign.teacher import wire
from vidalign.teacher.v1 import teacher_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
SHAPES = [(), (0,), (3, 0, 2), (7,), (4, 5), (2, 3, 4, 5), (513, 1031)]


def make(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        # Include values that only survive a bit-exact codec: tiny, huge, -0.0, inf, nan.
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.reshape(-1)
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30])
        flat[: min(6, flat.numel())] = specials[: min(6, flat.numel())].to(dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g).to(dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return flat_a.view(torch.uint8).equal(flat_b.view(torch.uint8))


def assemble(batches):
    assembler = wire.TensorAssembler()
    for pieces in batches:
        assembler.add(pieces)
    return assembler.finish()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_unchunked_and_chunked(dtype, shape):
    t = make(dtype, shape)
    assert bit_equal(wire.decode(wire.encode("x", t)), t)
    # One-byte pieces split every element; keep them to small tensors (speed).
    chunks = (1, 7, 4096, wire.CHUNK_BYTES) if t.numel() < 100 else (4093, wire.CHUNK_BYTES)
    for chunk in chunks:
        out = assemble(wire.pack({"x": t}, chunk))["x"]
        assert bit_equal(out, t), (chunk, dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_tensors(dtype):
    base = make(dtype, (6, 8, 4))
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[::2, 1::3],
        "expanded": base[:1].expand(5, 8, 4),
    }
    for name, view in views.items():
        assert not view.is_contiguous()
        out = assemble(wire.pack({name: view}, 37))[name]
        assert bit_equal(out, view.contiguous()), name


def test_many_tensors_share_messages_and_respect_chunk_size():
    tensors = {f"t{i}": make(torch.float32, (i + 1, 300), seed=i) for i in range(5)}
    batches = list(wire.pack(tensors, 2000))
    assert all(sum(len(p.data) for p in pieces) <= 2000 for pieces in batches)
    assert len(batches) > 1
    out = assemble(batches)
    assert set(out) == set(tensors)
    assert all(bit_equal(out[k], v) for k, v in tensors.items())


def test_pack_of_nothing_yields_one_empty_batch():
    assert list(wire.pack({})) == [[]]


def test_byte_count_must_match_shape():
    short = pb.Tensor(name="f", dtype="float32", shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidInput, match=r"'f'.*received 20 bytes.*needs 24"):
        wire.decode(short)
    long = pb.Tensor(name="f", dtype="float32", shape=[2, 3], data=b"\0" * 28)
    with pytest.raises(InvalidInput, match=r"more than 24 bytes"):
        wire.decode(long)


def test_malformed_pieces_are_named():
    with pytest.raises(InvalidInput, match="unknown dtype 'complex64'"):
        wire.decode(pb.Tensor(name="f", dtype="complex64", shape=[1], data=b"\0" * 8))
    with pytest.raises(InvalidInput, match="no name"):
        wire.decode(pb.Tensor(dtype="float32", shape=[1], data=b"\0" * 4))
    assembler = wire.TensorAssembler()
    assembler.add([pb.Tensor(name="f", dtype="uint8", shape=[1], data=b"\1")])
    with pytest.raises(InvalidInput, match="sent twice"):
        assembler.add([pb.Tensor(name="f", dtype="uint8", shape=[1], data=b"\1")])


def test_byte_budget_is_checked_before_allocation():
    assembler = wire.TensorAssembler(max_bytes=1000)
    huge = pb.Tensor(name="f", dtype="float32", shape=[1 << 40], data=b"")
    with pytest.raises(ResourceExhausted, match="over this server's limit of 1000 bytes"):
        assembler.add([huge])


def test_unsupported_dtype_on_encode():
    with pytest.raises(InvalidInput, match="complex64"):
        wire.encode("c", torch.zeros(2, dtype=torch.complex64))
