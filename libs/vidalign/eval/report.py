"""Result files: a JSON result per run, a markdown table comparing runs.

Functions return the dict or the text, and ``write_result`` also writes them
(plus the raw predictions) into a local directory; where that directory goes
(the object store) is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vidalign.data.synth import CATEGORY_CODES
from vidalign.eval.runner import EvalResult
from vidalign.eval.scoring import Score, order_categories


def result_dict(result: EvalResult, *, model: str | None = None) -> dict[str, Any]:
    """Per-category counts and accuracy, overall, average and n, JSON-serialisable."""
    s = result.score
    out: dict[str, Any] = {
        "benchmark": result.benchmark,
        "model": model,
        "n": s.n,
        "overall": s.overall,
        "average": s.average,
        "categories": {
            c: {"n": cs.n, "correct": cs.correct, "accuracy": cs.accuracy}
            for c, cs in s.categories.items()
        },
        "controls": list(s.controls),
        "unscorable": s.unscorable,
        "missing_videos": len(result.missing),
        "unreadable_videos": len(result.unreadable),
    }
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
        return f"{100 * value:.{digits}f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, s in rows.items():
        cells = [pct(s.categories[c].accuracy) if c in s.categories else "-" for c in main]
        cells += [pct(s.overall), pct(s.average)]
        cells += [pct(s.categories[c].accuracy) if c in s.categories else "-" for c in tail]
        lines.append("| " + " | ".join([run, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_result(
    result: EvalResult, out_dir: str | Path, *, name: str, model: str | None = None
) -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.predictions.jsonl`` (and
    ``{name}.skipped.jsonl``: the questions whose video could not be decoded, with the file,
    line and reason); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{name}.json",
        "markdown": out / f"{name}.md",
        "predictions": out / f"{name}.predictions.jsonl",
    }
    contents = {
        "json": json.dumps(result_dict(result, model=model), indent=2) + "\n",
        "markdown": markdown_table({model or name: result.score}),
        "predictions": "".join(json.dumps(asdict(p)) + "\n" for p in result.predictions),
    }
    if result.unreadable:
        paths["skipped"] = out / f"{name}.skipped.jsonl"
        contents["skipped"] = "".join(json.dumps(u) + "\n" for u in result.unreadable)
    for key, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(contents[key], encoding="utf-8")
        tmp.replace(path)
    return paths
