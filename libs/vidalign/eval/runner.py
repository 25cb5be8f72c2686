"""Run a model on a benchmark and score it.

The model side is an :data:`Answerer`: given a batch of questions and their
videos as uint8 ``(N, H, W, 3)`` frame arrays, it returns one text output per
question. It should build its input from ``item.prompt``, the benchmark's own
prompt (``vidalign.data.benchmarks.prompts``). Everything else (decoding,
batching, the answer rules, judging, per-category scores) happens here, so
every model is scored the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidalign.data.benchmarks import OPEN_ENDED, QAItem
from vidalign.data.frames import decode_frames
from vidalign.errors import InvalidInput, NotFound
from vidalign.eval.answers import is_correct
from vidalign.eval.judges import ExactMatchJudge, Judge, OpenEndedRecord, OpenEndedScore, judge_all
from vidalign.eval.scoring import Score, score
from vidalign.log import get_logger

log = get_logger(__name__)

Answerer = Callable[[list[QAItem], list[np.ndarray]], list[str]]
"""``answerer(items, videos) -> outputs``: one output per item, in order."""


@dataclass(frozen=True)
class Prediction:
    uid: str
    category: str
    output: str
    """The model's text; "" when it was not asked (missing video) or gave nothing."""
    correct: bool | None
    """None when the benchmark withholds the answer."""


@dataclass(frozen=True)
class EvalResult:
    benchmark: str
    predictions: list[Prediction]
    score: Score
    open_ended: OpenEndedScore | None = None
    """Judge accuracy and mean score, for open-ended benchmarks."""
    missing: tuple[str, ...] = ()
    """uids scored as unanswered because their video is missing."""
    unreadable: tuple[dict[str, str], ...] = ()
    """Questions scored as unanswered because their video could not be decoded:
    ``{uid, file, line, reason}`` each (``skipped.jsonl`` of ``write_result``)."""


def _benchmark(items: Sequence[QAItem]) -> str:
    names = {item.benchmark for item in items}
    if len(names) != 1:
        raise InvalidInput(f"items: expected one benchmark, got {sorted(names)}")
    return names.pop()


def score_outputs(
    items: Sequence[QAItem],
    outputs: Mapping[str, str],
    *,
    judge: Judge | None = None,
    judge_dir: str | Path | None = None,
    missing: Sequence[str] = (),
    unreadable: Sequence[dict[str, str]] = (),
    progress: bool = False,
) -> EvalResult:
    """Score outputs already produced (uid -> text); an item without one is wrong.

    Open-ended benchmarks go through ``judge`` (default :class:`ExactMatchJudge`),
    with one result file per item under ``judge_dir`` when given.
    """
    if not items:
        raise InvalidInput("items: nothing to score")
    benchmark = _benchmark(items)
    texts = {item.uid: outputs.get(item.uid, "") for item in items}
    if len(texts) != len(items):
        raise InvalidInput(f"items: {len(items) - len(texts)} uids appear more than once")
    open_ended = None
    if benchmark in OPEN_ENDED:
        scorable = [i for i in items if i.scorable]
        open_ended = judge_all(
            [OpenEndedRecord(i.uid, i.question, i.answer, texts[i.uid]) for i in scorable],
            judge or ExactMatchJudge(),
            judge_dir,
            progress=progress,
        )
        correct = {uid: v.pred == "yes" for uid, v in open_ended.verdicts.items()}
    else:
        correct = {i.uid: is_correct(i, texts[i.uid]) for i in items if i.scorable}
    predictions = [
        Prediction(i.uid, i.category, texts[i.uid], correct.get(i.uid)) for i in items
    ]
    return EvalResult(
        benchmark=benchmark,
        predictions=predictions,
        score=score((p.category, p.correct) for p in predictions),
        open_ended=open_ended,
        missing=tuple(missing),
        unreadable=tuple(unreadable),
    )


def evaluate(
    items: Sequence[QAItem],
    answerer: Answerer,
    *,
    batch_size: int = 8,
    frames: int = 16,
    fps: float | None = None,
    progress: bool = True,
    skip_missing: bool = False,
    judge: Judge | None = None,
    judge_dir: str | Path | None = None,
) -> EvalResult:
    """Ask ``answerer`` every question of one benchmark, ``batch_size`` at a time, and score.

    Each video is decoded to ``frames`` uniform frames (or sampled at ``fps``
    when given) within the item's segment. Items whose video is missing raise
    NotFound, unless ``skip_missing``, which scores them as unanswered. A video
    that exists but cannot be decoded (cut short, damaged) is scored as
    unanswered and listed in ``EvalResult.unreadable``; the run goes on.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if not items:
        raise InvalidInput("items: nothing to evaluate")
    benchmark = _benchmark(items)
    exists: dict[Path, bool] = {}
    for item in items:
        if item.video_path not in exists:
            exists[item.video_path] = item.video_path.is_file()
    absent = [i for i in items if not exists[i.video_path]]
    if absent and not skip_missing:
        raise NotFound(
            f"{len(absent)} of {len(items)} {benchmark} questions name missing videos "
            f"(first: {absent[0].video_path}); the loaded set's .missing lists them, "
            "skip_missing=True scores them as unanswered"
        )
    todo = [i for i in items if exists[i.video_path]]

    outputs: dict[str, str] = {}
    unreadable: dict[str, dict[str, str]] = {}
    cached: tuple[tuple, np.ndarray | str] | None = None  # questions about one video are adjacent
    with tqdm(total=len(todo), desc=benchmark, unit="q", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, videos = [], []
            for item in todo[start : start + batch_size]:
                key = (item.video_path, item.segment, frames, fps)
                if cached is None or cached[0] != key:
                    begin, end = item.segment or (None, None)
                    try:
                        video: np.ndarray | str = decode_frames(
                            item.video_path,
                            num_frames=None if fps else frames,
                            fps=fps,
                            start=begin,
                            end=end,
                        )
                    except (InvalidInput, NotFound) as err:
                        video = str(err).removeprefix("path: ").removeprefix(
                            f"{str(item.video_path)!r} ")
                    cached = (key, video)
                if isinstance(cached[1], str):
                    unreadable[item.uid] = {"uid": item.uid, "file": str(item.video_path),
                                            "line": f"{item.source_file}:{item.line}",
                                            "reason": cached[1]}
                    continue
                batch.append(item)
                videos.append(cached[1])
            bar.update(len(todo[start : start + batch_size]))
            if not batch:
                continue
            answers = answerer(batch, videos)
            if not isinstance(answers, list) or len(answers) != len(batch):
                got = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
                raise InvalidInput(f"answerer: expected a list of {len(batch)} outputs, got {got}")
            for item, answer in zip(batch, answers, strict=True):
                if not isinstance(answer, str):
                    kind = type(answer).__name__
                    raise InvalidInput(f"answerer: output for {item.uid} is {kind}, not str")
                outputs[item.uid] = answer
    if unreadable:
        log.warning("eval_unreadable_videos", benchmark=benchmark, questions=len(unreadable),
                    first=next(iter(unreadable.values())))
    return score_outputs(
        items, outputs, judge=judge, judge_dir=judge_dir,
        missing=[i.uid for i in absent], unreadable=list(unreadable.values()), progress=progress,
    )


def read_outputs(path: str | Path) -> dict[str, str]:
    """uid -> output from a JSON Lines file of model outputs.

    Reads the predictions ``write_result`` writes ({uid, output, ...}) and
    Video-ChatGPT's predictions ({id, pred, ...}), so saved outputs can be
    scored again, e.g. with the LLM judge once an endpoint is available.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: predictions file does not exist")
    outputs: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(f"{path}:{number}: not valid JSON ({err.msg})") from None
            uid = record.get("uid", record.get("id")) if isinstance(record, dict) else None
            output = record.get("output", record.get("pred")) if isinstance(record, dict) else None
            if uid is None or not isinstance(output, str):
                raise InvalidInput(f"{path}:{number}: expected {{uid, output}} or {{id, pred}}")
            if str(uid) in outputs:
                raise InvalidInput(f"{path}:{number}: uid {uid!r} appears twice")
            outputs[str(uid)] = output
    return outputs
