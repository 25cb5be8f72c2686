"""Stage-2 step time through the gRPC teacher on loopback, divided by in-process.

For each teacher config, the same stage-2 run (same data, seed and steps) is
timed twice: with ``teacher.address: local`` (teacher in the trainer's
process) and against ``vidalign teacher serve`` started as a separate process
on 127.0.0.1. Printed: median step time of each (first steps dropped as
warm-up) and their ratio, measured in this one run.

    .venv/bin/python bench/stage2.py [--steps 12] [--teachers tiny-animatediff small-animatediff]
    python bench/stage2.py --device cuda --teachers tiny-animatediff random-animatediff   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from vidalign.log import configure_logging
from vidalign.students import load_student
from vidalign.vda import Adapter, load_teacher
from vidalign_cli.demo import start_teacher, stop_teacher
from vidalign_trainer.stage2 import (
    DataConfig,
    OutputConfig,
    Stage2Config,
    TeacherConfig,
    TrainConfig,
    run_stage2,
)

STUDENT = "tiny-videollava"
WARMUP = 2


def median_step(out: Path) -> float:
    steps = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(steps[WARMUP:])


def bench(
    teacher_name: str, steps: int, batch: int, root: Path, device: str
) -> tuple[float, float]:
    teacher = load_teacher(teacher_name)
    adapter_path = root / f"{teacher_name}.safetensors"
    Adapter.create(
        d_v=load_student(STUDENT).d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family
    ).save(adapter_path)
    del teacher

    def config(address: str, out: Path) -> Stage2Config:
        return Stage2Config(
            student=STUDENT,
            device=device,
            teacher=TeacherConfig(address=address, model=teacher_name, adapter=str(adapter_path)),
            data=DataConfig(num_clips=16, frames=16, size=64, seed=0),
            train=TrainConfig(steps=steps, batch_size=batch, seed=0),
            output=OutputConfig(dir=str(out), checkpoint_every=10**9),
        )

    local_out = root / f"{teacher_name}-local"
    run_stage2(config("local", local_out))
    proc, address = start_teacher(teacher_name, [adapter_path], root, device=device)
    try:
        grpc_out = root / f"{teacher_name}-grpc"
        run_stage2(config(address, grpc_out))
    finally:
        stop_teacher(proc)
    return median_step(local_out), median_step(grpc_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--teachers", nargs="+", default=["tiny-animatediff", "small-animatediff"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers:
            rows.append((name, *bench(name, args.steps, args.batch, Path(tmp), args.device)))
    print(
        f"\nstage-2 step time on {args.device}, batch {args.batch}, "
        f"median of steps {WARMUP + 1}..{args.steps}"
    )
    print(f"{'teacher':<20} {'in-process s':>13} {'gRPC s':>9} {'gRPC / in-process':>18}")
    for name, local, remote in rows:
        print(f"{name:<20} {local:>13.4f} {remote:>9.4f} {remote / local:>17.2f}x")


if __name__ == "__main__":
    main()
