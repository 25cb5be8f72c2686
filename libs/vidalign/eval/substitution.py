"""The video-substitution check: does the model's answer depend on the video?

Each question is asked a second time with another clip's video in place of its
own: clip ``i`` gets clip ``pi(i)``'s video, ``pi`` a seeded derangement (a
permutation with no fixed points, so no question sees its own video) of the
evaluated clips. Per category, the check reports

- the **same-choice rate**: the fraction of questions whose chosen option is
  unchanged (by the letter rule, and by likelihood);
- the **accuracy with the substituted video**, by both rules.

A model that reads the video changes its choices and drops toward chance; one
that ignores it keeps them (rate near 1.0) and keeps its accuracy. The runner
(:func:`vidalign.eval.evaluate`, ``substitute=True``) runs it; the pieces here
are pure.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vidalign.errors import InvalidInput
from vidalign.eval.scoring import CONTROL_CATEGORIES, Score, score


def derangement(n: int, seed: int) -> list[int]:
    """A permutation ``pi`` of ``range(n)`` with ``pi[i] != i`` for every ``i``, fixed by ``seed``.

    Uniform over derangements: uniform permutations (``numpy.random.default_rng(seed)``)
    are drawn until one has no fixed point (about e ~ 2.7 draws on average).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidInput(f"derangement: needs at least 2 clips to swap videos between, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInput(f"substitute_seed: expected an integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    while True:
        pi = rng.permutation(n)
        if not np.any(pi == np.arange(n)):
            return [int(j) for j in pi]


def same_choice(
    pairs: Iterable[tuple[str, str, str]], *, controls: Iterable[str] = CONTROL_CATEGORIES
) -> Score:
    """Same-choice rates from ``(category, choice with own video, choice with another)``.

    A :class:`Score` whose per-category ``accuracy`` is the fraction of unchanged
    choices (Overall and Average as for accuracy: controls left out). "No
    choice" both times counts as unchanged: the answer did not depend on the video.
    """
    return score(((c, own == other) for c, own, other in pairs), controls=controls)
