"""MSVD-QA and MSRVTT-QA in Video-ChatGPT's layout (open-ended QA).

Two JSON arrays joined on ``question_id``: ``test_q.json``
[{video_name, question, question_id}] and ``test_a.json`` [{answer, type,
question_id}]. ``video_name`` has no extension in most releases (MSVD ships
.avi, MSRVTT .mp4), so the first existing file among :data:`VIDEO_EXTENSIONS`
is used. ``type`` (what / who / how ...) becomes the category when present.
"""

from __future__ import annotations

from pathlib import Path

from vidalign.data.benchmarks._io import VideoIndex, json_records, text_field, video_root
from vidalign.data.benchmarks.records import LoadedSet, QAItem
from vidalign.errors import InvalidInput

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def _video(root: Path, name: str) -> Path:
    if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
        return root / name
    for ext in VIDEO_EXTENSIONS:
        if (root / f"{name}{ext}").is_file():
            return root / f"{name}{ext}"
    return root / f"{name}{VIDEO_EXTENSIONS[0]}"


def load_videochatgpt_qa(
    path: str | Path,
    video_dir: str | Path | None = None,
    *,
    name: str = "msvd-qa",
    answers: str | Path | None = None,
) -> LoadedSet[QAItem]:
    """Questions joined with answers.

    ``path`` is ``test_q.json`` or a directory holding it; ``answers`` defaults
    to ``test_a.json`` beside it; videos are looked up in ``video_dir``
    (default: the questions' directory). ``name`` ("msvd-qa" or "msrvtt-qa")
    is recorded on every item.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "test_q.json"
    answers = Path(answers) if answers is not None else path.with_name("test_a.json")
    root = video_root(path, video_dir)

    by_id: dict[str, tuple[int, dict]] = {}
    for number, record in json_records(answers):
        where = f"{answers}:{number}"
        qid = text_field(record, "question_id", where)
        text_field(record, "answer", where)
        if qid in by_id:
            raise InvalidInput(f"{where}: question_id {qid!r} already on line {by_id[qid][0]}")
        by_id[qid] = (number, record)

    videos = VideoIndex()
    items: list[QAItem] = []
    asked: set[str] = set()
    for number, record in json_records(path):
        where = f"{path}:{number}"
        qid = text_field(record, "question_id", where)
        if qid in asked:
            raise InvalidInput(f"{where}: question_id {qid!r} appears twice")
        asked.add(qid)
        if qid not in by_id:
            raise InvalidInput(f"{where}: question_id {qid!r} has no answer in {answers}")
        _, answer = by_id[qid]
        items.append(QAItem(
            uid=qid,
            video_path=videos.check(_video(root, text_field(record, "video_name", where))),
            question=text_field(record, "question", where),
            options=None,
            answer=str(answer["answer"]),
            category=str(answer.get("type") or name),
            source_file=str(path),
            line=number,
            benchmark=name,
        ))
    unasked = sorted(set(by_id) - asked, key=lambda q: by_id[q][0])
    if unasked:
        line = by_id[unasked[0]][0]
        raise InvalidInput(
            f"{answers}:{line}: {len(unasked)} answers have no question in {path} "
            f"(first: question_id {unasked[0]!r})"
        )
    return LoadedSet(name, path, items, videos.warn(name, path))
