"""The records every loader returns, whatever the benchmark's own file format."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

LETTERS = "ABCDEFGHIJ"
"""Option letters by position."""


class MissingVideosWarning(UserWarning):
    """Some records name video files that do not exist; see ``LoadedSet.missing``."""


@dataclass(frozen=True)
class QAItem:
    """One benchmark question about one video."""

    uid: str
    """The benchmark's question id (MotionBench ``uid``, Video-MME ``question_id``, ...)."""
    video_path: Path
    question: str
    """The question alone; options, when the benchmark embeds them, are in ``options``."""
    options: list[str] | None
    """Option texts without their letters, in order (option k has letter ``LETTERS[k]``);
    None for open-ended questions."""
    answer: str | None
    """In the benchmark's own form: a letter (MotionBench, Video-MME, SEED-Bench), the
    option text (FAVOR-Bench) or free text (MSVD-QA, MSRVTT-QA). None where the
    benchmark withholds it (MotionBench test split "NA"): such an item can be
    answered but not scored."""
    category: str
    """Question type / task type, the unit of per-category accuracy."""
    source_file: str
    line: int
    """Line of ``source_file`` where the record starts (1-based)."""
    benchmark: str = ""
    """Loader name (see ``vidalign.data.benchmarks.QA_BENCHMARKS``); picks the prompt and
    the answer rule."""
    segment: tuple[float, float] | None = None
    """(start, end) seconds of the video the question is about; None: all of it."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Benchmark-specific fields kept for reports (Video-MME duration, domain, ...)."""

    @property
    def scorable(self) -> bool:
        return self.answer is not None

    @property
    def correct_option(self) -> str | None:
        """The right option's text, for multiple-choice items with a known answer."""
        if self.options is None or self.answer is None:
            return None
        if self.answer in self.options:
            return self.answer
        return self.options[LETTERS.index(self.answer)]

    @property
    def prompt(self) -> str:
        """What to give the model: the benchmark's own prompt (see ``prompts``)."""
        from vidalign.data.benchmarks.prompts import build_prompt  # prompts imports this module

        return build_prompt(self)


@dataclass(frozen=True)
class PreferenceItem:
    """A DPO-style record: one question, a preferred and a rejected answer (MotionVid-QA)."""

    uid: str
    video_path: Path
    question: str
    chosen: str
    rejected: str
    source_file: str
    line: int


@dataclass(frozen=True)
class CaptionItem:
    """A captioned clip with quality and motion scores (OpenVid-1M)."""

    uid: str
    """The video file name, unique in the CSV."""
    video_path: Path
    caption: str
    aesthetic_score: float | None
    motion_score: float | None
    temporal_consistency_score: float | None
    camera_motion: str | None
    frames: int | None
    fps: float | None
    seconds: float | None
    source_file: str
    line: int


T = TypeVar("T", QAItem, PreferenceItem, CaptionItem)


@dataclass
class LoadedSet(Generic[T]):
    """The records of one benchmark file, and what is wrong with them.

    Records whose video is missing stay in ``items`` (so per-split totals stay
    right) and their paths are listed in ``missing``; an evaluation either
    refuses to run or scores them as unanswered, never skips them silently.
    """

    name: str
    source: Path
    items: list[T]
    missing: list[Path] = field(default_factory=list)
    """Distinct video paths that records name but that do not exist, in first-seen order."""

    @property
    def unanswerable(self) -> list[str]:
        """uids whose answer the benchmark withholds (QA sets only)."""
        return [i.uid for i in self.items if getattr(i, "answer", "") is None]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)
