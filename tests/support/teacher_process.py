"""`vidalign teacher serve` and `vidalign train stage2` as real processes on loopback.

The teacher logs to a file (never a pipe that could fill up); ``wait_serving``
polls its gRPC health service, so a test waits for a fact, not for a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "vidalign.teacher.v1.TeacherService"


def health(address: str, timeout: float = 5.0) -> str:
    """The teacher service's health status name, or the gRPC code name if the check failed."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class TeacherProcess:
    """One `vidalign teacher serve` subprocess of tiny-animatediff with one adapter."""

    def __init__(self, root: Path, adapter: Path, *, port: int = 0, grace_s: float = 30.0,
                 env: dict[str, str] | None = None, name: str = "teacher", args: Sequence[str] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"{name}.log"
        port_file = root / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vidalign_cli.main", "teacher", "serve",
             "--teacher-model", "tiny-animatediff", "--host", "127.0.0.1", "--port", str(port),
             "--port-file", str(port_file), "--device", "cpu", "--adapter", str(adapter),
             "--grace-s", str(grace_s), *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        while not port_file.exists():
            self._check_alive(deadline)
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"teacher exited ({self.proc.returncode}): {self.log_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"teacher did not come up: {self.log_text()[-2000:]}")

    def wait_serving(self, timeout: float = 120.0) -> TeacherProcess:
        deadline = time.monotonic() + timeout
        while health(self.address) != "SERVING":
            self._check_alive(deadline)
            time.sleep(0.2)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        return [e for e in _json_lines(self.log_text()) if e.get("event") == name]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def _json_lines(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


class Stage2Process:
    """`vidalign train stage2` (configs/stage2-tiny.yaml) in a subprocess; logs to a file."""

    def __init__(self, out: Path, address: str, adapter: Path, steps: int, *sets: str,
                 resume: bool = False) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log_path = out.parent / f"{out.name}.log"
        self.log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "vidalign_cli.main", "train", "stage2",
               "--config", str(ROOT / "configs" / "stage2-tiny.yaml")]
        for item in (f"teacher.address={address}", f"teacher.adapter={adapter}",
                     f"output.dir={out}", f"train.steps={steps}", "data.num_clips=4", *sets):
            cmd += ["--set", item]
        if resume:
            cmd.append("--resume")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def steps_done(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait_steps(self, n: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.steps_done() < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stage 2 did not reach step {n}: {self.log_text()[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def losses(self) -> list[tuple[int, float]]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [(record["step"], record["loss"]) for record in map(json.loads, lines)]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        return [e for e in _json_lines(self.log_text()) if e.get("event") == name]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
