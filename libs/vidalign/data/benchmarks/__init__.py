"""Benchmark and dataset loaders: each reads its benchmark's own files into one record type.

QA benchmarks load into :class:`QAItem` (``load_benchmark(name, path)``);
MotionVid-QA into :class:`PreferenceItem`; OpenVid-1M into :class:`CaptionItem`.
Every loader returns a :class:`LoadedSet`: malformed records raise
``InvalidInput`` naming the file and line; missing videos are listed in
``LoadedSet.missing`` with a :class:`MissingVideosWarning`, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from vidalign.data.benchmarks.favor import load_favor
from vidalign.data.benchmarks.motionbench import load_motionbench
from vidalign.data.benchmarks.motionvid import load_motionvid_qa
from vidalign.data.benchmarks.openvid import load_openvid
from vidalign.data.benchmarks.prompts import build_prompt
from vidalign.data.benchmarks.records import (
    LETTERS,
    CaptionItem,
    LoadedSet,
    MissingVideosWarning,
    PreferenceItem,
    QAItem,
)
from vidalign.data.benchmarks.seedbench import load_seedbench_video
from vidalign.data.benchmarks.videochatgpt import load_videochatgpt_qa
from vidalign.data.benchmarks.videomme import load_videomme
from vidalign.errors import InvalidInput

QA_BENCHMARKS: dict[str, Callable[..., LoadedSet[QAItem]]] = {
    "motionbench": load_motionbench,
    "favor": load_favor,
    "msvd-qa": partial(load_videochatgpt_qa, name="msvd-qa"),
    "msrvtt-qa": partial(load_videochatgpt_qa, name="msrvtt-qa"),
    "videomme": load_videomme,
    "seedbench-video": load_seedbench_video,
}
"""Loader per QA benchmark name. SynthMotion is read by "motionbench"."""

OPEN_ENDED = frozenset({"msvd-qa", "msrvtt-qa"})
"""Benchmarks whose answers are free text, judged by a ``vidalign.eval`` judge."""


def load_benchmark(
    name: str, path: str | Path, *, video_dir: str | Path | None = None
) -> LoadedSet[QAItem]:
    """Load a QA benchmark by name from its own files (see each loader for the layout)."""
    if name not in QA_BENCHMARKS:
        raise InvalidInput(f"name: expected one of {sorted(QA_BENCHMARKS)}, got {name!r}")
    return QA_BENCHMARKS[name](path, video_dir)


__all__ = [
    "LETTERS",
    "OPEN_ENDED",
    "QA_BENCHMARKS",
    "CaptionItem",
    "LoadedSet",
    "MissingVideosWarning",
    "PreferenceItem",
    "QAItem",
    "build_prompt",
    "load_benchmark",
    "load_favor",
    "load_motionbench",
    "load_motionvid_qa",
    "load_openvid",
    "load_seedbench_video",
    "load_videochatgpt_qa",
    "load_videomme",
]
