"""Dynamic batching in the teacher (``--max-batch``, ``--max-wait-ms``;
vidalign_teacher.batching): concurrent calls share model runs and each gets the
answer it would get alone; a bad or abandoned call fails alone; the limits hold.

Real gRPC servers on loopback with the tiny presets: in-process batching servers
(so that their batch records and metrics can be read) against the session's
unbatched teacher (tests/conftest.py) as the reference. Plus the Batcher alone,
with a fake model, for the queueing rules.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from vidalign.errors import InvalidInput
from vidalign.teacher import protocol
from vidalign.teacher.client import channel_options
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2 as pb
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import file_digest
from vidalign.vda.loss import DenoisingLossResult
from vidalign_teacher.batching import Batcher
from vidalign_teacher.server import ServerConfig, TeacherServer

from ..support.numerics import FP32_U, assert_fp32_close, max_abs_diff
from ..support.s3server import free_port
from .test_teacher_metrics import scrape, value

MODEL = "tiny-animatediff"
MIB = 1 << 20
CLIENTS = 8

# --- how close a batched answer is to the unbatched one ------------------------------
#
# Measured (this 2-core AVX-512 CPU, MKL sgemm, tiny-animatediff + LoRA, 8 clients x 1
# sample, K = 2 draws, text + features): losses differ by at most 2.4e-7 (2 ulps of a
# loss of ~1.2), dL/dF_V by 2.8e-11 against max|grad| 4.9e-5 (5.7e-7 of it); the
# timesteps are identical. Not bitwise: the same samples go through the same ops
# with the same seeds, noise and timesteps (vidalign.vda.loss: they come from (seed,
# sample id, draw) only), but a GEMM sums its K products in an order that depends
# on its row count M = samples x tokens. Checked leaf module by leaf module (same
# input, batch 8 vs 8 x batch 1): the convolutions and group norms give the same
# bits, and so do the CLIP text encoder and the per-sample loss mean; of the UNet's
# leaf modules only nn.Linear layers differ (time embedding, feed-forward; W_proj
# and the LoRA are GEMMs too).
#
# The bound, in the units of tests/support/numerics.py (terms x u x magnitude): the
# rounding of the batch-dependent GEMMs only. Each Linear's output moves by the
# rounding of its K-term dot products; the layers on the deepest path add theirs.
# An upper bound on the path's length is the sum of K over all the UNet's Linear
# layers: 8,480 for tiny-animatediff (134 layers, K = 32..256), x2 with its LoRA's
# (rank 4: K = 32..256, then 4) and W_proj (d_v) -- ~1.7e4 forward. These
# roundings have random signs, so their sum grows as sqrt(n) (as for the
# losses in numerics.py): 10 sigma of u x sqrt(1.7e4) = u x 1.3e3. The loss is a
# mean of C x F x h x w = 4 x 4 x 8 x 8 = 1,024 squared residuals, which averages
# the per-element shifts further down and adds none of its own (the mean is
# batch-invariant). Backward doubles the path for dL/dF_V: u x 1.8e3.
BATCHED_LOSS_TERMS = 1_300
"""1.3e3 x u = 7.7e-5 of max|loss|; a wrong draw, seed or sample moves a loss by ~1e-2
(the tiny teacher's losses are 1.1 +- 0.03; checked below)."""
BATCHED_GRAD_TERMS = 1_800
"""1.8e3 x u = 1.1e-4 of max|grad|; a gradient defect (a sample's rows swapped, a 1/K
factor) moves it by a good fraction of itself."""
# The issue's requirement is absolute: |batched - sequential| <= 1e-6. For the
# losses (~1.2) that is 8 ulps, ~90x tighter than the bound above: it holds because the
# differences are a few roundings that do not add up (measured: 2 ulps), not by
# the worst case. For dL/dF_V (max ~6e-5) the relative bound above is the tighter.
ISSUE_ATOL = 1e-6
assert ISSUE_ATOL / FP32_U > 16  # 1e-6 is 16.8 u: at least 8 ulps of a value in [1, 2)


# --- helpers -------------------------------------------------------------------------


def request(info: pb.GetInfoResponse, adapter_id: str, index: int, *, batch: int = 1,
            draws: int = 2, **overrides) -> DenoisingLossRequest:
    """Client ``index``'s request: its own samples, data and seed; the shapes all share."""
    g = torch.Generator().manual_seed(100 + index)
    d_v = info.adapters[0].feature_dim
    fields = dict(
        sample_ids=[f"client{index}-{b}" for b in range(batch)],
        features=torch.randn(batch, 8, d_v, generator=g),
        latents=torch.randn(batch, info.latent_channels, 4, 8, 8, generator=g),
        captions=[f"clip {index}.{b}: a square moves right" for b in range(batch)],
        adapter_id=adapter_id,
        seed=1000 + index,  # different seeds: each sample keeps its own in the batch
        num_draws=draws,
        want_grad=True,
    )
    fields.update(overrides)
    return DenoisingLossRequest(**fields)


def call(stub, req: DenoisingLossRequest, timeout: float = 120) -> DenoisingLossResult:
    return protocol.parse_result(stub.DenoisingLoss(protocol.request_messages(req), timeout=timeout))


def concurrently(fn, args: list) -> list:
    """``fn(arg)`` for every arg, each on its own thread, all released at once; the
    results (or the exceptions raised) in order."""
    start = threading.Barrier(len(args))

    def run(arg):
        start.wait()
        try:
            return fn(arg)
        except Exception as err:  # returned for the test to inspect
            return err

    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(run, args))


def start_server(adapter_paths, **overrides) -> tuple[TeacherServer, grpc.Channel]:
    fields = dict(model=MODEL, host="127.0.0.1", port=0, device="cpu",
                  adapters=[str(adapter_paths[MODEL]), str(adapter_paths[f"{MODEL}+lora"])],
                  workers=4, max_concurrent_rpcs=16, max_queued=16)
    fields.update(overrides)
    server = TeacherServer(ServerConfig(**fields))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options(64 * MIB))
    return server, channel


@pytest.fixture(scope="module")
def reference(teacher_servers):
    """A stub of the session's unbatched teacher (same model, same adapter files)."""
    channel = grpc.insecure_channel(teacher_servers[MODEL], options=channel_options(64 * MIB))
    yield pb_grpc.TeacherServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def batching(adapter_paths):
    """A batching teacher that runs a batch only once it holds 8 samples (or after 10 s):
    8 concurrent one-sample calls always make one batch."""
    server, channel = start_server(adapter_paths, max_batch=CLIENTS, max_wait_ms=10_000)
    yield server, pb_grpc.TeacherServiceStub(channel)
    channel.close()
    server.stop(grace=0)


@pytest.fixture(scope="module")
def lora_id(adapter_paths):
    return file_digest(adapter_paths[f"{MODEL}+lora"])


@pytest.fixture(scope="module")
def info(reference):
    return reference.GetInfo(pb.GetInfoRequest(), timeout=30)


# --- exactness -----------------------------------------------------------------------


def test_8_concurrent_clients_get_what_8_sequential_calls_get(batching, reference, info, lora_id):
    server, stub = batching
    requests = [request(info, lora_id, i) for i in range(CLIENTS)]
    sequential = [call(reference, r) for r in requests]
    before = len(server.servicer.batcher.history)
    batched = concurrently(lambda r: call(stub, r), requests)
    assert all(isinstance(r, DenoisingLossResult) for r in batched), batched

    records = list(server.servicer.batcher.history)[before:]
    assert [(r.requests, r.samples) for r in records] == [(CLIENTS, CLIENTS)]  # ONE model run

    losses = torch.cat([r.losses for r in batched])
    expected_losses = torch.cat([r.losses for r in sequential])
    grads = torch.cat([r.grad for r in batched])
    expected_grads = torch.cat([r.grad for r in sequential])
    assert losses.shape == (CLIENTS, 2) and grads.shape == (CLIENTS, 8, info.adapters[0].feature_dim)
    assert all(torch.equal(b.timesteps, s.timesteps) for b, s in zip(batched, sequential, strict=True))
    loss_diff, grad_diff = max_abs_diff(losses, expected_losses), max_abs_diff(grads, expected_grads)
    if os.environ.get("VIDALIGN_NUMERICS_LOG"):
        with open(os.environ["VIDALIGN_NUMERICS_LOG"], "a") as f:
            f.write(f"batched vs sequential\tloss diff={loss_diff:.3e}\tgrad diff={grad_diff:.3e}\t"
                    f"bitwise={torch.equal(losses, expected_losses) and torch.equal(grads, expected_grads)}\n")
    print(f"batched vs sequential: losses {loss_diff:.3e}, grads {grad_diff:.3e} "
          f"(max|grad| {grads.abs().max().item():.3e})")
    assert loss_diff <= ISSUE_ATOL and grad_diff <= ISSUE_ATOL, (loss_diff, grad_diff)
    assert_fp32_close(losses, expected_losses, terms=BATCHED_LOSS_TERMS, what="batched losses")
    assert_fp32_close(grads, expected_grads, terms=BATCHED_GRAD_TERMS, what="batched dL/dF_V")
    # A real defect is far above the bound: another sample's or another seed's loss.
    assert (expected_losses[0] - expected_losses[1]).abs().max() > 100 * ISSUE_ATOL


def test_a_bad_request_in_a_batch_fails_alone(batching, reference, info, lora_id):
    """7 good calls and one whose features have the wrong width, all at once: the bad
    one gets INVALID_ARGUMENT (refused when validated, before it joins), the 7 share one
    run (it waits its max_wait for an 8th sample that never comes) and get their answers."""
    server, stub = batching
    server.servicer.batcher.max_wait_s = 1.0  # 7 samples never fill the batch of 8
    try:
        requests = [request(info, lora_id, i) for i in range(CLIENTS)]
        bad = requests[3]
        bad.features = torch.randn(1, 8, info.adapters[0].feature_dim + 1)
        before = len(server.servicer.batcher.history)
        results = concurrently(lambda r: call(stub, r), requests)
    finally:
        server.servicer.batcher.max_wait_s = 10.0
    assert isinstance(results[3], grpc.RpcError), results[3]
    assert results[3].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features: d_v is" in results[3].details()
    good = [i for i in range(CLIENTS) if i != 3]
    assert [(r.requests, r.samples) for r in list(server.servicer.batcher.history)[before:]] == [(7, 7)]
    for i in good:
        expected = call(reference, requests[i])
        assert_fp32_close(results[i].losses, expected.losses, terms=BATCHED_LOSS_TERMS, what="losses")
        assert_fp32_close(results[i].grad, expected.grad, terms=BATCHED_GRAD_TERMS, what="grads")


def test_a_call_that_leaves_the_queue_does_not_break_the_batch(batching, info, lora_id):
    """One call's deadline passes while it waits to be batched: it gets DEADLINE_EXCEEDED
    and leaves the queue; the batch runs without it and the others get their answers."""
    server, stub = batching
    server.servicer.batcher.max_wait_s = 2.0
    try:
        requests = [request(info, lora_id, i) for i in range(4)]
        before = len(server.servicer.batcher.history)
        results = concurrently(
            lambda i: call(stub, requests[i], timeout=0.5 if i == 0 else 120), list(range(4))
        )
    finally:
        server.servicer.batcher.max_wait_s = 10.0
    assert isinstance(results[0], grpc.RpcError) and results[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(isinstance(r, DenoisingLossResult) for r in results[1:]), results
    assert [(r.requests, r.samples) for r in list(server.servicer.batcher.history)[before:]] == [(3, 3)]
    assert server.servicer.batcher.waiting == 0
    deadline = time.monotonic() + 10
    while server.limits.admission.active or server.limits.budget.used:  # slots and bytes given back
        assert time.monotonic() < deadline, (server.limits.admission.active, server.limits.budget.used)
        time.sleep(0.05)


# --- the limits ------------------------------------------------------------------------


def test_batches_respect_max_batch_and_max_wait(adapter_paths, info, lora_id):
    """--max-batch 4 --max-wait-ms 300: 8 one-sample calls make batches of at most 4
    samples (full ones go at once); calls of 3 and 2 samples never share one (5 > 4);
    a lone call waits its 300 ms and no longer. The metrics count the same runs."""
    server, channel = start_server(adapter_paths, max_batch=4, max_wait_ms=300, metrics_port=free_port())
    stub = pb_grpc.TeacherServiceStub(channel)
    batcher = server.servicer.batcher
    try:
        results = concurrently(lambda r: call(stub, r), [request(info, lora_id, i, draws=1) for i in range(8)])
        assert all(isinstance(r, DenoisingLossResult) for r in results), results
        records = list(batcher.history)
        assert sum(r.samples for r in records) == 8 and max(r.samples for r in records) == 4, records
        assert all(r.samples <= 4 for r in records)
        # The first run, formed while the model was idle, went as soon as it was full;
        # (later ones' waits include their queueing behind the run before them).
        assert records[0].samples == 4 and records[0].wait_s < 0.3, records

        mixed = [request(info, lora_id, 10, batch=3, draws=1), request(info, lora_id, 11, batch=2, draws=1)]
        before = len(batcher.history)
        results = concurrently(lambda r: call(stub, r), mixed)
        assert [r.losses.shape for r in results] == [(3, 1), (2, 1)]
        assert sorted(r.samples for r in list(batcher.history)[before:]) == [2, 3]

        before = len(batcher.history)
        start = time.perf_counter()
        call(stub, request(info, lora_id, 20, draws=1))
        elapsed = time.perf_counter() - start
        (lone,) = list(batcher.history)[before:]
        assert (lone.requests, lone.samples) == (1, 1)
        # Waited for company the full 300 ms, then ran: the wait is timed by the worker
        # from arrival; 0.25 s of slack for a loaded 2-core machine's scheduling.
        assert 0.3 <= lone.wait_s < 0.55, lone
        assert elapsed >= 0.3

        samples = scrape(server.metrics.port)
        runs = len(batcher.history)
        assert value(samples, "vidalign_teacher_batch_samples_count") == runs
        assert value(samples, "vidalign_teacher_batch_samples_sum") == 8 + 5 + 1
        assert value(samples, "vidalign_teacher_batch_samples_bucket", le="4.0") == runs  # none above 4
        assert value(samples, "vidalign_teacher_batch_requests_sum") == 8 + 2 + 1
    finally:
        channel.close()
        server.stop(grace=0)


def test_batching_is_off_by_default(teacher_servers):
    from vidalign_cli.main import build_parser

    args = build_parser().parse_args(["teacher", "serve", "--teacher-model", MODEL])
    assert (args.max_batch, args.max_wait_ms) == (1, 10.0)
    assert ServerConfig(model=MODEL).max_batch == 1


# --- the Batcher alone, with a fake model -------------------------------------------


class Context:
    def __init__(self) -> None:
        self.alive = True

    def is_active(self) -> bool:
        return self.alive


def fake_run(calls: list):
    """Doubles each payload; raises InvalidInput for a negative one (as a model run that
    trips on one request would); records the batches it ran."""
    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        if any(x < 0 for x in batch):
            raise InvalidInput(f"negative payload in {batch}")
        return [2 * x for x in batch]
    return run


def submit_all(batcher: Batcher, items: list[tuple[int, str, int]]) -> list:
    return concurrently(lambda it: batcher.submit(it[0], key=it[1], size=it[2]), items)


def test_batcher_joins_by_key_and_splits_a_failed_batch():
    calls: list = []
    batcher = Batcher(fake_run(calls), max_batch=8, max_wait_s=0.3)
    try:
        results = submit_all(batcher, [(1, "a", 1), (2, "a", 1), (-3, "a", 1), (4, "b", 1)])
    finally:
        batcher.stop()
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], InvalidInput)
    runs = sorted(sorted(c) for c in calls)
    # key "a": one run of three that fails, then each alone; key "b": one run of its own.
    assert runs == [[-3], [-3, 1, 2], [1], [2], [4]], runs
    assert sorted((r.requests, r.split) for r in batcher.history) == [(1, False), (3, True)]


def test_batcher_drops_a_caller_that_left_and_refuses_after_stop():
    calls: list = []
    batcher = Batcher(fake_run(calls), max_batch=8, max_wait_s=1.0)
    gone = Context()
    errors: list = []

    def leaver():
        try:
            batcher.submit(5, key="a", size=1, context=gone)
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=leaver)
    thread.start()
    time.sleep(0.05)
    gone.alive = False  # the client left while queued
    assert batcher.submit(6, key="a", size=1) == 12
    thread.join(5)
    batcher.stop()
    assert calls == [[6]] and len(errors) == 1 and "ended while it waited" in str(errors[0])
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(7, key="a", size=1)


def test_batcher_runs_a_request_larger_than_max_batch_whole():
    calls: list = []
    batcher = Batcher(fake_run(calls), max_batch=2, max_wait_s=0.0)
    try:
        assert batcher.submit(3, key="a", size=5) == 6
    finally:
        batcher.stop()
    assert calls == [[3]] and [(r.requests, r.samples) for r in batcher.history] == [(1, 5)]
