"""SEED-Bench (v1) video dimensions 10-12 (AILab-CVC/SEED-Bench, ``SEED-Bench.json``).

``{"questions": [...], "question_type": {"Action Recognition": 10, ...}}``;
each question has ``question``, ``choice_a``..``choice_d``, ``answer`` (a
letter), ``data_id`` (a path relative to the dimension's video root),
``data_type`` ("image" or "video"), ``question_id`` and ``question_type_id``.
Only ``data_type == "video"`` records load. ``segment`` is [start, end] in
seconds for dimension 11 (Epic-Kitchens) and in frames at 15 fps for dimension
12 (Breakfast), per the repository's DATASET.md; both become seconds here.

The official ``eval.py`` keeps one root per dimension (SSv2, Epic-Kitchens,
Breakfast); pass ``video_dir`` as a mapping {dimension: root} for that, or one
directory for all. SEED-Bench-2's "Video" items are lists of frame images,
not videos, and are not read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vidalign.data.benchmarks._io import VideoIndex, json_records, need, text_field, video_root
from vidalign.data.benchmarks.records import LETTERS, LoadedSet, QAItem
from vidalign.errors import InvalidInput

VIDEO_DIMENSIONS = {10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding"}
BREAKFAST_FPS = 15
"""Dimension 12 segments count frames of the 15 fps Breakfast videos."""


def load_seedbench_video(
    path: str | Path, video_dir: str | Path | Mapping[int, str | Path] | None = None
) -> LoadedSet[QAItem]:
    """The video questions of ``SEED-Bench.json``."""
    path = Path(path)
    if isinstance(video_dir, Mapping):
        roots = {int(k): Path(v) for k, v in video_dir.items()}
    else:
        root = video_root(path, video_dir)
        roots = dict.fromkeys(VIDEO_DIMENSIONS, root)
    videos = VideoIndex()
    items: list[QAItem] = []
    for number, record in json_records(path, key="questions"):
        where = f"{path}:{number}"
        if text_field(record, "data_type", where) != "video":
            continue
        dimension = need(record, "question_type_id", int, where)
        if dimension not in VIDEO_DIMENSIONS:
            raise InvalidInput(
                f"{where}: question_type_id: expected 10, 11 or 12 for a video, got {dimension}"
            )
        if dimension not in roots:
            raise InvalidInput(f"video_dir: no root for dimension {dimension} (needed by {where})")
        answer = text_field(record, "answer", where)
        if answer not in LETTERS[:4]:
            raise InvalidInput(f"{where}: answer: expected A, B, C or D, got {answer!r}")
        segment = None
        if "segment" in record:
            bounds = need(record, "segment", list, where)
            if len(bounds) != 2 or not all(isinstance(b, int | float) for b in bounds):
                raise InvalidInput(f"{where}: segment: expected [start, end], got {bounds!r}")
            scale = 1 / BREAKFAST_FPS if dimension == 12 else 1.0
            segment = (bounds[0] * scale, bounds[1] * scale)
        items.append(QAItem(
            uid=text_field(record, "question_id", where),
            video_path=videos.check(roots[dimension] / text_field(record, "data_id", where)),
            question=text_field(record, "question", where),
            options=[text_field(record, f"choice_{c}", where) for c in "abcd"],
            answer=answer,
            category=VIDEO_DIMENSIONS[dimension],
            source_file=str(path),
            line=number,
            benchmark="seedbench-video",
            segment=segment,
        ))
    return LoadedSet("seedbench-video", path, items, videos.warn("seedbench-video", path))
