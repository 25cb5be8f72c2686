"""``make demo``: the teacher as a real gRPC server on loopback, stage 2 against it.

1. write a conditioning adapter for (tiny-animatediff, tiny-videollava);
2. start ``vidalign teacher serve`` as a separate process on a free loopback
   port and wait until its health check says SERVING;
3. run VDA stage 2 on generated moving-square clips for a few dozen steps,
   the encoder's gradient coming back over gRPC;
4. print the loss per step and stop the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vidalign.diffusion import Adapter, load_teacher
from vidalign.errors import Unavailable
from vidalign.log import get_logger
from vidalign.students import load_student
from vidalign_trainer.stage2 import (
    DataConfig,
    OutputConfig,
    Stage2Config,
    TeacherConfig,
    TrainConfig,
    run_stage2,
)

log = get_logger("vidalign.demo")

TEACHER_MODEL = "tiny-animatediff"
STUDENT = "tiny-videollava"


def start_teacher(
    model: str,
    adapters: list[Path],
    workdir: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 300.0,
) -> tuple[subprocess.Popen, str]:
    """Start ``vidalign teacher serve`` on a free loopback port; return (process, address)."""
    port_file = workdir / "teacher.port"
    port_file.unlink(missing_ok=True)
    log_file = (workdir / "teacher.log").open("w")
    cmd = [
        sys.executable, "-m", "vidalign_cli.main", "teacher", "serve",
        "--model", model, "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--device", device, "--dtype", dtype,
    ]
    for adapter in adapters:
        cmd += ["--adapter", str(adapter)]
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise Unavailable(f"the teacher did not start; see {workdir / 'teacher.log'}")
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    wait_serving(address, deadline - time.monotonic(), proc)
    return proc, address


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (the model has loaded)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise Unavailable(f"the teacher at {address} exited with status {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise Unavailable(f"the teacher at {address} was not SERVING within {timeout:.0f} s")


def stop_teacher(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_demo(out: Path, steps: int = 30) -> list[float]:
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(TEACHER_MODEL)
    adapter = Adapter.create(
        d_v=load_student(STUDENT).d_v,
        cond_dim=teacher.cond_dim,
        teacher_family=teacher.family,
        seed=0,
    )
    adapter_path = out / "adapter.safetensors"
    adapter_id = adapter.save(adapter_path)
    print(f"[demo] adapter {adapter_id} -> {adapter_path}", flush=True)

    proc, address = start_teacher(TEACHER_MODEL, [adapter_path], out)
    print(f"[demo] teacher {TEACHER_MODEL} serving on {address} (pid {proc.pid})", flush=True)
    try:
        config = Stage2Config(
            student=STUDENT,
            teacher=TeacherConfig(address=address, model=TEACHER_MODEL, adapter=str(adapter_path)),
            data=DataConfig(num_clips=16, frames=16, size=32, seed=0),
            train=TrainConfig(steps=steps, batch_size=2, lr=1e-4, seed=0),
            output=OutputConfig(dir=str(out / "stage2"), checkpoint_every=max(steps, 1)),
        )
        losses = run_stage2(config)
    finally:
        stop_teacher(proc)
        print("[demo] teacher stopped", flush=True)

    print("\nVDA stage 2 through the gRPC teacher: denoising loss per step")
    print(f"{'step':>5}  {'loss':>9}")
    for step, loss in enumerate(losses, start=1):
        print(f"{step:>5}  {loss:>9.5f}")
    half = max(len(losses) // 2, 1)
    first, last = sum(losses[:half]) / half, sum(losses[-half:]) / half
    print(f"\nmean loss, first {half} steps: {first:.5f}; last {half} steps: {last:.5f}")
    print(f"checkpoints and metrics: {out / 'stage2'}")
    return losses
