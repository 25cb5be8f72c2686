"""What the trainer jobs share: the data section, its clips and feeds, ranks under torchrun.

Every source of randomness in a training job is a function of (seed, step):
``ClipData.order`` gives the clips of a step's global batch, ``step_seed``
the teacher's seed for that step; a :class:`Feed` decodes exactly the step
plan's clips (in worker processes for file-backed data), whatever the number of
workers. A job resumed at step k therefore repeats
exactly what an uninterrupted one does, and data-parallel ranks agree on the
global batch and take their own slices of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from vidalign.data.toy import moving_squares
from vidalign.data.videoset import (
    QA,
    SKIPPED_FILE,
    SOURCES,
    SkipLog,
    VideoItems,
    VideoRecord,
    View,
    load_batches,
    read_records,
)
from vidalign.errors import InvalidInput

# --- data -------------------------------------------------------------------------

IN_MEMORY = ("toy", "synth")
KINDS = (*IN_MEMORY, *(s for s in SOURCES if s not in IN_MEMORY))


@dataclass(kw_only=True)
class DataConfig:
    kind: str = "toy"
    """``toy``: procedurally generated moving squares (vidalign.data.toy); ``synth``: a
    SynthMotion directory written by ``vidalign data synth``, decoded once into memory; read
    from files, clip by clip: ``records`` (``vidalign data prepare``'s subset, or JSON Lines
    of records), ``shards`` (``vidalign data shard``), ``motionbench``, ``motionvid``."""
    path: str = ""
    """The directory, file or store URI a file-backed kind reads (``synth``: the directory)."""
    video_dir: str = ""
    """Where relative video paths of ``records``/``motionbench``/``motionvid`` resolve (a dir or
    store URI); empty: beside the annotation file."""
    num_clips: int = 32
    """Clips to use: the first ``num_clips`` (0: all; ``toy``: how many to make)."""
    frames: int = 16
    """Frames per clip for the student (spread uniformly over the clip)."""
    size: int = 32
    """Frame side for the student (resized to cover, centre-cropped)."""
    seed: int = 0
    workers: int = 2
    """Processes decoding video ahead of the step (file-backed kinds; 0: in the training process)."""
    max_skip_fraction: float = 0.01
    """Stop when more than this fraction of the clips read were bad (listed in
    ``<output.dir>/skipped.jsonl``)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data.kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if self.kind != "toy" and not self.path:
            raise ValueError(f"data.path: kind {self.kind} needs a directory, file or store URI")
        if self.num_clips < (1 if self.kind == "toy" else 0):
            raise ValueError(f"data.num_clips must be >= {int(self.kind == 'toy')}, got {self.num_clips}")
        if self.frames < 1 or self.size < 1:
            raise ValueError(f"data.frames and data.size must be >= 1, got {self.frames}, {self.size}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")

    @property
    def view(self) -> View:
        """The student's view of a clip."""
        return View(self.frames, self.size)


TASKS = ("caption", "qa")
CAPTION_PROMPT = "Describe the video."
QA_PROMPT = "Which direction does the square move?"
"""The toy clips' question (SynthMotion's come with their own prompts)."""


@dataclass(kw_only=True)
class InstructionDataConfig(DataConfig):
    """Clips as (prompt, target) pairs: their captions and/or their questions."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """``caption`` ("Describe the video." -> the caption) and/or ``qa`` (toy: the direction
    question; others: every question of the clip, with the prompt and answer the evaluation
    uses)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise ValueError(
                f"data.tasks: expected a non-empty subset of {list(TASKS)}, got {self.tasks}"
            )


@dataclass(frozen=True)
class Example:
    """One (prompt, target) pair about record ``record``."""

    record: int
    prompt: str
    target: str


@dataclass
class Fed:
    """One step's items, decoded: what a job reads."""

    items: list[int]
    """The items used (a bad clip's item gives way to the next one)."""
    records: list[int]
    ids: list[str]
    views: dict[str, torch.Tensor]
    """uint8 (B, F, H, W, 3) per view."""


class ClipData:
    """The records of a ``data`` section, and the feeds that decode them for a job.

    ``toy`` and ``synth`` clips are held in memory (records with ``pixels``);
    the file-backed kinds are only records until a :class:`Feed` decodes them.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.store = ""
        self.skipped: list = []
        if config.kind == "toy":
            clips = moving_squares(config.num_clips, frames=config.frames, size=config.size, seed=config.seed)
            self.records = [
                VideoRecord(id=c.clip_id, video=f"toy:{c.clip_id}", caption=c.caption,
                            static_caption=c.static_caption, qa=(QA(QA_PROMPT, c.direction),),
                            pixels=c.video)
                for c in clips
            ]
        elif config.kind == "synth":
            from vidalign.data.synthset import load_synth_set

            synth = load_synth_set(config.path, num_clips=config.num_clips, frames=config.frames,
                                   size=config.size)
            qa: list[list[QA]] = [[] for _ in synth.ids]
            for q in synth.qa:
                qa[q.clip].append(QA(q.prompt, q.target, q.answer, q.category))
            self.records = [
                VideoRecord(id=clip_id, video=clip_id, caption=synth.captions[i],
                            static_caption=synth.static_captions[i], qa=tuple(qa[i]),
                            pixels=synth.videos[i].numpy())
                for i, clip_id in enumerate(synth.ids)
            ]
        else:
            loaded = read_records(config.kind, config.path, num_clips=config.num_clips,
                                  video_dir=config.video_dir)
            self.records, self.skipped, self.store = loaded.records, loaded.skipped, loaded.store
        self.ids = [r.id for r in self.records]
        self.static_captions = [r.static_caption for r in self.records]
        self.captions = [r.caption for r in self.records]

    @property
    def in_memory(self) -> bool:
        return self.config.kind in IN_MEMORY

    def __len__(self) -> int:
        return len(self.records)

    def order(self, step: int, batch_size: int, seed: int) -> list[int]:
        return epoch_order(len(self.records), step, batch_size, seed)

    def examples(self, tasks: Sequence[str], *, task_major: bool = False) -> list[Example]:
        """(prompt, target) pairs: each clip's caption and/or its questions, clip by clip
        (``task_major``: every caption first, then every question)."""
        per_task = {
            "caption": [[Example(k, CAPTION_PROMPT, r.caption)] if r.caption else []
                        for k, r in enumerate(self.records)],
            "qa": [[Example(k, q.prompt, q.target) for q in r.qa] for k, r in enumerate(self.records)],
        }
        chosen = [t for t in TASKS if t in tasks]
        if task_major:
            out = [e for t in chosen for clip in per_task[t] for e in clip]
        else:
            out = [e for k in range(len(self.records)) for t in chosen for e in per_task[t][k]]
        if not out:
            raise InvalidInput(f"data: no {' or '.join(chosen)} examples in {self.config.path or 'the set'}")
        return out

    def feed(
        self, items: Sequence[int], views: dict[str, View], plan: Sequence[Sequence[int]], *,
        skips: SkipLog | None, substitute: bool = True,
    ) -> Feed:
        """The batches of ``plan`` (lists of positions in ``items``), decoded ahead."""
        dataset = VideoItems(self.records, list(items), views, store_uri=self.store, substitute=substitute)
        workers = 0 if self.in_memory else self.config.workers
        return Feed(dataset, plan, workers=workers, skips=skips)

    def skip_log(self, store, ranks: Dist) -> SkipLog:
        """``skipped.jsonl`` (rank r > 0: ``skipped.rank<r>.jsonl``) in ``store``; the source's
        malformed records are counted once, by rank 0."""
        key = SKIPPED_FILE if ranks.main else SKIPPED_FILE.replace(".jsonl", f".rank{ranks.rank}.jsonl")
        log_ = SkipLog(store, max_fraction=self.config.max_skip_fraction,
                       total=len(self.records) + len(self.skipped), key=key)
        if ranks.main and self.skipped:
            log_.record(self.skipped)
        return log_


class Feed:
    """Batches decoded ahead by worker processes, taken in plan order."""

    def __init__(self, dataset: VideoItems, plan: Sequence[Sequence[int]], *, workers: int,
                 skips: SkipLog | None) -> None:
        self.dataset = dataset
        self.skips = skips
        self._batches = load_batches(dataset, [list(p) for p in plan], workers=workers)

    def __iter__(self) -> Iterator[Fed]:
        return self

    def __next__(self) -> Fed:
        loaded = next(self._batches)
        if self.skips is not None:
            self.skips.add(loaded, self.dataset.records)
        good = [x for x in loaded if x.views is not None]
        records = [x.record for x in good]
        views = {k: torch.stack([x.views[k] for x in good]) if good else torch.empty(0, dtype=torch.uint8)
                 for k in self.dataset.views}
        return Fed([x.index for x in good], records, [self.dataset.records[r].id for r in records], views)

    def close(self) -> None:
        self._batches.close()


def epoch_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch over ``n`` examples: a fresh permutation each epoch.

    A function of (n, step, batch size, seed) only, so a resumed job continues
    the same sequence and data-parallel ranks agree on the global batch.
    """
    picks = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picks.append(int(order[offset]))
    return picks


@dataclass
class InstructionBatch:
    video: torch.Tensor
    """uint8 (B, F, H, W, 3): the student's view."""
    prompts: list[str]
    targets: list[str]
    ids: list[str]


class Instructions:
    """The (clip, prompt, target) examples of an instruction data section (stage 3, SFT).

    An example whose clip cannot be read gives way to the next example, so the
    prompt always belongs to the video it is asked about.
    """

    def __init__(self, config: InstructionDataConfig) -> None:
        self.config = config
        self.data = open_dataset(config)
        self.examples = self.data.examples(config.tasks)

    def __len__(self) -> int:
        return len(self.examples)

    def feed(self, plan: Sequence[Sequence[int]], skips: SkipLog | None) -> Iterator[InstructionBatch]:
        """The batches of ``plan`` (lists of example indices), decoded ahead."""
        feed = self.data.feed([e.record for e in self.examples], {"student": self.config.view}, plan,
                              skips=skips)
        try:
            for fed in feed:
                yield self.batch(fed)
        finally:
            feed.close()

    def batch(self, fed: Fed) -> InstructionBatch:
        chosen = [self.examples[i] for i in fed.items]
        return InstructionBatch(fed.views["student"], [e.prompt for e in chosen],
                                [e.target for e in chosen], fed.ids)

    def batches(self, batch_size: int, limit: int = 0, skips: SkipLog | None = None) -> Iterator[InstructionBatch]:
        """The first ``limit`` examples (0: all) in order, for evaluation."""
        n = min(limit or len(self), len(self))
        return self.feed([list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)], skips)


def open_dataset(config: DataConfig) -> ClipData:
    """The records a ``data`` config section names."""
    return ClipData(config)


def step_seed(seed: int, step: int) -> int:
    """The teacher's seed for one step: distinct across steps and runs."""
    return (seed << 32) | step


# --- ranks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun's rendezvous from the environment; world size 1 without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def global_mean(value: torch.Tensor, ranks: Dist) -> float:
    """The mean of a scalar over ranks (each rank holds the mean of an equal slice)."""
    if ranks.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ranks.world_size
    return value.item()
