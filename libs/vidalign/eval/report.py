"""Result files: a JSON result per run, a markdown table comparing runs.

Functions return the dict or the text, and ``write_result`` also writes them
(plus the raw predictions) into a local directory; where that directory goes
(the object store) is the caller's business.

For a multiple-choice run the result also says whether the model reads the
video: accuracy by option likelihood next to the letter rule's
(:func:`comparison_table`, the ``likelihood`` key), the video-substitution
check (``substitution``) and which letters the answers picked
(:func:`distribution_table`, ``answer_distribution``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vidalign.data.benchmarks import LETTERS
from vidalign.data.synth import CATEGORY_CODES
from vidalign.eval.runner import EvalResult, Prediction
from vidalign.eval.scoring import NO_CHOICE, Score, answer_distribution, order_categories


def score_dict(s: Score) -> dict[str, Any]:
    """``n``, ``overall``, ``average``, per-category ``{n, correct, accuracy}``, ``controls``
    and ``unscorable`` of one :class:`Score`, JSON-serialisable."""
    return {
        "n": s.n,
        "overall": s.overall,
        "average": s.average,
        "categories": {
            c: {"n": cs.n, "correct": cs.correct, "accuracy": cs.accuracy}
            for c, cs in s.categories.items()
        },
        "controls": list(s.controls),
        "unscorable": s.unscorable,
    }


def _letters(predictions: list[Prediction]) -> str:
    """The option letters up to the last one any prediction picked or any answer key holds."""
    seen = {p.choice for p in predictions} | {p.answer_letter for p in predictions}
    seen |= {p.likelihood_choice for p in predictions}
    last = max((LETTERS.index(x) for x in seen if x), default=-1)
    return LETTERS[: last + 1]


def distributions(result: EvalResult) -> dict[str, Any] | None:
    """Which letter the answers picked, per category: by the letter rule (``letter``), by
    likelihood (``likelihood``, None when not run) and the answer key (``truth``); each
    as :func:`~vidalign.eval.scoring.answer_distribution`. None on open-ended benchmarks."""
    preds = result.predictions
    letters = _letters(preds)
    if not letters:
        return None
    return {
        "letter": answer_distribution(((p.category, p.choice) for p in preds), letters),
        "likelihood": (
            answer_distribution(((p.category, p.likelihood_choice) for p in preds), letters)
            if result.likelihood is not None else None
        ),
        "truth": answer_distribution(
            ((p.category, p.answer_letter) for p in preds if p.answer_letter), letters
        ),
    }


def result_dict(result: EvalResult, *, model: str | None = None) -> dict[str, Any]:
    """Per-category counts and accuracy, overall, average and n, JSON-serialisable.

    Beside the letter rule's numbers (top level): ``likelihood`` (the same fields
    by option likelihood, plus ``method``; None when not run), ``substitution``
    (the video-substitution check; None when not run) and ``answer_distribution``
    (:func:`distributions`).
    """
    out: dict[str, Any] = {
        "benchmark": result.benchmark,
        "model": model,
        **score_dict(result.score),
        "missing_videos": len(result.missing),
        "unreadable_videos": len(result.unreadable),
    }
    out["likelihood"] = (
        {**score_dict(result.likelihood), "method": result.likelihood_method}
        if result.likelihood is not None else None
    )
    sub = result.substitution
    out["substitution"] = None if sub is None else {
        "seed": sub.seed,
        "clips": len(sub.videos),
        "letter": {"accuracy": score_dict(sub.letter), "same_choice": score_dict(sub.letter_same)},
        "likelihood": None if sub.likelihood is None or sub.likelihood_same is None else {
            "accuracy": score_dict(sub.likelihood),
            "same_choice": score_dict(sub.likelihood_same),
        },
        "videos": sub.videos,
    }
    out["answer_distribution"] = distributions(result)
    if result.open_ended is not None:
        out["judge"] = {
            "n": result.open_ended.n,
            "yes": result.open_ended.yes,
            "accuracy": result.open_ended.accuracy,
            "score": result.open_ended.score,
        }
    return out


def _header(category: str) -> str:
    return CATEGORY_CODES.get(category, category)


def _pct(value: float, digits: int) -> str:
    return f"{100 * value:.{digits}f}"


def markdown_table(rows: Mapping[str, Score], *, digits: int = 2) -> str:
    """One row per run (e.g. baseline, +VDA, +MotionEnhancer), accuracies in percent.

    Columns: the categories (MotionBench's two-letter codes where they apply),
    Overall and Average, then control categories, which the summaries leave out.
    """
    if not rows:
        return ""
    names = {c for s in rows.values() for c in s.categories}
    controls = [c for s in rows.values() for c in s.controls]
    ordered = order_categories(names, dict.fromkeys(controls))
    main = [c for c in ordered if c not in controls]
    tail = [c for c in ordered if c in controls]
    head = ["run", *map(_header, main), "Overall", "Average", *map(_header, tail)]

    def pct(value: float) -> str:
        return _pct(value, digits)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, s in rows.items():
        cells = [pct(s.categories[c].accuracy) if c in s.categories else "-" for c in main]
        cells += [pct(s.overall), pct(s.average)]
        cells += [pct(s.categories[c].accuracy) if c in s.categories else "-" for c in tail]
        lines.append("| " + " | ".join([run, *cells]) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(result: EvalResult, *, digits: int = 2) -> str:
    """Per category, accuracy by the letter rule and by likelihood, in percent, side by side.

    With the video-substitution check, also each rule's accuracy with another
    clip's video and its same-choice rate. Rows: the categories (controls
    marked), then Overall and Average (motion only). "-": not run.
    """
    s, lk, sub = result.score, result.likelihood, result.substitution
    columns: list[tuple[str, Score | None]] = [("letter", s), ("likelihood", lk)]
    if sub is not None:
        columns += [
            ("letter, other video", sub.letter), ("likelihood, other video", sub.likelihood),
            ("same choice, letter", sub.letter_same),
            ("same choice, likelihood", sub.likelihood_same),
        ]

    def cell(value: float | None) -> str:
        return "-" if value is None else _pct(value, digits)

    def accuracy(score: Score | None, category: str) -> float | None:
        if score is None or category not in score.categories:
            return None
        return score.categories[category].accuracy

    head = ["category", "n", *(name for name, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for category, cs in s.categories.items():
        label = f"{category} (control)" if category in s.controls else category
        cells = [cell(accuracy(score, category)) for _, score in columns]
        lines.append("| " + " | ".join([label, str(cs.n), *cells]) + " |")
    for key in ("overall", "average"):
        cells = [cell(None if score is None else getattr(score, key)) for _, score in columns]
        lines.append("| " + " | ".join([key.capitalize(), str(s.n), *cells]) + " |")
    return "\n".join(lines) + "\n"


def distribution_table(result: EvalResult, *, digits: int = 0) -> str:
    """Per category and over all questions, the percent of answers per letter, by the letter
    rule, by likelihood and in the answer key ("" on open-ended benchmarks)."""
    dist = distributions(result)
    if dist is None:
        return ""
    rules = [(name, dist[key]) for name, key in
             (("letter rule", "letter"), ("likelihood", "likelihood"), ("answer key", "truth"))
             if dist[key] is not None]

    def cell(row: dict[str, Any] | None) -> str:
        if row is None or not row["n"]:
            return "-"
        return " · ".join(f"{k} {_pct(v, digits)}" for k, v in row["fractions"].items()
                          if k != NO_CHOICE or v)

    first = rules[0][1]
    head = ["answers (%)", "n", *(name for name, _ in rules)]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---|" * len(rules)]
    for category in [*first["categories"], None]:
        label = category or "all questions"
        row = first["all"] if category is None else first["categories"][category]
        cells = [cell(d["all"] if category is None else d["categories"].get(category))
                 for _, d in rules]
        lines.append("| " + " | ".join([label, str(row["n"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_result(
    result: EvalResult, out_dir: str | Path, *, name: str, model: str | None = None
) -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.predictions.jsonl`` (and
    ``{name}.skipped.jsonl``: the questions whose video could not be decoded, with the file,
    line and reason; ``{name}.substituted.jsonl``: the predictions with another clip's video,
    when the substitution check ran); return their paths.

    The markdown holds the run's row (:func:`markdown_table`) and, for a
    multiple-choice benchmark, :func:`comparison_table` and :func:`distribution_table`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{name}.json",
        "markdown": out / f"{name}.md",
        "predictions": out / f"{name}.predictions.jsonl",
    }
    markdown = markdown_table({model or name: result.score})
    if distributions(result) is not None:
        markdown += "\n" + comparison_table(result) + "\n" + distribution_table(result)
    contents = {
        "json": json.dumps(result_dict(result, model=model), indent=2) + "\n",
        "markdown": markdown,
        "predictions": _jsonl(result.predictions),
    }
    if result.substitution is not None:
        paths["substituted"] = out / f"{name}.substituted.jsonl"
        contents["substituted"] = _jsonl(result.substitution.predictions)
    if result.unreadable:
        paths["skipped"] = out / f"{name}.skipped.jsonl"
        contents["skipped"] = "".join(json.dumps(u) + "\n" for u in result.unreadable)
    for key, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(contents[key], encoding="utf-8")
        tmp.replace(path)
    return paths


def _jsonl(predictions: list[Prediction]) -> str:
    return "".join(json.dumps(asdict(p)) + "\n" for p in predictions)
