"""MotionBench (THUDM/MotionBench): ``video_info.meta.jsonl`` plus video files.

One line per video: ``key``, ``video_path``, ``video_type``, ``question_type``
(one of six, for every question of the line), ``video_info`` {duration, fps,
resolution} and ``qa``: [{uid, question, answer, start, end}]. ``question`` is
the stem followed by one ``"A. option"`` line per option; ``answer`` is a
letter, or ``"NA"`` in the test split, where answers are withheld: those items
load with ``answer=None`` and are listed by ``LoadedSet.unanswerable``.

SynthMotion writes this layout too (with the extra question type
``"Static Attributes"``), so both load here.
"""

from __future__ import annotations

import re
from pathlib import Path

from vidalign.data.benchmarks._io import VideoIndex, jsonl_records, need, text_field, video_root
from vidalign.data.benchmarks.records import LETTERS, LoadedSet, QAItem
from vidalign.errors import InvalidInput

META_FILE = "video_info.meta.jsonl"
WITHHELD = "NA"

_OPTION = re.compile(r"^\s*\(?([A-J])[.)]\s*(.*)$")


def split_options(question: str, where: str) -> tuple[str, list[str]]:
    """(stem, option texts) of a question whose options are ``"A. ..."`` lines.

    Lines after an option line that do not start a new option continue it.
    """
    stem: list[str] = []
    options: list[str] = []
    for line in question.split("\n"):
        match = _OPTION.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            options.append(match.group(2).strip())
        elif options:
            options[-1] = f"{options[-1]}\n{line}".strip()
        else:
            stem.append(line)
    if len(options) < 2:
        raise InvalidInput(
            f"{where}: question: expected a stem and at least two 'A. ...' option lines, "
            f"got {question[:120]!r}"
        )
    return "\n".join(stem).strip(), options


def load_motionbench(path: str | Path, video_dir: str | Path | None = None) -> LoadedSet[QAItem]:
    """Every QA of a MotionBench meta file (or of the directory holding one).

    Relative ``video_path`` values resolve against ``video_dir`` (default: the
    meta file's directory).
    """
    path = Path(path)
    if path.is_dir():
        path = path / META_FILE
    root = video_root(path, video_dir)
    videos = VideoIndex()
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        video = Path(text_field(record, "video_path", where))
        category = text_field(record, "question_type", where)
        qas = need(record, "qa", list, where)
        text_field(record, "key", where)
        video = videos.check(video if video.is_absolute() else root / video)
        for k, qa in enumerate(qas):
            at = f"{where}: qa[{k}]"
            uid = text_field(qa, "uid", at)
            if uid in seen:
                raise InvalidInput(f"{at}: uid {uid!r} already appears on line {seen[uid]}")
            seen[uid] = number
            raw = text_field(qa, "question", at)
            stem, options = split_options(raw, at)
            answer = text_field(qa, "answer", at).strip()
            if answer != WITHHELD and answer not in LETTERS[: len(options)]:
                raise InvalidInput(
                    f"{at}: answer: expected one of {list(LETTERS[: len(options)])} or "
                    f"{WITHHELD!r}, got {answer!r}"
                )
            items.append(QAItem(
                uid=uid,
                video_path=video,
                question=stem,
                options=options,
                answer=None if answer == WITHHELD else answer,
                category=category,
                source_file=str(path),
                line=number,
                benchmark="motionbench",
                extra={
                    "raw_question": raw,
                    "key": record["key"],
                    "start": qa.get("start"),
                    "end": qa.get("end"),
                },
            ))
    return LoadedSet("motionbench", path, items, videos.warn("motionbench", path))
