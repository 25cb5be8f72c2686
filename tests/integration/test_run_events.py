"""TensorBoard event files of the training skeleton, on a toy job with named parameter
groups, on both store backends: every number of metrics.jsonl is a scalar at its step,
a store run's files reach the store, and a resumed or restarted run shows each step
once (vidalign_trainer.board)."""

from __future__ import annotations

import time

import pytest
import torch

from vidalign.run import RunDir
from vidalign.store import LocalStore, open_store
from vidalign_trainer.board import EVENTS_GLOB, scalars, wait_to_sort_last
from vidalign_trainer.loop import Built, OutputConfig, TrainConfig, fit

from ..unit.test_loop import Regression, ToyConfig


class Grouped(Regression):
    """The toy regression with two named parameter groups (like SFT's vision/llm/...)."""

    def build(self, ctx, checkpoint) -> Built:
        built = super().build(ctx, checkpoint)
        linear = self.model[1]
        optimizer = torch.optim.AdamW([
            {"params": [linear.weight], "lr": self.config.train.lr, "name": "weight"},
            {"params": [linear.bias], "lr": self.config.train.lr / 10, "name": "bias"},
        ])
        return Built(self.model, optimizer, info=built.info)


def read_events(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_events(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for name, v in items:
                tag = key if name is None else f"{key}/{name}"
                out.setdefault(tag, []).append((record["step"], float(v)))
    return out


def assert_events_match(events, records) -> None:
    expected = expected_events(records)
    assert events.keys() == expected.keys()
    for tag, points in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # each step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def local_copy(uri: str, dest):
    """The run's event files as a directory TensorBoard can read (a store run: downloaded)."""
    store = open_store(uri)
    if isinstance(store, LocalStore):
        return store.root
    dest.mkdir()
    for key in store.list():
        if key.startswith("events.out.tfevents."):
            store.get_file(key, dest / key)
    return dest


def _config(out, steps, every=2) -> ToyConfig:
    return ToyConfig(
        train=TrainConfig(steps=steps, batch_size=4, lr=0.05),
        output=OutputConfig(dir=str(out), checkpoint_every=every, keep_latest_k=2),
    )


def test_scalars_equal_the_metrics_and_reach_the_store(store_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    fit(Grouped(_config(store_uri, 4)))
    records = RunDir(store_uri).metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The global batch over the step's time (step_s is rounded to 0.1 ms).
    assert all(4 / (r["step_s"] + 6e-5) < r["samples_per_s"] < 4 / max(r["step_s"] - 6e-5, 1e-9)
               for r in records)
    assert "gpu_mem_gb" not in records[0]  # CPU
    events = read_events(local_copy(store_uri, tmp_path / "events"))
    assert {"loss", "half", "grad_norm", "lr/weight", "lr/bias", "step_s", "samples_per_s"} == set(
        events
    )
    assert_events_match(events, records)
    assert events["lr/bias"][0] == (1, pytest.approx(0.005))


def test_a_resumed_run_shows_each_step_once(store_uri, tmp_path, monkeypatch):
    """A run killed after step 5 with its last checkpoint at step 4, resumed on another
    machine (a fresh cache): steps 5 and 6 appear once, with the resumed run's values."""
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache-1"))
    fit(Grouped(_config(store_uri, 5)))
    # The kill: the step-5 checkpoint never committed.
    store = open_store(store_uri).child("checkpoints")
    store.delete_prefix("step-00000005")
    assert RunDir(store_uri).checkpointer(2).latest().step == 4
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache-2"))
    result = fit(Grouped(_config(store_uri, 6)), resume=True)
    assert result.start == 4
    records = RunDir(store_uri).metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    directory = local_copy(store_uri, tmp_path / "events")
    assert len(list(directory.glob(EVENTS_GLOB))) == 2  # one file per call of fit
    events = read_events(directory)
    assert_events_match(events, records)
    # Step 5 is the resumed run's (its step time differs from the killed run's).
    assert events["step_s"][4] == (5, pytest.approx(records[4]["step_s"], rel=1e-6))


def test_a_new_writer_waits_until_its_file_sorts_last():
    """TensorBoard reads a run's files in name order, and a second writer in the same second
    compares by its counter as text (.100 before .99): it starts once the clock has passed the
    earlier file's stamp. One stamped far ahead (a clock behind) is not waited for."""
    slept: list[float] = []
    old = "events.out.tfevents.1796181877.node.cluster.local.42.99"  # host names hold dots
    assert wait_to_sort_last({old}, clock=lambda: 1796181877.25, sleep=slept.append) == 0.75
    assert slept == [0.75]  # the next second: the new file's stamp is 1796181878
    assert wait_to_sort_last({old}, clock=lambda: 1796181878.0, sleep=slept.append) == 0.0
    assert wait_to_sort_last(set(), clock=lambda: 0.0, sleep=slept.append) == 0.0
    assert wait_to_sort_last({"not-an-event-file"}, clock=lambda: 0.0, sleep=slept.append) == 0.0
    assert wait_to_sort_last({old}, clock=lambda: 1796181000.0, sleep=slept.append) == 0.0
    assert slept == [0.75]


def test_a_resume_in_the_same_second_still_shows_each_step_once(tmp_path, monkeypatch):
    """A run and its resume in one process, the second writer created within the first one's
    second (the case that flaked when the counter went from 99 to 100): steps 5 and 6 are
    the resumed run's, once each."""
    out = tmp_path / "run"
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    fit(Grouped(_config(out, 5)))
    open_store(str(out)).child("checkpoints").delete_prefix("step-00000005")
    (first,) = out.glob(EVENTS_GLOB)
    # Stamp the first file with the current second and a counter that sorts after any other.
    now = str(int(time.time()))
    parts = first.name.split(".")
    first.rename(first.with_name(".".join([*parts[:3], now, *parts[4:-1], "zz"])))
    fit(Grouped(_config(out, 6)), resume=True)
    files = sorted(p.name for p in out.glob(EVENTS_GLOB))
    assert len(files) == 2 and files[0].endswith(".zz")  # the resumed run's file sorts last
    records = RunDir(str(out)).metrics()
    events = read_events(out)
    assert_events_match(events, records)
    assert events["step_s"][4] == (5, pytest.approx(records[4]["step_s"], rel=1e-6))


def test_a_fresh_run_in_a_used_directory_is_refused_and_loses_nothing(tmp_path):
    from vidalign.errors import FailedPrecondition

    out = tmp_path / "run"
    fit(Grouped(_config(out, 4)))
    before = RunDir(str(out)).metrics()
    with pytest.raises(FailedPrecondition, match="pass --resume"):
        fit(Grouped(_config(out, 2)))  # not resumed, fewer steps: would interleave the runs
    assert RunDir(str(out)).metrics() == before
    assert len(list(out.glob(EVENTS_GLOB))) == 1
    assert_events_match(read_events(out), before)
    fit(Grouped(_config(out, 6)), resume=True)  # the earlier run goes on
    assert [r["step"] for r in RunDir(str(out)).metrics()] == [1, 2, 3, 4, 5, 6]


def test_scalars_of_a_record():
    record = {"step": 3, "loss": 0.5, "lr": {"vision": 1e-5, "llm": 2e-5}, "grad_norm": 1,
              "note": "text", "ok": True, "samples_per_s": None}
    assert scalars(record) == {"loss": 0.5, "lr/vision": 1e-5, "lr/llm": 2e-5, "grad_norm": 1.0}
