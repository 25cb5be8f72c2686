"""Wire throughput on loopback: one tensor as one unary message vs streamed in 1 MiB pieces.

A bench-only gRPC service (generic handlers, the real codec and message types)
receives a float32 tensor of 1, 16 or 64 MB, assembles and checks it, and
answers with its byte count. Printed: median seconds and MB/s over repeats.

    .venv/bin/python bench/wire.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent import futures

import grpc
import torch

from vidalign.teacher import wire
from vidalign.teacher.v1 import teacher_pb2 as pb

LIMIT = 256 << 20
OPTIONS = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]
SERVICE = "vidalign.bench.Echo"


def _received(tensors: dict[str, torch.Tensor]) -> pb.Tensor:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return pb.Tensor(name="ack", dtype="int64", shape=[], data=total.to_bytes(8, "little"))


def unary(request: pb.Tensor, context) -> pb.Tensor:
    return _received({"x": wire.decode(request)})


def stream(requests, context) -> pb.Tensor:
    assembler = wire.TensorAssembler()
    for request in requests:
        assembler.add(request.tensors)
    return _received(assembler.finish())


def start_server() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=OPTIONS)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, pb.Tensor.FromString, pb.Tensor.SerializeToString
        ),
        "Stream": grpc.stream_unary_rpc_method_handler(
            stream, pb.DenoisingLossResponse.FromString, pb.Tensor.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()

    server, port = start_server()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    call_unary = channel.unary_unary(
        f"/{SERVICE}/Unary", pb.Tensor.SerializeToString, pb.Tensor.FromString
    )
    call_stream = channel.stream_unary(
        f"/{SERVICE}/Stream", pb.DenoisingLossResponse.SerializeToString, pb.Tensor.FromString
    )
    print(f"wire throughput on loopback, float32 tensors, median of {args.repeats} (after 1 warm-up)")
    print(f"{'size':>7} {'unary s':>9} {'unary MB/s':>11} {'stream s':>9} {'stream MB/s':>12} {'stream/unary':>13}")
    for mb in args.sizes_mb:
        tensor = torch.randn(mb * (1 << 20) // 4)
        nbytes = tensor.numel() * 4

        def send_unary(t=tensor):
            return call_unary(wire.encode("x", t), timeout=120)

        def send_stream(t=tensor):
            messages = (pb.DenoisingLossResponse(tensors=p) for p in wire.pack({"x": t}))
            return call_stream(messages, timeout=120)

        timings = {}
        for name, send in (("unary", send_unary), ("stream", send_stream)):
            ack = send()
            assert int.from_bytes(ack.data, "little") == nbytes
            runs = []
            for _ in range(args.repeats):
                tic = time.perf_counter()
                send()
                runs.append(time.perf_counter() - tic)
            timings[name] = statistics.median(runs)
        mbps = {k: nbytes / 1e6 / v for k, v in timings.items()}
        print(
            f"{mb:>5}MB {timings['unary']:>9.4f} {mbps['unary']:>11.0f} {timings['stream']:>9.4f} "
            f"{mbps['stream']:>12.0f} {mbps['stream'] / mbps['unary']:>12.2f}x"
        )
    channel.close()
    server.stop(0)


if __name__ == "__main__":
    main()
