"""A tiny stage-2 run watched through TensorBoard: its event files beside
metrics.jsonl hold every number of every step (the teacher's latency too), and a
resumed run shows each step once."""

from __future__ import annotations

import shutil

from vidalign.run import RunDir
from vidalign_trainer.board import EVENTS_GLOB
from vidalign_trainer.stage2 import run_stage2

from ..integration.test_run_events import assert_events_match, read_events
from .test_stage2 import config


def test_stage2_writes_every_step_to_tensorboard_and_resumes_without_duplicates(
    adapter_paths, tmp_path
):
    adapter = adapter_paths["tiny-animatediff"]
    out = tmp_path / "run"
    run_stage2(config(adapter, out, 4))  # checkpoints at steps 2 and 4
    records = RunDir(str(out)).metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    events = read_events(out)
    assert {"loss", "grad_norm", "lr", "step_s", "samples_per_s", "teacher_s"} == set(events)
    assert_events_match(events, records)

    # Killed after step 4 before its checkpoint committed: resume from step 2.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    run_stage2(config(adapter, out, 4), resume=True)
    records = RunDir(str(out)).metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert len(list(out.glob(EVENTS_GLOB))) == 2
    events = read_events(out)
    assert_events_match(events, records)  # steps 3 and 4 once, the resumed run's values
