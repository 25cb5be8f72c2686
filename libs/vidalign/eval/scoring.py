"""Accuracy per category, Overall and Average, the way MotionBench results are reported.

- **Overall** is micro accuracy over every scored question of the split: a
  question without an answer (empty output, missing video) counts as wrong.
- **Average** is the mean of the per-category accuracies (macro); MotionBench's
  official code has no such number, papers compute it themselves.
- Questions whose answer the benchmark withholds (MotionBench test "NA") are
  counted in ``unscorable`` and nowhere else. (The official script puts them
  in the denominator; see docs/papers.md, MotionBench.)
- **Control** categories (SynthMotion's "Static Attributes") are reported but
  left out of Overall and Average, so the motion numbers stay comparable with
  MotionBench's six categories.

:func:`score` also gives rates that are not accuracies: a pair's ``correct``
is any yes/no outcome (the video-substitution check's "same choice").
:func:`answer_distribution` counts which letter each answer picked, so a
model that always answers "D" shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY
from vidalign.errors import InvalidInput

CONTROL_CATEGORIES = (STATIC_CATEGORY,)


@dataclass(frozen=True)
class CategoryScore:
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class Score:
    """Per-category counts and the two summary accuracies (fractions in [0, 1])."""

    categories: dict[str, CategoryScore]
    """In MotionBench's order for its categories, then the others by name, controls last."""
    overall: float
    average: float
    n: int
    """Questions counted in ``overall``."""
    controls: tuple[str, ...]
    """Categories present but left out of ``overall`` and ``average``."""
    unscorable: int
    """Questions skipped because their answer is withheld."""


def order_categories(names: Iterable[str], controls: Iterable[str] = CONTROL_CATEGORIES) -> list[str]:
    """MotionBench's six first, in its order; then others alphabetically; controls last."""
    names, controls = set(names), list(controls)
    known = [c for c in MOTION_CATEGORIES if c in names]
    rest = sorted(names - set(known) - set(controls))
    return known + rest + [c for c in controls if c in names]


def score(
    outcomes: Iterable[tuple[str, bool | None]],
    *,
    controls: Iterable[str] = CONTROL_CATEGORIES,
) -> Score:
    """Score ``(category, correct)`` pairs; ``correct`` None marks a withheld answer."""
    controls = tuple(controls)
    counts: dict[str, list[int]] = {}
    unscorable = 0
    for category, correct in outcomes:
        if correct is None:
            unscorable += 1
            continue
        tally = counts.setdefault(category, [0, 0])
        tally[0] += 1
        tally[1] += bool(correct)
    categories = {
        c: CategoryScore(n=counts[c][0], correct=counts[c][1])
        for c in order_categories(counts, controls)
    }
    main = [s for c, s in categories.items() if c not in controls]
    n = sum(s.n for s in main)
    return Score(
        categories=categories,
        overall=sum(s.correct for s in main) / n if n else 0.0,
        average=sum(s.accuracy for s in main) / len(main) if main else 0.0,
        n=n,
        controls=tuple(c for c in controls if c in categories),
        unscorable=unscorable,
    )


NO_CHOICE = "none"
"""Answer-distribution key of answers that pick no option."""


def answer_distribution(
    choices: Iterable[tuple[str, str]],
    letters: Sequence[str],
    *,
    controls: Iterable[str] = CONTROL_CATEGORIES,
) -> dict[str, Any]:
    """How often each option letter was picked, per category and over all questions.

    ``choices`` are ``(category, letter)`` pairs, ``letter`` "" for no choice
    (counted under :data:`NO_CHOICE`). Every letter of ``letters`` gets a key,
    picked or not. Returns ``{"letters": [..., "none"], "all": {...},
    "categories": {category: {...}}}``, each ``{"n", "counts", "fractions"}``;
    "all" counts every question, controls included (unlike Overall).
    """
    keys = [*letters, NO_CHOICE]
    tallies: dict[str, dict[str, int]] = {}
    total = dict.fromkeys(keys, 0)
    for category, letter in choices:
        key = letter or NO_CHOICE
        if key not in total:
            raise InvalidInput(f"answer_distribution: {letter!r} is not one of {list(letters)}")
        tallies.setdefault(category, dict.fromkeys(keys, 0))[key] += 1
        total[key] += 1

    def summary(counts: dict[str, int]) -> dict[str, Any]:
        n = sum(counts.values())
        return {"n": n, "counts": counts,
                "fractions": {k: (v / n if n else 0.0) for k, v in counts.items()}}

    return {
        "letters": keys,
        "all": summary(total),
        "categories": {c: summary(tallies[c]) for c in order_categories(tallies, controls)},
    }
