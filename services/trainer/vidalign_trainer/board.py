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

That needs TensorBoard to read the new file last, and it reads a run's files in
name order: ``events.out.tfevents.<unix seconds>.<host>.<pid>.<counter>``. Two
writers in one second (a resume in the same process) compare by counter as text
(``.100`` before ``.99``): the new file would be read first and the old one's
events would purge the new ones. So a writer whose run already has a file stamped
this second (or up to ``MAX_WAIT_S`` later) starts only once the clock has passed
it. A file stamped further ahead (the earlier run's machine had a clock ahead of
this one's) cannot be waited for: that is logged as ``events_clock_behind``.
(Renaming the new file instead does not work: TensorBoard's writer reopens its
file by name at every flush.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vidalign.log import get_logger
from vidalign.run import RunDir
from vidalign.store import LocalStore

log = get_logger("vidalign.board")

EVENTS_PREFIX = "events.out.tfevents."
EVENTS_GLOB = f"{EVENTS_PREFIX}*"
FLUSH_S = 10
"""Seconds between the writer's flushes to disk (what a running TensorBoard can see)."""
MAX_WAIT_S = 2.0
"""The longest a new writer waits for the clock to pass an earlier file's stamp (module docstring)."""


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


def _seconds(name: str) -> int | None:
    """The timestamp field of an event file's name, or None if it has none."""
    field = name[len(EVENTS_PREFIX):].split(".", 1)[0]
    return int(field) if name.startswith(EVENTS_PREFIX) and field.isdigit() else None


def wait_to_sort_last(earlier: set[str], *, clock=time.time, sleep=time.sleep) -> float:
    """Wait until a file created now is stamped after every name in ``earlier``; return the
    seconds waited (module docstring). Waits at most about ``MAX_WAIT_S``."""
    stamps = [s for s in map(_seconds, earlier) if s is not None]
    now = clock()
    if not stamps or max(stamps) < int(now):
        return 0.0
    wait = max(stamps) + 1 - now
    if wait > MAX_WAIT_S + 1:
        log.warning("events_clock_behind", latest_file_stamp=max(stamps), now=round(now, 3),
                    detail="an earlier event file is stamped ahead of this clock: TensorBoard "
                           "may show this run's resumed steps under the earlier ones")
        return 0.0
    sleep(wait)
    return wait


class Board:
    """Rank 0's TensorBoard writer for a run that goes on from step ``start`` (0: fresh)."""

    def __init__(self, run: RunDir, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        before = set(self._files())
        earlier = {p.name for p in before}
        if not isinstance(run.store, LocalStore):  # a resume elsewhere: the earlier files are there
            earlier |= {k for k in run.store.list() if k.startswith(EVENTS_PREFIX) and "/" not in k}
        wait_to_sort_last(earlier)
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
