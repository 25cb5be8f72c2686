"""FAVOR-Bench close-ended QA (HF zl2048/FAVOR; reference code FAVOR-Bench/FAVOR-Bench).

A JSON array, one object per video: ``video_name`` (the file is
``{video_name}.mp4``) and ``questions``: [{question, options (full option
strings, usually five), correct_answer (the right option's TEXT), task_type
(AS, HAC, SAD, MAD, CM, NSM)}]. Questions have no ids; ours are
``f"{video_name}-{k}"``.
"""

from __future__ import annotations

from pathlib import Path

from vidalign.data.benchmarks._io import (
    VideoIndex,
    json_records,
    need,
    string_list,
    text_field,
    video_root,
)
from vidalign.data.benchmarks.records import LoadedSet, QAItem
from vidalign.errors import InvalidInput


def load_favor(path: str | Path, video_dir: str | Path | None = None) -> LoadedSet[QAItem]:
    """Every close-ended question; videos are looked up in ``video_dir`` (default: the file's)."""
    path = Path(path)
    root = video_root(path, video_dir)
    videos = VideoIndex()
    items: list[QAItem] = []
    for number, record in json_records(path):
        where = f"{path}:{number}"
        name = text_field(record, "video_name", where)
        video = videos.check(root / f"{name}.mp4")
        for k, question in enumerate(need(record, "questions", list, where)):
            at = f"{where}: video {name!r}, questions[{k}]"
            options = string_list(question, "options", at)
            correct = text_field(question, "correct_answer", at)
            if correct not in options:
                raise InvalidInput(f"{at}: correct_answer {correct!r} is not one of the options")
            items.append(QAItem(
                uid=f"{name}-{k}",
                video_path=video,
                question=text_field(question, "question", at),
                options=options,
                answer=correct,
                category=text_field(question, "task_type", at),
                source_file=str(path),
                line=number,
                benchmark="favor",
            ))
    return LoadedSet("favor", path, items, videos.warn("favor", path))
