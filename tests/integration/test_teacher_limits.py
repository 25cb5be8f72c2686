"""The teacher under hostile clients: bounded calls, threads, bytes and time.

Real servers on loopback: one `vidalign teacher serve` subprocess (so that its
memory can be read from /proc) and one in-process server with small limits
(so that its counters can be read). Timing bounds appear only where they are
the function under test (health answers while model calls wait) and are wide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vidalign.config import ConfigError
from vidalign.store import materialize
from vidalign.teacher import protocol
from vidalign.teacher.client import channel_options
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import Adapter, file_digest

MODEL = "tiny-animatediff"
MIB = 1 << 20
GIB = 1 << 30


# --- helpers -------------------------------------------------------------------------


def good_request(info: pb.GetInfoResponse, adapter_id: str, seed: int = 0) -> DenoisingLossRequest:
    d_v = info.adapters[0].feature_dim
    return DenoisingLossRequest(
        sample_ids=["a"],
        features=torch.randn(1, 4, d_v),
        latents=torch.randn(1, info.latent_channels, 2, 8, 8),
        captions=["a red square"],
        adapter_id=adapter_id,
        seed=seed,
    )


def params() -> pb.DenoisingLossParams:
    return pb.DenoisingLossParams(sample_ids=["a"], num_draws=1)


def declared_piece(shape: tuple[int, ...], data_bytes: int) -> pb.Tensor:
    """The first piece of a float32 tensor ``features`` of ``shape``, carrying ``data_bytes``."""
    return pb.Tensor(name="features", dtype="float32", shape=list(shape), data=bytes(data_bytes))


class HeldStream:
    """A DenoisingLoss call that sends ``messages`` and then holds the stream open:
    silently, or with an empty message every ``keepalive`` seconds."""

    def __init__(self, stub, messages: list[pb.DenoisingLossRequest], keepalive: float | None = None,
                 timeout: float = 120) -> None:
        self.release = threading.Event()

        def requests() -> Iterator[pb.DenoisingLossRequest]:
            yield from messages
            while not self.release.wait(keepalive):
                yield pb.DenoisingLossRequest()

        self.call = stub.DenoisingLoss(requests(), timeout=timeout)

    def close(self) -> None:
        self.release.set()
        self.call.cancel()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def vidalign(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidalign_cli.main", *args],
                          capture_output=True, text=True, timeout=timeout)


# --- a `teacher serve` subprocess ----------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_paths):
    """(address, pid, adapter id) of a `vidalign teacher serve` subprocess with 16 call
    slots and 32 queue places, 4 spare threads, and a long idle timeout."""
    root = tmp_path_factory.mktemp("served")
    port_file = root / "port"
    log = (root / "log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve", "--teacher-model", MODEL,
         "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--device", "cpu",
         "--adapter", str(adapter_paths[MODEL]), "--workers", "4", "--max-concurrent-rpcs", "16",
         "--max-queued", "32", "--stream-idle-timeout-s", "120"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VIDALIGN_LOG_LEVEL": "warning"},
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, (root / "log").read_text()
            assert time.monotonic() < deadline, "the teacher did not open its port"
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "the teacher did not become SERVING"
                time.sleep(0.2)
        yield address, proc.pid, file_digest(adapter_paths[MODEL])
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def served_channel(served):
    channel = grpc.insecure_channel(served[0], options=channel_options(64 * MIB))
    yield channel
    channel.close()


@pytest.mark.slow
def test_health_and_info_answer_while_streams_idle_and_requests_queue(served, served_channel):
    """8 streams that send one message and wait, then 32 real requests: health and GetInfo
    answer in under 1 s throughout, and every real request succeeds.

    Why 1 s holds: admitted and queued model calls can hold at most 16 + 32 of the
    pool's 52 threads, so health and GetInfo always find one of the 4 left; what
    remains is the GIL shared with one computing thread (switch interval 5 ms) and
    a loaded 2-core machine. A Check costs about a millisecond of Python.
    """
    address, _, adapter_id = served
    stub = pb_grpc.TeacherServiceStub(served_channel)
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    idle = [HeldStream(stub, [pb.DenoisingLossRequest(params=params())]) for _ in range(8)]
    probe_channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(probe_channel)
    probe_stub = pb_grpc.TeacherServiceStub(probe_channel)
    try:
        def real(i: int) -> grpc.StatusCode:
            messages = protocol.request_messages(good_request(info, adapter_id, seed=i))
            try:
                protocol.parse_result(stub.DenoisingLoss(messages, timeout=120))
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

        with ThreadPoolExecutor(32) as pool:
            results = [pool.submit(real, i) for i in range(32)]
            latencies = []
            while not all(r.done() for r in results) or len(latencies) < 10:
                latencies.append(timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)))
                latencies.append(timed(lambda: probe_stub.GetInfo(pb.GetInfoRequest(), timeout=5)))
                time.sleep(0.05)
            codes = [r.result() for r in results]
        print(f"health/GetInfo: {len(latencies)} calls, max {max(latencies):.3f} s")
        assert codes == [grpc.StatusCode.OK] * 32
        assert max(latencies) < 1.0, sorted(latencies)[-5:]
        # The idle streams were never cancelled (their timeout is 120 s): they still hold slots.
        assert all(s.call.running() for s in idle)
    finally:
        for s in idle:
            s.close()
        probe_channel.close()


@pytest.mark.slow
def test_streams_declaring_1_gib_each_cost_what_they_send(served, served_channel):
    """32 streams each declare a 1 GiB tensor, send 1 MiB of it and wait.

    Before, each admitted stream allocated its declared gigabyte at once. Now 16
    are admitted and read one 1 MiB piece each, 16 wait in the queue without
    reading: the server holds about 16 MiB of data, plus per-stream gRPC buffers
    (at most one message of the channel's flow-control window, ~1-4 MiB) and
    protobuf copies of the piece being appended. 32 x 4 MiB = 128 MiB is an
    upper bound on all of it; the bound below is twice that, for allocator slack
    and thread stacks: 256 MiB, against 16 GiB had the declared sizes been honoured.
    """
    _address, pid, adapter_id = served
    stub = pb_grpc.TeacherServiceStub(served_channel)
    shape = (1, 1024, 262144)  # float32: exactly 1 GiB, the default per-request limit
    before = rss_mib(pid)
    streams = [
        HeldStream(stub, [pb.DenoisingLossRequest(params=params(), tensors=[declared_piece(shape, MIB)])])
        for _ in range(32)
    ]
    try:
        time.sleep(3)  # every admitted stream has read its first message
        peak = rss_mib(pid)
        assert all(s.call.running() for s in streams)  # held, not refused
        print(f"server RSS {before:.0f} -> {peak:.0f} MiB")
        assert peak - before < 256, (before, peak)
    finally:
        for s in streams:
            s.close()
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    result = protocol.parse_result(
        stub.DenoisingLoss(protocol.request_messages(good_request(info, adapter_id)), timeout=60)
    )
    assert result.losses.shape == (1, 1)


def test_a_second_server_on_a_used_port_fails_clearly(served):
    port = served[0].rsplit(":", 1)[1]
    proc = vidalign("teacher", "serve", "--teacher-model", MODEL, "--host", "127.0.0.1",
                    "--port", port, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vidalign: error: cannot listen on 127.0.0.1:") and "in use" in last, last


# --- an in-process server with small limits -----------------------------------------


@pytest.fixture(scope="module")
def small(adapter_paths):
    """Two call slots, one queue place, 8 MiB in flight, a 1.5 s idle timeout."""
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(
        model=MODEL, host="127.0.0.1", port=0, device="cpu", adapters=[str(adapter_paths[MODEL])],
        workers=2, max_concurrent_rpcs=2, max_queued=1, max_request_bytes=8 * MIB,
        max_inflight_bytes=8 * MIB, stream_idle_timeout_s=1.5,
    ))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options(64 * MIB))
    yield server, pb_grpc.TeacherServiceStub(channel), file_digest(adapter_paths[MODEL])
    channel.close()
    server.stop(grace=0)


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def assert_serves(stub, adapter_id) -> None:
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    messages = protocol.request_messages(good_request(info, adapter_id))
    assert protocol.parse_result(stub.DenoisingLoss(messages, timeout=60)).losses.shape == (1, 1)


def assert_watchdog_cancels_and_frees(small, keepalive: float | None, message: str) -> None:
    """A stream holding 2 MiB of a request (silent, or with an empty message every
    ``keepalive`` s) ends in DEADLINE_EXCEEDED with ``message``; its bytes and slot are
    given back and the server still answers."""
    server, stub, adapter_id = small
    held = HeldStream(stub, [pb.DenoisingLossRequest(
        params=params(), tensors=[declared_piece((1, 2, MIB // 4), 2 * MIB)])], keepalive=keepalive)
    try:
        wait_until(lambda: server.limits.budget.used == 2 * MIB)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(held.call)
        waited = time.monotonic() - start
    finally:
        held.close()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert message in err.value.details()
    assert waited < 30  # a 1.5-2 s bound plus the watchdog's tick; only a hang takes longer
    wait_until(lambda: server.limits.budget.used == 0 and server.limits.admission.active == 0)
    assert_serves(stub, adapter_id)


def test_an_idle_stream_is_cancelled_and_its_memory_freed(small):
    assert_watchdog_cancels_and_frees(small, None, "no request message for 1.5 s (stream_idle_timeout_s)")


def test_a_slow_sender_is_cancelled_at_the_read_timeout_and_freed(small):
    watchdog = small[0].limits.watchdog
    # This server's read bound, lowered for this test only (the idle bound is 1.5 s): the
    # stream is never idle (a message every 0.3 s) but never finishes either.
    watchdog.read_timeout = 2.0
    try:
        assert_watchdog_cancels_and_frees(
            small, 0.3, "still arriving after 2 s (request_read_timeout_s)")
    finally:
        watchdog.read_timeout = 0.0


def test_health_watch_streams_hold_no_thread(small):
    """More Watch streams than the server has threads (2 workers + 3 model slots), on the
    main port and on a separate health port (2 threads): Check still answers on both.

    Eight, not more: gRPC counts a call as in progress until its handler returns, and the
    main port admits 11 at once (``grpc_call_cap(2, 1, 2)``). A Watch handler returns at
    once, but on a loaded machine eight may not have yet, and eight plus the Check stay
    within 11 however the handlers overlap; twelve could be refused by gRPC's own cap."""
    from vidalign_teacher.limits import grpc_call_cap, pool_threads

    watchers = 8
    assert pool_threads(2, 1, 2) < watchers and watchers + 1 <= grpc_call_cap(2, 1, 2)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from vidalign_teacher.security import HealthPort

    server = small[0]
    port = HealthPort(health.HealthServicer(), "127.0.0.1", 0)
    port.start()
    try:
        for address in (f"127.0.0.1:{server.port}", f"127.0.0.1:{port.port}"):
            with grpc.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
                           for _ in range(watchers)]
                try:
                    for watch in watches:  # each has its first answer: all are open
                        next(watch)
                    # A starved Check would wait for a thread until its deadline.
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert reply.status in (health_pb2.HealthCheckResponse.SERVING,
                                            health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                finally:
                    for watch in watches:
                        watch.cancel()
    finally:
        port.stop(0)


def test_beyond_the_queue_a_call_is_refused_at_once(small):
    server, stub, adapter_id = small
    # Three live streams (they send an empty message every 0.2 s): two admitted, one queued.
    held = [HeldStream(stub, [pb.DenoisingLossRequest(params=params())], keepalive=0.2) for _ in range(3)]
    try:
        wait_until(lambda: server.limits.admission.active == 2 and server.limits.admission.waiting == 1)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DenoisingLoss(protocol.request_messages(good_request(info, adapter_id)), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs=2" in err.value.details() and "max_queued=1" in err.value.details()
    finally:
        for s in held:
            s.close()
    wait_until(lambda: server.limits.admission.active == 0 and server.limits.admission.waiting == 0)
    assert_serves(stub, adapter_id)


def test_bytes_in_flight_are_bounded_across_calls_and_given_back(small):
    server, stub, adapter_id = small
    shape = (1, 2, MIB)  # float32: 8 MiB declared, within the per-request limit
    first = HeldStream(stub, [pb.DenoisingLossRequest(params=params(), tensors=[declared_piece(shape, 5 * MIB)])],
                       keepalive=0.2)
    try:
        wait_until(lambda: server.limits.budget.used == 5 * MIB)
        second = [pb.DenoisingLossRequest(params=params(), tensors=[declared_piece(shape, 4 * MIB)])]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DenoisingLoss(iter(second), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_bytes" in err.value.details() and str(8 * MIB) in err.value.details()
    finally:
        first.close()  # a cancelled call gives its bytes back
    wait_until(lambda: server.limits.budget.used == 0 and server.limits.admission.active == 0)
    assert_serves(stub, adapter_id)


def test_bind_failure_in_process_is_a_config_error(small):
    from vidalign_teacher.limits import PortUnavailable
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = small[0]
    with pytest.raises(PortUnavailable, match=f"cannot listen on 127.0.0.1:{server.port}: the port is in use"):
        TeacherServer(ServerConfig(model=MODEL, host="127.0.0.1", port=server.port, device="cpu"))


# --- input checks ---------------------------------------------------------------------

FLAGS = [
    (["--port", "99999"], "--port must be within 0..65535, got 99999"),
    (["--port", "-1"], "--port must be within 0..65535, got -1"),
    (["--workers", "0"], "--workers must be within 1..1024, got 0"),
    (["--max-request-mb", "-1"], "--max-request-mb must be greater than 0, got -1"),
    (["--max-request-mb", "0"], "--max-request-mb must be greater than 0, got 0"),
    (["--max-message-mb", "1"], "--max-message-mb must be within 2..2047, got 1"),
    (["--max-message-mb", "4096"], "--max-message-mb must be within 2..2047, got 4096"),
    (["--max-inflight-mb", "512"], "--max-inflight-mb (512) must be at least --max-request-mb (1024)"),
    (["--max-concurrent-rpcs", "0"], "--max-concurrent-rpcs must be within 1..1024, got 0"),
    (["--max-queued", "-1"], "--max-queued must be within 0..4096, got -1"),
    (["--stream-idle-timeout-s", "0"], "--stream-idle-timeout-s must be greater than 0, got 0"),
    (["--stream-idle-timeout-s", "nan"], "--stream-idle-timeout-s must be greater than 0, got nan"),
    (["--request-read-timeout-s", "0"], "--request-read-timeout-s must be greater than 0, got 0"),
    (["--request-read-timeout-s", "nan"], "--request-read-timeout-s must be greater than 0, got nan"),
    (["--max-batch", "0"], "--max-batch must be within 1..4096, got 0"),
    (["--max-batch", "5000"], "--max-batch must be within 1..4096, got 5000"),
    (["--max-wait-ms", "-1"], "--max-wait-ms must be within 0..10000, got -1"),
    (["--max-wait-ms", "60000"], "--max-wait-ms must be within 0..10000, got 60000"),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be within 0..10000, got nan"),
    # -1: no health port, 0: a free one; gRPC would bind 99999 modulo 65536, take -2 as none.
    (["--health-port", "99999"], "--health-port must be within -1..65535, got 99999"),
    (["--health-port", "65536"], "--health-port must be within -1..65535, got 65536"),
    (["--health-port", "-2"], "--health-port must be within -1..65535, got -2"),
]


@pytest.mark.parametrize("flags,message", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_serve_flags_out_of_range_are_one_line_and_status_2(flags, message, capsys):
    from vidalign_cli.main import main

    code = main(["teacher", "serve", "--teacher-model", MODEL, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"vidalign: error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("value", ["-1", "0", "1", "65535"])
def test_serve_health_port_accepts_none_free_and_every_port(value):
    from vidalign_cli.main import build_parser
    from vidalign_teacher.limit_args import limit_settings

    args = build_parser().parse_args(
        ["teacher", "serve", "--teacher-model", MODEL, "--health-port", value]
    )
    limit_settings(args)  # the range check passes: no SystemExit
    assert args.health_port == int(value)


CONFIGS = [
    (dict(latent_cache_bytes=-1), "latent_cache_bytes must be at least 0, got -1"),
    (dict(max_request_bytes=0), "max_request_bytes must be at least 1, got 0"),
    (dict(max_message_bytes=1 << 31), "max_message_bytes must be within 2097152..2147483647"),
    (dict(max_queued=-1), "max_queued must be within 0..4096, got -1"),
    (dict(stream_idle_timeout_s=-1.0), "stream_idle_timeout_s must be greater than 0, got -1"),
    (dict(request_read_timeout_s=-5.0), "request_read_timeout_s must be greater than 0, got -5"),
    (dict(port=70000), "port must be within 0..65535, got 70000"),
    (dict(max_batch=0), "max_batch must be within 1..4096, got 0"),
    (dict(max_wait_ms=float("nan")), "max_wait_ms must be within 0..10000, got nan"),
]


@pytest.mark.parametrize("overrides,message", CONFIGS, ids=[next(iter(c)) for c, _ in CONFIGS])
def test_server_config_values_out_of_range(overrides, message):
    from vidalign_teacher.server import ServerConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(model=MODEL, **overrides)


def test_adapter_init_writes_store_uris_through_the_store(tmp_path, capsys):
    from vidalign_cli.main import main

    uri = f"file://{tmp_path}/store/adapters/a.safetensors"
    assert main(["adapter", "init", "--teacher-model", MODEL, "--out", uri]) == 0
    digest = capsys.readouterr().out.strip()
    assert not Path("file:").exists()
    # What `teacher serve --adapter URI` loads: the same bytes, hence the same id.
    loaded = materialize(uri)
    assert file_digest(loaded) == digest and Adapter.load(loaded).digest == digest

    assert main(["adapter", "init", "--teacher-model", MODEL, "--out", "ftp://host/a.safetensors"]) == 2
    assert "--out ftp://host/a.safetensors: unsupported scheme" in capsys.readouterr().err
