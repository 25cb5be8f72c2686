"""Answerers that need no model: checks on the data and the answer rules, and a floor.

- ``oracle`` answers from the ground truth. Any benchmark must score 100% on
  its scorable questions (less only for missing videos); anything else is a
  loader or answer-rule bug.
- ``first-option`` always picks the first option ("A"; the first option's
  text on FAVOR-Bench; "A" on open-ended QA): a chance-level floor that shows
  what answer-position bias alone is worth.
"""

from __future__ import annotations

import numpy as np

from vidalign.data.benchmarks import QAItem


def oracle(items: list[QAItem], videos: list[np.ndarray]) -> list[str]:
    return [(item.correct_option if item.benchmark == "favor" else item.answer) or "" for item in items]


def first_option(items: list[QAItem], videos: list[np.ndarray]) -> list[str]:
    return [item.options[0] if item.benchmark == "favor" else "A" for item in items]


BASELINES = {"oracle": oracle, "first-option": first_option}
