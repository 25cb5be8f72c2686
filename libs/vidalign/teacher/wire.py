"""Tensors on the wire: name + dtype + shape + raw little-endian bytes.

This is the Open Inference Protocol convention: a receiver never unpickles
anything, it checks that the bytes add up to ``prod(shape) * itemsize`` and
views them as the declared dtype. Tensors larger than one gRPC message travel
as pieces of about ``CHUNK_BYTES`` (measured on loopback: 1 MiB pieces move
16-64 MB tensors several times faster than one unary message, see
BENCHMARKS.md). The first piece of a tensor carries its dtype and shape; later
pieces with the same name append bytes.

``pack`` turns named tensors into a stream of piece lists, one list per
message; ``TensorAssembler`` turns pieces back into tensors. It checks the
declared sizes against a byte budget, but allocates only as bytes arrive: a
message that declares a 1 GiB tensor and sends 1 MiB of it costs 1 MiB.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping

import torch

from vidalign.errors import InvalidInput, ResourceExhausted
from vidalign.teacher.v1 import teacher_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("vidalign's tensor codec assumes a little-endian host")

CHUNK_BYTES = 1 << 20
"""Payload bytes per message when a tensor is streamed."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

MAX_DIMS = 8
"""Most dimensions a received tensor may declare (requests use at most 5)."""
MAX_ELEMENTS = 1 << 48
"""Most elements a received tensor may span, counting zero dimensions as 1 (torch
sizes and strides are int64; byte limits refuse far smaller tensors anyway)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; InvalidInput for one the codec lacks."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidInput(
            f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}"
        ) from None


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes of a dense tensor of this dtype and shape."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as one flat little-endian byte buffer (one copy at most)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # A uint8 view shares memory; numpy then exposes it without another copy.
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(name: str, tensor: torch.Tensor) -> pb.Tensor:
    """One tensor as a single message (no chunking)."""
    return pb.Tensor(
        name=name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        data=bytes(_raw_bytes(tensor)),
    )


def decode(message: pb.Tensor) -> torch.Tensor:
    """One complete tensor message back to a tensor."""
    assembler = TensorAssembler()
    assembler.add([message])
    return assembler.finish()[message.name]


def pack(
    tensors: Mapping[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[list[pb.Tensor]]:
    """Split named tensors into lists of pieces, each list at most ``chunk_bytes`` of data.

    Small tensors share a message; a large one spans several. Always yields at
    least one list (possibly empty), so a caller can attach parameters to it.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    batch: list[pb.Tensor] = []
    room = chunk_bytes
    for name, tensor in tensors.items():
        raw = _raw_bytes(tensor)
        first = True
        offset = 0
        while first or offset < len(raw):
            if room == 0:
                yield batch
                batch, room = [], chunk_bytes
            take = min(room, len(raw) - offset)
            piece = pb.Tensor(name=name, data=bytes(raw[offset : offset + take]))
            if first:
                piece.dtype = dtype_name(tensor.dtype)
                piece.shape.extend(tensor.shape)
                first = False
            batch.append(piece)
            offset += take
            room -= take
    yield batch


class TensorAssembler:
    """Collects tensor pieces from a stream and checks them.

    ``max_bytes`` bounds the sum of the declared sizes of all tensors; it is
    checked on each tensor's first piece, so an oversized request is refused
    before its data is read. Buffers grow as pieces arrive, never to the
    declared size up front: what a request costs is what it has sent.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._buffers: dict[str, bytearray] = {}
        self._sizes: dict[str, int] = {}
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def add(self, pieces: Iterable[pb.Tensor]) -> None:
        for piece in pieces:
            if not piece.name:
                raise InvalidInput("a tensor piece has no name")
            if piece.name not in self._buffers:
                self._start(piece)
            elif piece.dtype:
                # Only a tensor's first piece declares dtype and shape.
                raise InvalidInput(f"tensor '{piece.name}' was sent twice")
            else:
                self._append(piece)

    def _start(self, piece: pb.Tensor) -> None:
        name = piece.name
        if piece.dtype not in DTYPES:
            raise InvalidInput(
                f"tensor '{name}': unknown dtype '{piece.dtype}'; supported: {', '.join(DTYPES)}"
            )
        shape = tuple(int(d) for d in piece.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"tensor '{name}': negative dimension in shape {shape}")
        if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
            raise InvalidInput(
                f"tensor '{name}': shape {list(shape)} has more than {MAX_DIMS} dimensions "
                f"or spans more than 2^48 elements"
            )
        dtype = DTYPES[piece.dtype]
        size = nbytes(dtype, shape)
        self.total_bytes += size
        if self.max_bytes is not None and self.total_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"tensor '{name}' {piece.dtype}{list(shape)} brings the request to "
                f"{self.total_bytes} bytes, over this server's limit of {self.max_bytes} bytes; "
                "send a smaller batch or fewer frames"
            )
        self._specs[name] = (dtype, shape)
        self._sizes[name] = size
        self._buffers[name] = bytearray()
        self._append(piece)

    def _append(self, piece: pb.Tensor) -> None:
        name = piece.name
        buffer, size = self._buffers[name], self._sizes[name]
        if len(buffer) + len(piece.data) > size:
            dtype, shape = self._specs[name]
            raise InvalidInput(
                f"tensor '{name}': received more than {size} bytes, the size of "
                f"{_NAMES[dtype]} with shape {list(shape)}"
            )
        buffer += piece.data

    def finish(self) -> dict[str, torch.Tensor]:
        """The assembled tensors; InvalidInput if any is short of its declared size."""
        out: dict[str, torch.Tensor] = {}
        for name, buffer in self._buffers.items():
            dtype, shape = self._specs[name]
            size = self._sizes[name]
            if len(buffer) != size:
                raise InvalidInput(
                    f"tensor '{name}': received {len(buffer)} bytes, but "
                    f"{_NAMES[dtype]} with shape {list(shape)} needs {size}"
                )
            if size == 0:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                out[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
        return out
