"""Teacher under many clients: throughput and latency with 1, 2, 4 and 8 concurrent
clients, dynamic batching off and on (``teacher serve --max-batch``).

For each teacher config, starts two ``vidalign teacher serve`` processes on
127.0.0.1 (CPU unless ``--device``): batching off (``--max-batch 1``) and on
(``--max-batch`` = the largest client count, ``--max-wait-ms``). For each
client count, against each server in turn (alternating which goes first), runs
that many closed-loop clients, each on its own
channel and thread, each sending one-sample DenoisingLoss requests (the
teacher's native frames and size, latents, caption + features, dL/dF_V: a
trainer rank's stage-2 call at batch 1) until the cell's requests are done.
Measured per cell: samples/s (all samples over the wall time from the first
send to the last answer), request latency p50/p90/p99 (nearest rank: with
fewer than 100 requests p99 is the maximum), and the mean samples per model
run (the server's ``vidalign_teacher_batch_samples`` metric). Writes JSON
(``--json``) and a markdown table (printed, and beside the JSON as .md).

    .venv/bin/python bench/teacher_load.py [--quick] [--teachers tiny-animatediff small-animatediff]
    .venv/bin/python bench/teacher_load.py --device cuda --teachers tiny-animatediff random-animatediff
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

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

STUDENT = "tiny-videollava"
CLIENTS = (1, 2, 4, 8)
DEFAULT_JSON = Path("runs/teacher_load.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, adapter: Path, root: Path, *, device: str, max_batch: int,
          max_wait_ms: float, metrics_port: int) -> tuple[subprocess.Popen, str]:
    name = f"{model}-batch{max_batch}"
    port_file, log = root / f"{name}.port", root / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve", "--teacher-model", model,
         "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--device", device,
         "--adapter", str(adapter), "--max-concurrent-rpcs", "16", "--stream-idle-timeout-s", "600",
         "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.DEVNULL, stderr=log.open("w"),
        env={**os.environ, "VIDALIGN_LOG_LEVEL": "warning"},
    )
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(log.read_text())
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text()}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != \
                health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise SystemExit(f"{model} did not become SERVING; see {log}")
            time.sleep(0.2)
    return proc, address


def batch_metrics(port: int) -> tuple[float, float]:
    """(model runs, samples) of the batcher so far, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("vidalign_teacher_batch_samples_count ") or \
                line.startswith("vidalign_teacher_batch_samples_sum "):
            name, number = line.split()
            values[name] = float(number)
    return values.get("vidalign_teacher_batch_samples_count", 0.0), \
        values.get("vidalign_teacher_batch_samples_sum", 0.0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def make_request(info: pb.GetInfoResponse, adapter_id: str, client: int, index: int,
                 side: int = 0) -> DenoisingLossRequest:
    """One sample's request; ``side``: the pixel side of the clip (0: the teacher's native one)."""
    g = torch.Generator().manual_seed(client * 100_003 + index)
    size = (side or info.height) // info.vae_scale_factor
    d_v = info.adapters[0].feature_dim
    return DenoisingLossRequest(
        sample_ids=[f"rank{client}-{index}"],
        features=torch.randn(1, 8, d_v, generator=g),
        latents=torch.randn(1, info.latent_channels, info.frames, size, size, generator=g),
        captions=["a red square moves to the right"],
        adapter_id=adapter_id,
        seed=index,
        want_grad=True,
    )


def cell(address: str, info: pb.GetInfoResponse, adapter_id: str, clients: int,
         per_client: int, side: int = 0) -> dict[str, Any]:
    """``clients`` closed-loop clients x ``per_client`` one-sample requests (``side``: as in
    :func:`make_request`)."""
    channels = [grpc.insecure_channel(address, options=channel_options()) for _ in range(clients)]
    stubs = [pb_grpc.TeacherServiceStub(c) for c in channels]
    requests = [[make_request(info, adapter_id, c, i, side) for i in range(per_client)] for c in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        go.wait()
        for request in requests[c]:
            t0 = time.perf_counter()
            try:
                result = protocol.parse_result(
                    stubs[c].DenoisingLoss(protocol.request_messages(request), timeout=600))
                assert torch.isfinite(result.losses).all()
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except (grpc.RpcError, AssertionError) as err:
                with lock:
                    errors.append(err.code().name if isinstance(err, grpc.RpcError) else "non-finite")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in channels:
        c.close()
    if errors:
        raise SystemExit(f"{clients} clients against {address}: errors {sorted(set(errors))}")
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "samples_per_s": len(latencies) / wall,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99),
    }


def bench_teacher(model: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    teacher = load_teacher(model)
    adapter = root / f"{model}.safetensors"
    adapter_id = Adapter.create(d_v=load_student(STUDENT).d_v, cond_dim=teacher.cond_dim,
                                teacher_family=teacher.family).save(adapter)
    del teacher
    servers = {}
    try:
        # Both servers up at once (an idle one costs no CPU), their cells interleaved:
        # on a machine shared with other jobs, load that drifts during the run then
        # falls on both alike rather than on whichever ran second.
        for max_batch in (1, max(args.clients)):
            metrics_port = free_port()
            proc, address = start(model, adapter, root, device=args.device, max_batch=max_batch,
                                  max_wait_ms=args.max_wait_ms, metrics_port=metrics_port)
            servers[max_batch] = (proc, address, metrics_port)
        with grpc.insecure_channel(servers[1][1], options=channel_options()) as channel:
            info = pb_grpc.TeacherServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
        for _, address, _ in servers.values():
            cell(address, info, adapter_id, 2, 1)  # warm-up: first calls, allocator, threads
        rows = []
        for n, clients in enumerate(args.clients):
            per_client = max(args.min_per_client, math.ceil(args.requests / clients))
            order = list(servers.items()) if n % 2 == 0 else list(servers.items())[::-1]
            for max_batch, (_, address, metrics_port) in order:
                runs0, samples0 = batch_metrics(metrics_port)
                row = cell(address, info, adapter_id, clients, per_client)
                runs1, samples1 = batch_metrics(metrics_port)
                row.update(teacher=model, batching="on" if max_batch > 1 else "off",
                           max_batch=max_batch,
                           samples_per_run=(samples1 - samples0) / (runs1 - runs0) if runs1 > runs0 else 1.0)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    return sorted(rows, key=lambda r: (r["batching"] == "on", r["clients"]))


def speedups(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """teacher -> {clients: samples/s with batching / without}."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["batching"] != "on":
            continue
        (off,) = [r for r in rows if r["teacher"] == row["teacher"] and r["batching"] == "off"
                  and r["clients"] == row["clients"]]
        out.setdefault(row["teacher"], {})[str(row["clients"])] = row["samples_per_s"] / off["samples_per_s"]
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| teacher | clients | batching | samples/s | p50 (s) | p90 (s) | p99 (s) | samples/run | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        up = report["speedup"].get(row["teacher"], {}).get(str(row["clients"]))
        speed = f"{up:.2f}x" if row["batching"] == "on" and up is not None else ""
        lines.append(
            f"| {row['teacher']} | {row['clients']} | {row['batching']} | {row['samples_per_s']:.2f} | "
            f"{row['p50_s']:.3f} | {row['p90_s']:.3f} | {row['p99_s']:.3f} | "
            f"{row['samples_per_run']:.1f} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", default=["tiny-animatediff", "small-animatediff"])
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    parser.add_argument("--requests", type=int, default=48,
                        help="requests per cell, split over its clients")
    parser.add_argument("--min-per-client", type=int, default=4, help="at least this many per client")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the batching server's --max-wait-ms")
    parser.add_argument("--quick", action="store_true", help="16 requests per cell (~3-5 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.min_per_client = 16, 2
    torch.set_num_threads(1)  # the clients; the server has its own process and threads

    start_s = time.perf_counter()
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="vidalign-teacher-load-"))
    rows = [row for model in args.teachers for row in bench_teacher(model, root, args)]
    report = {
        "rows": rows,
        "speedup": speedups(rows),
        "meta": {
            "device": args.device,
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "loadavg_before": load,
            "loadavg_after": os.getloadavg(),
            "requests_per_cell": args.requests,
            "max_wait_ms": args.max_wait_ms,
            "wall_s": time.perf_counter() - start_s,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.json.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwall {report['meta']['wall_s']:.0f} s; load average before {load[0]:.1f}, after "
          f"{report['meta']['loadavg_after'][0]:.1f} on {os.cpu_count()} CPUs; JSON: {args.json}")


if __name__ == "__main__":
    main()
