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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY

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
