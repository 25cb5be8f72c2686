"""Run a model on a benchmark and score it.

The model side is an :data:`Answerer`: given a batch of questions and their
videos as uint8 ``(N, H, W, 3)`` frame arrays, it returns one text output per
question. It should build its input from ``item.prompt``, the benchmark's own
prompt (``vidalign.data.benchmarks.prompts``). Everything else (decoding,
batching, the answer rules, judging, per-category scores) happens here, so
every model is scored the same way.

Two optional checks of whether the model reads the video (off by default):

- ``option_scorer`` (an :class:`~vidalign.eval.likelihood.OptionScorer`, e.g.
  ``videollm_option_scorer(llm)``): each multiple-choice question is also
  scored by option likelihood (``vidalign.eval.likelihood``), reported as
  ``EvalResult.likelihood`` next to the letter rule's ``score``.
- ``substitute=True``: every question is asked again with another clip's video
  (a seeded derangement of the clips, ``vidalign.eval.substitution``), by the
  letter rule and (with an option scorer) by likelihood:
  ``EvalResult.substitution`` holds the same-choice rates and the accuracies.

Each prediction records the option it picked (``choice``, and
``likelihood_choice``), which the answer distribution of the result files counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidalign.data.benchmarks import LETTERS, OPEN_ENDED, QAItem
from vidalign.data.frames import decode_frames
from vidalign.errors import InvalidInput, NotFound
from vidalign.eval.answers import answer_letter, chosen_option, is_correct
from vidalign.eval.judges import ExactMatchJudge, Judge, OpenEndedRecord, OpenEndedScore, judge_all
from vidalign.eval.likelihood import OptionScorer, check_option_scores, choose_option
from vidalign.eval.scoring import Score, score
from vidalign.eval.substitution import derangement, same_choice
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
    choice: str = ""
    """The option letter the benchmark's rule reads from ``output`` ("" when none, and on
    open-ended benchmarks); see :func:`~vidalign.eval.answers.chosen_option`."""
    answer_letter: str = ""
    """The right option's letter ("" when withheld, and on open-ended benchmarks)."""
    option_scores: tuple[float, ...] | None = None
    """The option scorer's score of each option, in option order; None when not scored."""
    likelihood_choice: str = ""
    """The letter of the highest-scoring option (ties: the first); "" when not scored."""
    likelihood_correct: bool | None = None
    """Whether ``likelihood_choice`` is right; None when the answer is withheld or no
    likelihood was run, False for a question left unanswered (missing video) in a run with one."""


@dataclass(frozen=True)
class Substitution:
    """The video-substitution check (``evaluate(..., substitute=True)``)."""

    seed: int
    """Seed of the derangement."""
    videos: dict[str, str]
    """Each evaluated clip -> the clip whose video its questions got instead."""
    predictions: list[Prediction]
    """Every question answered with the other clip's video, in item order."""
    letter: Score
    """Letter-rule accuracy with the substituted videos."""
    letter_same: Score
    """Letter-rule same-choice rates (``CategoryScore.accuracy``: the fraction unchanged)
    over the questions answered both times."""
    likelihood: Score | None = None
    """Likelihood accuracy with the substituted videos; None without an option scorer."""
    likelihood_same: Score | None = None
    """Likelihood same-choice rates; None without an option scorer."""


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
    likelihood: Score | None = None
    """Accuracy by option likelihood (argmax of each question's option scores; an
    unanswered question counts as wrong); None when no option scorer ran."""
    likelihood_method: str = ""
    """What an option's score is (the scorer's ``method``), for the result files."""
    substitution: Substitution | None = None
    """The video-substitution check; None unless asked for."""


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
    option_scores: Mapping[str, Sequence[float]] | None = None,
    likelihood_method: str = "",
) -> EvalResult:
    """Score outputs already produced (uid -> text); an item without one is wrong.

    Open-ended benchmarks go through ``judge`` (default :class:`ExactMatchJudge`),
    with one result file per item under ``judge_dir`` when given. With
    ``option_scores`` (uid -> one score per option), multiple-choice items are
    also scored by likelihood (``EvalResult.likelihood``); an item without
    scores counts as wrong there.
    """
    if not items:
        raise InvalidInput("items: nothing to score")
    benchmark = _benchmark(items)
    texts = {item.uid: outputs.get(item.uid, "") for item in items}
    if len(texts) != len(items):
        raise InvalidInput(f"items: {len(items) - len(texts)} uids appear more than once")
    scores: dict[str, tuple[float, ...]] = {}
    if option_scores is not None:
        if benchmark in OPEN_ENDED:
            raise InvalidInput(f"option_scores: {benchmark} is open-ended; it has no options")
        by_uid = {item.uid: item for item in items}
        unknown = sorted(set(option_scores) - set(by_uid))
        if unknown:
            raise InvalidInput(f"option_scores: {len(unknown)} uids are not among the items "
                               f"(first: {unknown[0]!r})")
        scores = {uid: check_option_scores(by_uid[uid], v) for uid, v in option_scores.items()}
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
        _prediction(i, texts[i.uid], correct.get(i.uid), scores.get(i.uid),
                    likelihood_run=option_scores is not None)
        for i in items
    ]
    return EvalResult(
        benchmark=benchmark,
        predictions=predictions,
        score=score((p.category, p.correct) for p in predictions),
        open_ended=open_ended,
        missing=tuple(missing),
        unreadable=tuple(unreadable),
        likelihood=(score((p.category, p.likelihood_correct) for p in predictions)
                    if option_scores is not None else None),
        likelihood_method=likelihood_method if option_scores is not None else "",
    )


def _prediction(
    item: QAItem,
    output: str,
    correct: bool | None,
    scores: tuple[float, ...] | None,
    *,
    likelihood_run: bool,
) -> Prediction:
    """One question's record: the output, the option it picks by both rules, right or not."""
    if item.options is None or item.benchmark in OPEN_ENDED:
        return Prediction(item.uid, item.category, output, correct)
    truth = answer_letter(item)
    likelihood_choice, likelihood_correct = "", None
    if scores is not None:
        likelihood_choice = LETTERS[choose_option(scores)]
    if likelihood_run and item.scorable:
        likelihood_correct = likelihood_choice == truth  # unanswered ("") is wrong
    return Prediction(
        item.uid, item.category, output, correct,
        choice=chosen_option(item, output),
        answer_letter=truth,
        option_scores=scores,
        likelihood_choice=likelihood_choice,
        likelihood_correct=likelihood_correct,
    )


Clip = tuple[Path, tuple[float, float] | None]
"""A question's clip: its video file and segment (None: all of it)."""


def _clip(item: QAItem) -> Clip:
    return (item.video_path, item.segment)


def _clip_name(clip: Clip) -> str:
    path, segment = clip
    return str(path) if segment is None else f"{path}[{segment[0]:g}-{segment[1]:g}]"


@dataclass(frozen=True)
class _Answers:
    """What one pass over the questions got."""

    outputs: dict[str, str]
    option_scores: dict[str, list[float]]
    unreadable: dict[str, dict[str, str]]
    asked: list[QAItem]
    """The questions whose video decoded, in order."""


def _ask(
    todo: Sequence[QAItem],
    *,
    answerer: Answerer,
    option_scorer: OptionScorer | None,
    video_of: Callable[[QAItem], Clip],
    batch_size: int,
    frames: int,
    fps: float | None,
    desc: str,
    progress: bool,
) -> _Answers:
    """Ask every question of ``todo`` with the video of clip ``video_of(item)``, a batch at a time.

    Questions about one clip are adjacent, so only the last decoded clip is kept.
    """
    outputs: dict[str, str] = {}
    option_scores: dict[str, list[float]] = {}
    unreadable: dict[str, dict[str, str]] = {}
    asked: list[QAItem] = []
    cached: tuple[tuple, np.ndarray | str] | None = None
    with tqdm(total=len(todo), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, videos = [], []
            for item in todo[start : start + batch_size]:
                clip = video_of(item)
                key = (clip, frames, fps)
                if cached is None or cached[0] != key:
                    path, (begin, end) = clip[0], clip[1] or (None, None)
                    try:
                        video: np.ndarray | str = decode_frames(
                            path, num_frames=None if fps else frames, fps=fps, start=begin, end=end,
                        )
                    except (InvalidInput, NotFound) as err:
                        video = str(err).removeprefix("path: ").removeprefix(f"{str(path)!r} ")
                    cached = (key, video)
                if isinstance(cached[1], str):
                    unreadable[item.uid] = {"uid": item.uid, "file": str(clip[0]),
                                            "line": f"{item.source_file}:{item.line}",
                                            "reason": cached[1]}
                    continue
                batch.append(item)
                videos.append(cached[1])
            bar.update(len(todo[start : start + batch_size]))
            if not batch:
                continue
            asked += batch
            answers = answerer(batch, videos)
            if not isinstance(answers, list) or len(answers) != len(batch):
                got = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
                raise InvalidInput(f"answerer: expected a list of {len(batch)} outputs, got {got}")
            for item, answer in zip(batch, answers, strict=True):
                if not isinstance(answer, str):
                    kind = type(answer).__name__
                    raise InvalidInput(f"answerer: output for {item.uid} is {kind}, not str")
                outputs[item.uid] = answer
            if option_scorer is None:
                continue
            scored = option_scorer(batch, videos)
            if not isinstance(scored, list) or len(scored) != len(batch):
                got = f"{len(scored)} items" if isinstance(scored, list) else type(scored).__name__
                raise InvalidInput(f"option scorer: expected a list of {len(batch)} score lists, "
                                   f"got {got}")
            for item, values in zip(batch, scored, strict=True):
                option_scores[item.uid] = values  # checked by score_outputs
    return _Answers(outputs, option_scores, unreadable, asked)


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
    option_scorer: OptionScorer | None = None,
    substitute: bool = False,
    substitute_seed: int = 0,
) -> EvalResult:
    """Ask ``answerer`` every question of one benchmark, ``batch_size`` at a time, and score.

    Each video is decoded to ``frames`` uniform frames (or sampled at ``fps``
    when given) within the item's segment. Items whose video is missing raise
    NotFound, unless ``skip_missing``, which scores them as unanswered. A video
    that exists but cannot be decoded (cut short, damaged) is scored as
    unanswered and listed in ``EvalResult.unreadable``; the run goes on.

    Multiple-choice benchmarks only:

    - ``option_scorer`` also scores every question by option likelihood, on the
      same batches and videos (``EvalResult.likelihood``).
    - ``substitute=True`` asks every answered question again with another
      clip's video, clip ``i`` getting clip ``pi(i)``'s, ``pi`` the derangement
      of the answered clips (in order of first appearance) drawn with
      ``substitute_seed`` (``EvalResult.substitution``). It doubles the cost.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if not items:
        raise InvalidInput("items: nothing to evaluate")
    benchmark = _benchmark(items)
    if benchmark in OPEN_ENDED and (option_scorer is not None or substitute):
        what = "option_scorer" if option_scorer is not None else "substitute"
        raise InvalidInput(f"{what}: {benchmark} is open-ended; likelihood scoring and the "
                           "video-substitution check need multiple-choice options")
    if substitute and (isinstance(substitute_seed, bool) or not isinstance(substitute_seed, int)):
        raise InvalidInput(f"substitute_seed: expected an integer, got {substitute_seed!r}")
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
    if substitute and len({_clip(i) for i in todo}) < 2:
        raise InvalidInput("substitute: the video-substitution check needs at least 2 clips with "
                           f"videos; {benchmark} has {len({_clip(i) for i in todo})}")

    ask = partial(_ask, answerer=answerer, option_scorer=option_scorer, batch_size=batch_size,
                  frames=frames, fps=fps, progress=progress)
    own = ask(todo, video_of=_clip, desc=benchmark)
    if own.unreadable:
        log.warning("eval_unreadable_videos", benchmark=benchmark, questions=len(own.unreadable),
                    first=next(iter(own.unreadable.values())))
    method = "" if option_scorer is None else getattr(
        option_scorer, "method", "the option scorer's scores (it states no method)")
    result = score_outputs(
        items, own.outputs, judge=judge, judge_dir=judge_dir,
        missing=[i.uid for i in absent], unreadable=list(own.unreadable.values()), progress=progress,
        option_scores=own.option_scores if option_scorer is not None else None,
        likelihood_method=method,
    )
    if not substitute:
        return result

    clips = list(dict.fromkeys(_clip(i) for i in own.asked))
    swap = dict(zip(clips, (clips[j] for j in derangement(len(clips), substitute_seed)), strict=True))
    other = ask(own.asked, video_of=lambda item: swap[_clip(item)], desc=f"{benchmark}, other videos")
    swapped = score_outputs(
        items, other.outputs,
        option_scores=other.option_scores if option_scorer is not None else None,
        likelihood_method=method,
    )
    both = [(p, q) for p, q in zip(result.predictions, swapped.predictions, strict=True)
            if p.uid in own.outputs and q.uid in other.outputs]
    substitution = Substitution(
        seed=substitute_seed,
        videos={_clip_name(a): _clip_name(b) for a, b in swap.items()},
        predictions=swapped.predictions,
        letter=swapped.score,
        letter_same=same_choice((p.category, p.choice, q.choice) for p, q in both),
        likelihood=swapped.likelihood,
        likelihood_same=(
            same_choice((p.category, p.likelihood_choice, q.likelihood_choice) for p, q in both)
            if option_scorer is not None else None
        ),
    )
    return replace(result, substitution=substitution)


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
