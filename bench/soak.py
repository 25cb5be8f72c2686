"""Soak: N concurrent clients x M requests against a real `vidalign teacher serve`.

Starts the teacher (tiny-animatediff, CPU) as a subprocess on 127.0.0.1, opens
``--idle`` streams that send one message and then wait (they hold call slots for
the whole run), and runs ``--clients`` threads that each send ``--requests``
DenoisingLoss requests. Meanwhile a prober calls the gRPC health check every
50 ms. Printed: requests and errors (must be 0), request and health-check
latency percentiles, the server's RSS after start-up and at the end. Loopback
only; bounded by ``--max-seconds``.

    .venv/bin/python bench/soak.py [--clients 8] [--requests 25] [--idle 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vidalign.students import load_student
from vidalign.teacher import protocol
from vidalign.teacher.client import channel_options
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda import Adapter, load_teacher

MODEL = "tiny-animatediff"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start(root: Path, adapter: Path, slots: int) -> tuple[subprocess.Popen, str]:
    port_file = root / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve", "--teacher-model", MODEL,
         "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--device", "cpu",
         "--adapter", str(adapter), "--max-concurrent-rpcs", str(slots),
         "--stream-idle-timeout-s", "3600"],
        stdout=subprocess.DEVNULL, stderr=(root / "log").open("w"),
        env={**os.environ, "VIDALIGN_LOG_LEVEL": "warning"},
    )
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((root / "log").read_text())
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text()}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != \
                health_pb2.HealthCheckResponse.SERVING:
            time.sleep(0.2)
    return proc, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--idle", type=int, default=8, help="streams that send one message and wait")
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="vidalign-soak-"))
    teacher = load_teacher(MODEL)
    adapter = root / "adapter.safetensors"
    adapter_id = Adapter.create(d_v=load_student("tiny-videollava").d_v, cond_dim=teacher.cond_dim,
                                teacher_family=teacher.family).save(adapter)
    del teacher
    proc, address = start(root, adapter, slots=args.clients + args.idle)
    channel = grpc.insecure_channel(address, options=channel_options())
    stub = pb_grpc.TeacherServiceStub(channel)
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)

    def request(seed: int) -> list[pb.DenoisingLossRequest]:
        d_v = info.adapters[0].feature_dim
        return list(protocol.request_messages(DenoisingLossRequest(
            sample_ids=["a", "b"], features=torch.randn(2, 8, d_v),
            latents=torch.randn(2, info.latent_channels, 4, 8, 8), captions=["a", "b"],
            adapter_id=adapter_id, seed=seed, want_grad=True,
        )))

    protocol.parse_result(stub.DenoisingLoss(iter(request(0)), timeout=60))  # warm-up
    rss_before = rss_mib(proc.pid)

    release = threading.Event()

    def hold():
        yield pb.DenoisingLossRequest(params=pb.DenoisingLossParams(sample_ids=["x"]))
        release.wait()

    idle = [stub.DenoisingLoss(hold(), timeout=args.max_seconds + 60) for _ in range(args.idle)]

    stop_probe = threading.Event()
    health_lat: list[float] = []
    health_errors: list[str] = []

    def probe():
        with grpc.insecure_channel(address) as probe_channel:
            health = health_pb2_grpc.HealthStub(probe_channel)
            while not stop_probe.wait(0.05):
                t0 = time.perf_counter()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    health_lat.append(time.perf_counter() - t0)
                except grpc.RpcError as err:
                    health_errors.append(err.code().name)

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.max_seconds

    def client(index: int):
        for i in range(args.requests):
            if time.monotonic() > deadline:
                return
            messages = request(index * 1000 + i)
            t0 = time.perf_counter()
            try:
                result = protocol.parse_result(stub.DenoisingLoss(iter(messages), timeout=120))
                assert torch.isfinite(result.losses).all()
                latencies.append(time.perf_counter() - t0)
            except (grpc.RpcError, AssertionError) as err:
                errors.append(err.code().name if isinstance(err, grpc.RpcError) else "non-finite loss")

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop_probe.set()
    prober.join()
    idle_alive = sum(call.running() for call in idle)
    release.set()
    for call in idle:
        call.cancel()
    time.sleep(1)
    rss_after = rss_mib(proc.pid)
    channel.close()
    proc.terminate()
    proc.wait(30)

    print(f"clients={args.clients} requests/client={args.requests} idle streams={args.idle} "
          f"(still open at the end: {idle_alive})")
    print(f"requests: {len(latencies) + len(errors)} in {wall:.1f} s, errors: {len(errors)} {sorted(set(errors))}")
    print(f"request latency s: p50 {statistics.median(latencies):.3f}  p99 {pct(latencies, 0.99):.3f}")
    print(f"health checks: {len(health_lat)}, errors: {len(health_errors)}, latency ms: "
          f"p50 {1e3 * statistics.median(health_lat):.1f}  p99 {1e3 * pct(health_lat, 0.99):.1f}  "
          f"max {1e3 * max(health_lat):.1f}")
    print(f"server RSS MiB: {rss_before:.0f} after start-up, {rss_after:.0f} at the end")
    if errors or health_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
