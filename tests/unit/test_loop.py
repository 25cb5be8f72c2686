"""The training skeleton on a toy job: checkpoints, exact resume, records, refusals."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from vidalign.errors import InvalidInput
from vidalign.run import RunDir
from vidalign_trainer import loop
from vidalign_trainer.common import epoch_order
from vidalign_trainer.loop import Built, Job, OutputConfig, StepOutput, TrainConfig, fit

N = 12  # examples


@dataclass(kw_only=True)
class ToyConfig:
    device: str = "cpu"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6, batch_size=4, lr=0.05))
    output: OutputConfig = field(default_factory=OutputConfig)


class Regression(Job):
    """Least squares on fixed data; a dropout makes the step depend on the RNG state."""

    name = "toy"

    def __init__(self, config: ToyConfig, *, poison_at: int | None = None) -> None:
        super().__init__(config)
        self.poison_at = poison_at
        self.exported: list[int] = []

    def build(self, ctx, checkpoint) -> Built:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(3, 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            torch.nn.init.normal_(self.model[1].weight)
        self.initial = self.model[1].weight.detach().clone()
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint.weights("model"))
        torch.manual_seed(2)  # the dropout's draws; a resume restores the checkpoint's RNG state
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.train.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return Built(self.model, optimizer, scheduler, info={"examples": N})

    def step(self, model, step: int) -> StepOutput:
        picks = epoch_order(N, step, self.config.train.batch_size, self.config.train.seed)
        loss = (model(self.x[picks]).squeeze(1) - self.y[picks]).pow(2).mean()
        if step + 1 == self.poison_at:
            loss = loss * float("nan")
        return StepOutput(loss, metrics={"half": loss.detach() / 2})

    def weights(self):
        return {"model": self.model.state_dict()}

    def export(self, final) -> None:
        self.exported.append(final.step)


class Events:
    """Records the skeleton's log events (the process's logging set-up is not the test's)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def _record(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    info = warning = _record

    def take(self, name: str) -> list[dict]:
        found = [fields for event, fields in self.events if event == name]
        self.events.clear()
        return found


@pytest.fixture
def events(monkeypatch) -> Events:
    recorder = Events()
    monkeypatch.setattr(loop, "log", recorder)
    return recorder


def _config(out, steps=6, every=2) -> ToyConfig:
    return ToyConfig(
        train=TrainConfig(steps=steps, batch_size=4, lr=0.05),
        output=OutputConfig(dir=str(out), checkpoint_every=every, keep_latest_k=2),
    )


def test_records_checkpoints_and_export(tmp_path):
    job = Regression(_config(tmp_path / "run"))
    result = fit(job)
    records = RunDir(str(tmp_path / "run")).metrics()
    assert records == result.records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # The scheduler steps once per optimizer step: lr halves every 2 steps.
    # Exact: StepLR multiplies by gamma = 0.5, exact in binary, and JSON round-trips floats.
    assert [r["lr"] for r in records] == [0.05, 0.025, 0.025, 0.0125, 0.0125, 0.00625]
    # Unrounded, half is loss / 2 exactly (a float32 halved: exact, no underflow here).
    assert all(v["half"] == v["loss"] / 2 for v in result.values)
    # The records round each to 6 decimals: half carries 0.5e-6 and loss / 2 half of loss's
    # 0.5e-6, 7.5e-7 at most (1e-6 covers it with the decimal-to-binary slack of 1e-17).
    assert all(r["half"] == pytest.approx(r["loss"] / 2, abs=1e-6, rel=0) for r in records)
    assert result.values[0]["loss"] != round(result.values[0]["loss"], 6)  # unrounded
    assert not torch.equal(job.model[1].weight, job.initial)  # the optimizer stepped
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # keep_latest_k = 2
    assert job.exported == [6]


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    full = fit(Regression(_config(tmp_path / "full"))).losses
    first = fit(Regression(_config(tmp_path / "part", steps=3, every=3))).losses
    # A new run to 6 steps resumes from step 3: weights, optimizer, schedule, RNG (dropout).
    second = fit(Regression(_config(tmp_path / "part")), resume=True)
    assert second.start == 3
    assert first + second.losses == full
    history = [r["step"] for r in RunDir(str(tmp_path / "part")).metrics()]
    assert history == [1, 2, 3, 4, 5, 6]


def test_a_resumed_config_that_changed_is_reported(tmp_path, events):
    fit(Regression(_config(tmp_path / "run", steps=2)))
    fit(Regression(_config(tmp_path / "run", steps=2)), resume=True)
    assert events.take("resume_config_changed") == []  # same config: no warning
    fit(Regression(_config(tmp_path / "run", steps=3)), resume=True)
    assert [e["checkpoint"] for e in events.take("resume_config_changed")] == ["step-00000002"]


def test_a_non_finite_loss_stops_before_the_weights_move(tmp_path):
    job = Regression(_config(tmp_path / "run"), poison_at=3)
    with pytest.raises(FloatingPointError, match="toy: the loss is nan at step 3"):
        fit(job)
    assert torch.isfinite(job.model[1].weight).all()
    assert [r["step"] for r in RunDir(str(tmp_path / "run")).metrics()] == [1, 2]
    assert job.exported == []


def test_log_every_thins_the_log_not_the_metrics(tmp_path, events):
    config = _config(tmp_path / "run")
    config.output.log_every = 4
    fit(Regression(config))
    assert [e["step"] for e in events.take("toy_step")] == [4, 6]  # every 4th and the last
    assert len(RunDir(str(tmp_path / "run")).metrics()) == 6


def test_a_single_process_job_refuses_ranks(tmp_path, monkeypatch):
    class Single(Regression):
        distributed = False

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InvalidInput, match=r"runs in one process.*2 ranks"):
        fit(Single(_config(tmp_path / "run")))


def test_sections_validate_with_the_field_name():
    with pytest.raises(ValueError, match=r"train\.lr must be positive"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match=r"train\.steps and train\.batch_size"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"output\.checkpoint_every"):
        OutputConfig(checkpoint_every=0)
