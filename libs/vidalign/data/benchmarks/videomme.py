"""Video-MME (BradyFU/Video-MME; HF lmms-lab/Video-MME), multiple choice, four options.

Two published layouts, both read here (per record, so a file may not mix them
by accident without the error naming the line):

- **flat rows**, the columns of the Hugging Face release (``videomme/test-*.parquet``;
  export it to JSON or JSON Lines, e.g. ``pandas.read_parquet(...).to_json(orient="records")``):
  ``video_id``, ``duration`` (short/medium/long), ``domain``, ``sub_category``,
  ``url``, ``videoID`` (the YouTube id, also the file name ``{videoID}.mp4``),
  ``question_id``, ``task_type``, ``question``, ``options`` (``"A. ..."``
  strings) and ``answer`` (a letter);
- **nested**, the official JSON of the README and ``evaluation/output_test_template.json``:
  per video ``video_id``, ``duration_category``/``duration``, ``video_category``,
  ``video_subcategory``/``video_sub_category``, ``url``, and ``questions``:
  [{question_id, task_type, question, choices (``"A. ..."``), answer}].
  The video file is ``{videoID}.mp4`` when the record has ``videoID``, else
  ``{video_id}.mp4``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vidalign.data.benchmarks._io import (
    VideoIndex,
    array_or_lines,
    need,
    string_list,
    text_field,
    video_root,
)
from vidalign.data.benchmarks.records import LETTERS, LoadedSet, QAItem
from vidalign.errors import InvalidInput

_LETTERED = re.compile(r"^\s*([A-D])\.\s*(.*)$", re.S)


def _options(raw: list[str], where: str) -> list[str]:
    """Option texts from ``["A. ...", "B. ...", ...]`` in letter order."""
    texts = []
    for k, option in enumerate(raw):
        match = _LETTERED.match(option)
        if not match or match.group(1) != LETTERS[k]:
            raise InvalidInput(f"{where}: options[{k}]: expected '{LETTERS[k]}. ...', got {option!r}")
        texts.append(match.group(2).strip())
    return texts


def _item(
    question: dict[str, Any], video: Path, extra: dict, where: str, path: Path, line: int
) -> QAItem:
    key = "options" if "options" in question else "choices"
    options = _options(string_list(question, key, where, minimum=4), where)
    answer = text_field(question, "answer", where).strip()
    if answer not in LETTERS[: len(options)]:
        last = LETTERS[len(options) - 1]
        raise InvalidInput(f"{where}: answer: expected a letter A-{last}, got {answer!r}")
    return QAItem(
        uid=text_field(question, "question_id", where),
        video_path=video,
        question=text_field(question, "question", where),
        options=options,
        answer=answer,
        category=text_field(question, "task_type", where),
        source_file=str(path),
        line=line,
        benchmark="videomme",
        extra=extra,
    )


def load_videomme(path: str | Path, video_dir: str | Path | None = None) -> LoadedSet[QAItem]:
    """Every question; videos are ``{videoID}.mp4`` in ``video_dir`` (default: the file's)."""
    path = Path(path)
    root = video_root(path, video_dir)
    videos = VideoIndex()
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for number, record in array_or_lines(path):
        where = f"{path}:{number}"
        if isinstance(record, dict) and "questions" in record:
            name = text_field(record, "videoID" if "videoID" in record else "video_id", where)
            extra = {
                "duration": record.get("duration_category", record.get("duration")),
                "domain": record.get("video_category"),
                "sub_category": record.get("video_subcategory", record.get("video_sub_category")),
            }
            video = videos.check(root / f"{name}.mp4")
            questions = need(record, "questions", list, where)
            found = [
                _item(q, video, extra, f"{where}: questions[{k}]", path, number)
                for k, q in enumerate(questions)
            ]
        else:
            name = text_field(record, "videoID", where)
            extra = {key: record.get(key) for key in ("duration", "domain", "sub_category")}
            found = [_item(record, videos.check(root / f"{name}.mp4"), extra, where, path, number)]
        for item in found:
            if item.uid in seen:
                first = seen[item.uid]
                raise InvalidInput(f"{where}: question_id {item.uid!r} already on line {first}")
            seen[item.uid] = number
        items += found
    return LoadedSet("videomme", path, items, videos.warn("videomme", path))
