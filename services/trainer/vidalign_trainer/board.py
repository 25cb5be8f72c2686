"""TensorBoard event files of a training run, beside its ``metrics.jsonl`` (rank 0).

Every numeric field of a step's metrics record becomes a scalar of the same name
at the record's step: ``loss``, ``grad_norm``, ``lr`` (``lr/<group>`` where the
optimizer has named parameter groups, e.g. SFT's ``lr/vision``, ``lr/llm``),
``samples_per_s``, ``step_s``, ``teacher_s`` (the teacher's latency, stage 2),
``gpu_mem_gb`` (CUDA only) and the job's own metrics (``ce``, ``align``,
``eval_loss``, ...). So ``tensorboard --logdir RUN_DIR`` shows what metrics.jsonl
holds, while the run goes on.

The files are written to the run's working directory (the output directory
itself for a local run). For a store run (``s3://...``) they are uploaded next
to ``metrics.jsonl`` in the store after each checkpoint and at the end; a file
is uploaded whole again whenever it has grown.

Resume: each call of ``fit`` writes a new event file whose first event is a
restart marker (``SessionLog.START``, torch's ``purge_step``) at the first step
it will write. TensorBoard drops the earlier files' events from that step on,
so steps that a killed run logged past its last checkpoint are replaced, not
shown twice. The same holds for a fresh (not resumed) run in a used directory:
its marker is at step 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidalign.run import RunDir
from vidalign.store import LocalStore

EVENTS_GLOB = "events.out.tfevents.*"
FLUSH_S = 10
"""Seconds between the writer's flushes to disk (what a running TensorBoard can see)."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics record: every number but ``step``; a dict of numbers
    (``lr`` per parameter group) as ``<key>/<name>``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            for name, v in value.items():
                if _number(v):
                    out[f"{key}/{name}"] = float(v)
        elif _number(value):
            out[key] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Board:
    """Rank 0's TensorBoard writer for a run that goes on from step ``start`` (0: fresh)."""

    def __init__(self, run: RunDir, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        before = set(self._files())
        # purge_step: the restart marker at the first step this writer logs (module docstring).
        self.writer = SummaryWriter(str(run.work), purge_step=start + 1, flush_secs=FLUSH_S)
        self.files = sorted(set(self._files()) - before)
        """The event file(s) this writer writes (the ones it uploads)."""
        self._uploaded: dict[Path, tuple[int, int]] = {}

    def _files(self) -> list[Path]:
        return sorted(self.run.work.glob(EVENTS_GLOB))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def publish(self) -> None:
        """Flush; for a store run, upload this writer's event files that changed."""
        self.writer.flush()
        if isinstance(self.run.store, LocalStore):
            return
        for path in self.files or self._files():
            if not path.is_file():
                continue
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self._uploaded.get(path) != key:
                self.run.store.put_file(path.name, path)
                self._uploaded[path] = key

    def close(self) -> None:
        self.writer.close()
