"""The teacher's Prometheus metrics: a real server on loopback, real calls, a real
scrape of ``/metrics`` (``--metrics-port``; vidalign_teacher.metrics)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from vidalign.config import ConfigError
from vidalign.teacher import protocol
from vidalign.teacher.client import channel_options
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import file_digest
from vidalign_teacher.server import ServerConfig, TeacherServer

from ..support.s3server import free_port
from ..support.teacher_process import ROOT, TeacherProcess

MODEL = "tiny-animatediff"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of the metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(adapter_paths):
    srv = TeacherServer(
        ServerConfig(
            model=MODEL, host="127.0.0.1", port=0, adapters=[str(adapter_paths[MODEL])],
            device="cpu", workers=4, metrics_port=free_port(),
        )
    )
    srv.start()
    yield srv
    srv.stop(grace=0)


def request(info: pb.GetInfoResponse, adapter_id: str, **overrides) -> DenoisingLossRequest:
    d_v = info.adapters[0].feature_dim
    fields = dict(
        sample_ids=["a", "b"],
        features=torch.randn(2, 8, d_v),
        latents=torch.randn(2, info.latent_channels, 4, 8, 8),
        captions=["a red square", "a blue square"],
        adapter_id=adapter_id,
        seed=3,
        want_grad=True,
    )
    fields.update(overrides)
    return DenoisingLossRequest(**fields)


def test_calls_are_counted_by_rpc_and_status_and_timed(server, adapter_paths):
    port = server.metrics.port
    before = scrape(port)
    # While loading, then serving: the load time is known once SERVING.
    assert value(before, "vidalign_teacher_model_load_seconds") > 0
    adapter_id = file_digest(adapter_paths[MODEL])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options(64 << 20)) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        good = list(protocol.request_messages(request(info, adapter_id)))
        sent = sum(m.ByteSize() for m in good)
        result = protocol.parse_result(stub.DenoisingLoss(iter(good), timeout=60))
        assert result.losses.shape == (2, 1)
        bad = protocol.request_messages(request(info, adapter_id, features=torch.randn(2, 16)))
        with pytest.raises(grpc.RpcError) as err:
            protocol.parse_result(stub.DenoisingLoss(bad, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Health is not a teacher RPC: not counted.
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "vidalign_teacher_requests_total"
    assert delta(requests, rpc="GetInfo", code="OK") == 2
    assert delta(requests, rpc="DenoisingLoss", code="OK") == 1
    assert delta(requests, rpc="DenoisingLoss", code="INVALID_ARGUMENT") == 1
    counted = {dict(labels)["rpc"] for (name, labels) in after if name == requests}
    assert counted == {"GetInfo", "DenoisingLoss"}, counted  # no health, no reflection

    latency = "vidalign_teacher_request_duration_seconds"
    assert delta(f"{latency}_count", rpc="GetInfo") == 2
    assert delta(f"{latency}_count", rpc="DenoisingLoss") == 2
    assert delta(f"{latency}_bucket", rpc="DenoisingLoss", le="+Inf") == 2
    assert delta(f"{latency}_sum", rpc="DenoisingLoss") > 0
    assert value(after, f"{latency}_count", rpc="AttentionPriors") == 0  # present, at 0

    for rpc in ("GetInfo", "DenoisingLoss", "AttentionPriors"):
        assert ("vidalign_teacher_requests_in_flight", (("rpc", rpc),)) in after
        assert value(after, "vidalign_teacher_requests_in_flight", rpc=rpc) == 0
    # Both DenoisingLoss requests' messages arrived whole (the bad one is about as large).
    assert delta("vidalign_teacher_received_bytes_total", rpc="DenoisingLoss") > sent
    assert value(after, "vidalign_teacher_model_calls_admitted") == 0
    assert value(after, "vidalign_teacher_model_calls_queued") == 0
    assert value(after, "vidalign_teacher_request_bytes_held") == 0
    # CPU teacher: no GPU gauges.
    assert not any(name.startswith("vidalign_teacher_gpu_") for name, _ in after)


def test_metrics_are_off_by_default_and_the_port_is_checked():
    assert ServerConfig.__dataclass_fields__["metrics_port"].default == 0
    with pytest.raises(ConfigError, match=r"metrics_port must be within 0\.\.65535, got 70000"):
        ServerConfig(model=MODEL, metrics_port=70000)
    with pytest.raises(ConfigError, match=r"metrics_port \(50051\) must differ"):
        ServerConfig(model=MODEL, port=50051, metrics_port=50051)


def test_metrics_port_flag_is_range_checked():
    proc = subprocess.run(
        [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve", "--teacher-model", MODEL,
         "--metrics-port", "70000"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--metrics-port must be within 0..65535, got 70000" in proc.stderr


def test_teacher_serve_metrics_port_serves_metrics(adapter_paths, tmp_path):
    """The CLI wiring: `teacher serve --metrics-port N` in a process of its own."""
    port = free_port()
    teacher = TeacherProcess(tmp_path, adapter_paths[MODEL], args=["--metrics-port", str(port)])
    try:
        teacher.wait_serving()
        with grpc.insecure_channel(teacher.address) as ch:
            pb_grpc.TeacherServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=30)
        samples = scrape(port)
        assert value(samples, "vidalign_teacher_requests_total", rpc="GetInfo", code="OK") == 1
        assert value(samples, "vidalign_teacher_model_load_seconds") > 0
        assert teacher.events("teacher_metrics_listening")[0]["port"] == port
    finally:
        teacher.kill()


def test_gpu_memory_gauges_only_on_cuda(monkeypatch):
    from prometheus_client import generate_latest

    from vidalign_teacher.limits import Limits
    from vidalign_teacher.metrics import TeacherMetrics

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 << 30)
    limits = Limits(set(), max_concurrent_rpcs=1, max_queued=0, max_inflight_bytes=1,
                    stream_idle_timeout_s=1.0)
    text = generate_latest(TeacherMetrics("s", ["A"], limits, "cuda:0").registry).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["vidalign_teacher_gpu_memory_allocated_bytes"] == 3 << 30
    assert samples["vidalign_teacher_gpu_memory_max_allocated_bytes"] == 5 << 30
    text = generate_latest(TeacherMetrics("s", ["A"], limits, "cpu").registry).decode()
    assert "gpu_memory" not in text
    limits.stop()
