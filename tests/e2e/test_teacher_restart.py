"""The teacher under faults, with real processes on loopback.

- SIGTERM drains: health NOT_SERVING at once, a new call is refused with
  UNAVAILABLE, the calls in flight finish (one that never completes is cut at the
  grace period) and the process exits 0 within the grace period.
- A teacher SIGKILLed in the middle of a stage-2 run and restarted 20 s later on
  the same port: the trainer waits for it (within ``teacher.wait_s``) and
  finishes with exactly the losses of an uninterrupted run.
- Two replicas, one SIGKILLed mid-run and never restarted: the other serves at
  once (no waiting) and the losses are again exactly an uninterrupted run's.

Exactness holds because randomness is part of the request: a resent call gets
the same answer from any replica, before or after a restart.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch

from tests.support.teacher_process import Stage2Process, TeacherProcess, health
from vidalign.errors import Unavailable
from vidalign.teacher import protocol
from vidalign.teacher.client import GrpcTeacher
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
from vidalign.vda.adapter import file_digest

pytestmark = pytest.mark.slow

MODEL = "tiny-animatediff"
STEPS = 8
WAIT = "teacher.wait_s=60"


def request(adapter_id: str) -> DenoisingLossRequest:
    g = torch.Generator().manual_seed(0)
    return DenoisingLossRequest(
        sample_ids=["a", "b"], features=torch.randn(2, 8, 32, generator=g),
        latents=torch.randn(2, 4, 4, 8, 8, generator=g), captions=["x", "y"],
        adapter_id=adapter_id, seed=9, want_grad=True,
    )


class StalledCall:
    """A DenoisingLoss call whose client sends the first piece, then holds the stream open
    until ``release()``: a call that is in flight for as long as the test wants."""

    def __init__(self, address: str, req: DenoisingLossRequest) -> None:
        self.release_event = threading.Event()
        self.result = None
        self.error: grpc.RpcError | None = None
        messages = list(protocol.request_messages(req, chunk_bytes=4096))
        assert len(messages) > 1

        def stream():
            yield messages[0]
            self.release_event.wait(120)
            yield from messages[1:]

        def run():
            with grpc.insecure_channel(address) as channel:
                try:
                    responses = pb_grpc.TeacherServiceStub(channel).DenoisingLoss(stream(), timeout=120)
                    self.result = protocol.parse_result(responses)
                except grpc.RpcError as err:
                    self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.release_event.set()

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_within_the_grace_period(
    adapter_paths, tmp_path
):
    adapter = adapter_paths[MODEL]
    adapter_id = file_digest(adapter)
    grace_s = 20.0
    # DEBUG: the teacher logs `rpc_started` when a call reaches its handler. The stalled
    # streams must outlast the grace period, not the idle-stream limit.
    teacher = TeacherProcess(tmp_path, adapter, grace_s=grace_s, env={"VIDALIGN_LOG_LEVEL": "DEBUG"},
                             args=["--stream-idle-timeout-s", "300"])
    calls: list[StalledCall] = []
    try:
        teacher.wait_serving()
        client = GrpcTeacher(teacher.address, wait_s=0)
        expected = client.denoising_loss(request(adapter_id))
        finishing = StalledCall(teacher.address, request(adapter_id))  # will be released
        stuck = StalledCall(teacher.address, request(adapter_id))  # never released
        calls += [finishing, stuck]
        deadline = time.monotonic() + 60
        while len(teacher.events("rpc_started")) < 3:  # expected + both stalled calls
            assert time.monotonic() < deadline, teacher.log_text()[-2000:]
            time.sleep(0.05)

        teacher.signal(signal.SIGTERM)
        terminated = time.monotonic()
        while (status := health(teacher.address)) == "SERVING":
            time.sleep(0.05)
        assert status == "NOT_SERVING"
        with pytest.raises(Unavailable, match="shutting down"):
            client.denoising_loss(request(adapter_id))
        client.close()

        finishing.release()
        finishing.join()
        assert finishing.error is None, finishing.error
        assert torch.equal(finishing.result.losses, expected.losses)
        assert torch.equal(finishing.result.grad, expected.grad)

        # The stuck call holds the drain until the grace period ends; then it is cut and the
        # process exits 0 (Kubernetes: the manifest's terminationGracePeriodSeconds leaves 5 s).
        returncode = teacher.proc.wait(timeout=max(0.1, grace_s + 5 - (time.monotonic() - terminated)))
        assert returncode == 0, teacher.log_text()[-2000:]
        stuck.join()
        assert stuck.result is None and stuck.error is not None
        assert [e["in_flight"] for e in teacher.events("teacher_draining")] == [2]
        assert [e["drained"] for e in teacher.events("teacher_stopped")] == [False]
    finally:
        for call in calls:
            call.release()
        teacher.kill()


def _assert_same_run(run: Stage2Process, baseline: Stage2Process) -> None:
    assert [step for step, _ in run.losses()] == list(range(1, STEPS + 1))
    assert run.losses() == baseline.losses()


def test_stage2_survives_a_teacher_killed_and_restarted_on_the_same_port(adapter_paths, tmp_path):
    adapter = adapter_paths[MODEL]
    teachers = [TeacherProcess(tmp_path, adapter, name=f"teacher{i}") for i in range(2)]
    runs: list[Stage2Process] = []
    try:
        for teacher in teachers:
            teacher.wait_serving()
        doomed, other = teachers
        run = Stage2Process(tmp_path / "restarted", doomed.address, adapter, STEPS, WAIT)
        baseline = Stage2Process(tmp_path / "baseline", other.address, adapter, STEPS, WAIT)
        runs += [run, baseline]
        run.wait_steps(1)
        doomed.kill()
        assert run.steps_done() < STEPS, "the run finished before the teacher was killed"
        time.sleep(20)
        assert run.proc.poll() is None, run.log_text()[-3000:]  # still waiting for its teacher
        teachers.append(TeacherProcess(tmp_path, adapter, port=doomed.port, name="teacher0-again"))

        assert run.finish() == 0, run.log_text()[-3000:]
        assert baseline.finish() == 0, baseline.log_text()[-3000:]
        _assert_same_run(run, baseline)
        waits = run.events("teacher_wait")
        assert waits and {"attempt", "elapsed_s", "budget_s", "target"} <= waits[0].keys()
        assert all(w["budget_s"] == 60 and w["target"] == doomed.address for w in waits)
        assert run.events("teacher_back")
    finally:
        for process in [*runs, *teachers]:
            process.kill()


def test_stage2_survives_one_of_two_replicas_killed_for_good(adapter_paths, tmp_path):
    adapter = adapter_paths[MODEL]
    teachers = [TeacherProcess(tmp_path, adapter, name=f"teacher{i}") for i in range(2)]
    runs: list[Stage2Process] = []
    try:
        for teacher in teachers:
            teacher.wait_serving()
        pool = ",".join(t.address for t in teachers)
        run = Stage2Process(tmp_path / "pool", pool, adapter, STEPS, WAIT)
        baseline = Stage2Process(tmp_path / "baseline", teachers[1].address, adapter, STEPS, WAIT)
        runs += [run, baseline]
        run.wait_steps(1)
        teachers[0].kill()
        assert run.steps_done() < STEPS, "the run finished before the replica was killed"

        assert run.finish() == 0, run.log_text()[-3000:]
        assert baseline.finish() == 0, baseline.log_text()[-3000:]
        _assert_same_run(run, baseline)
        assert run.events("teacher_wait") == []  # the other replica answered at once
    finally:
        for process in [*runs, *teachers]:
            process.kill()
