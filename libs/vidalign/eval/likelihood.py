"""Option-likelihood scoring: which option does the model find most likely, given the video?

The letter rule (``vidalign.eval.answers``) scores what the model *generates*:
it has to copy the right letter, and a model that always writes "D" is right a
quarter of the time whatever the video shows. Likelihood scoring asks the model
nothing to generate: each option's answer text is teacher-forced as the reply
to the same prompt with the same video, and the option it gives the highest
score is its prediction. SEED-Bench ranks options this way (GPT-3's answer
ranking: its reference interface takes the mean token loss of each choice's
text and picks the lowest).

**The score of an option** (:class:`VideoLLMOptionScorer`) is the **mean
log-probability per token** of the option's text, scored as the first tokens of
the assistant's reply, after the benchmark's own prompt (the one the letter
rule gets, options and instruction included) and the video. One forward pass
per (question, option) row, batched, under ``no_grad``. It is length-normalised
because options differ in length ("spins" is one token, "moves back and forth"
four): every token adds a negative log-probability, so the sum favours short
options whatever the video; the mean compares per-token fit, as SEED-Bench's
mean token loss does. ``normalize="sum"`` gives the unnormalised total. The
end-of-turn token is not scored (the question is which text, not where the
reply stops); ``continuation`` changes the scored text (e.g. ``"{letter}.
{option}"``, or a student's training format ``"{option} ({letter})"``).

**The prediction** is the argmax of the option scores (:func:`choose_option`);
exact ties go to the first option (lowest index), so a result never depends on
anything but the scores.

Any callable with the :class:`OptionScorer` signature can be scored the same
way; the runner checks what it returns (one finite or ``-inf`` score per
option of every item).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vidalign.data.benchmarks import LETTERS, QAItem
from vidalign.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from vidalign.students.videollm import VideoLLM

NORMALIZATIONS = ("mean", "sum")
"""Reductions of an option's token log-probabilities: per-token mean (default) or sum."""


class OptionScorer(Protocol):
    """``scorer(items, videos) -> scores``: per item, one score per option, in option order.

    Higher is more likely. Videos are uint8 ``(N, H, W, 3)`` frame arrays, as an
    ``Answerer`` gets them.
    """

    def __call__(self, items: list[QAItem], videos: list[np.ndarray]) -> list[list[float]]: ...


def choose_option(scores: Sequence[float]) -> int:
    """Index of the highest score; an exact tie goes to the lowest index (the first option)."""
    if not scores:
        raise InvalidInput("option scores: empty; a question needs at least one option")
    best = 0
    for k, value in enumerate(scores):
        if value > scores[best]:
            best = k
    return best


def check_option_scores(item: QAItem, scores: object) -> tuple[float, ...]:
    """``scores`` as a tuple of floats, after checking it has one usable score per option.

    A score may be ``-inf`` (an option the model rules out), never NaN or ``+inf``:
    the argmax of those would mean nothing.
    """
    if item.options is None:
        raise InvalidInput(f"{item.uid}: {item.benchmark} is open-ended; it has no options to score")
    if isinstance(scores, np.ndarray) and scores.ndim == 1:
        scores = scores.tolist()
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise InvalidInput(f"option scorer: scores for {item.uid} are {type(scores).__name__}, "
                           "not a sequence of floats")
    if len(scores) != len(item.options):
        raise InvalidInput(f"option scorer: {len(scores)} scores for {item.uid}, which has "
                           f"{len(item.options)} options")
    values = []
    for value in scores:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise InvalidInput(f"option scorer: a score for {item.uid} is {type(value).__name__}")
        value = float(value)
        if math.isnan(value) or value == math.inf:
            raise InvalidInput(f"option scorer: score {value} for {item.uid}; expected finite or -inf")
        values.append(value)
    return tuple(values)


@dataclass
class VideoLLMOptionScorer:
    """An :class:`OptionScorer` for a student :class:`~vidalign.students.VideoLLM`, any family.

    Builds its inputs with ``VideoLLM.build_inputs`` (the model's own chat
    template, video placeholder expansion and pixels: exactly what training and
    generation use), so every student family the eval runner takes works. The
    option's tokens inside the rendered reply are found by character offsets
    (``vidalign.motionenhancer.align.render_with_offsets``), so a reply that the
    template wraps (a leading space, an end-of-turn token) still scores the
    option's text only. It needs a fast tokenizer (offsets) and a chat template
    that keeps the reply's text as given; otherwise a clear error says which.
    """

    llm: VideoLLM
    normalize: str = "mean"
    """``"mean"`` (log-probability per token) or ``"sum"`` (of the option's tokens)."""
    continuation: str = "{option}"
    """The scored reply: ``{option}`` is the option's text, ``{letter}`` its letter."""
    max_rows: int = 8
    """(question, option) rows per forward pass; their logits are ``max_rows x length x vocab``."""

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise InvalidInput(f"normalize: expected one of {NORMALIZATIONS}, got {self.normalize!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise InvalidInput(f"max_rows: expected an integer >= 1, got {self.max_rows!r}")
        try:
            probe = self.continuation.format(option="\0", letter="A")
        except (KeyError, IndexError, ValueError) as err:
            raise InvalidInput(f"continuation: {self.continuation!r} is not a template of "
                               f"{{option}} and {{letter}} ({err})") from None
        if "\0" not in probe:
            raise InvalidInput(f"continuation: {self.continuation!r} does not contain {{option}}")

    @property
    def method(self) -> str:
        """One line for result files: what an option's score is."""
        what = "mean log-probability per token" if self.normalize == "mean" else \
            "summed log-probability"
        return (f"{what} of the reply {self.continuation!r} (end of turn not scored), "
                "teacher-forced after the prompt and video; argmax, ties to the first option")

    def __call__(self, items: list[QAItem], videos: list[np.ndarray]) -> list[list[float]]:
        import torch

        if len(items) != len(videos):
            raise InvalidInput(f"expected one video per item: {len(items)} items, {len(videos)} videos")
        rows: list[tuple[int, str]] = []  # (item index, continuation)
        for i, item in enumerate(items):
            if not item.options:
                raise InvalidInput(f"{item.uid}: no options to score ({item.benchmark} questions "
                                   "must be multiple-choice for likelihood scoring)")
            rows += [(i, self.continuation.format(option=o, letter=LETTERS[k]))
                     for k, o in enumerate(item.options)]
        flat: list[float] = []
        with torch.no_grad():
            start = 0
            while start < len(rows):
                # Rows of one forward pass share a video size (a batch is one tensor).
                shape, stop = videos[rows[start][0]].shape, start
                while (stop < len(rows) and stop - start < self.max_rows
                       and videos[rows[stop][0]].shape == shape):
                    stop += 1
                chunk = rows[start:stop]
                batch = torch.from_numpy(np.stack([videos[i] for i, _ in chunk]))
                flat += self._score_rows(batch, [items[i].prompt for i, _ in chunk],
                                         [text for _, text in chunk])
                start = stop
        out: list[list[float]] = [[] for _ in items]
        for (i, _), value in zip(rows, flat, strict=True):
            out[i].append(value)
        return out

    def _score_rows(self, videos: torch.Tensor, prompts: list[str], replies: list[str]) -> list[float]:
        """One forward pass: the score of each (video, prompt, reply) row."""
        import torch

        from vidalign.students.videollm import IGNORE_INDEX

        inputs = self.llm.build_inputs(videos, prompts, replies)
        labels = inputs.pop("labels")
        logits = self.llm.model(**inputs).logits
        ids = inputs["input_ids"]
        scores = []
        for r, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            positions = (labels[r] != IGNORE_INDEX).nonzero().squeeze(-1)
            keep = self._reply_tokens(prompt, reply, ids[r, positions].tolist())
            positions = positions[torch.tensor(keep, device=positions.device)]
            # The logits at position p - 1 predict the token at p.
            logp = torch.log_softmax(logits[r, positions - 1].float(), dim=-1)
            token = logp.gather(-1, ids[r, positions, None]).squeeze(-1)
            scores.append(float(token.mean() if self.normalize == "mean" else token.sum()))
        return scores

    def _reply_tokens(self, prompt: str, reply: str, reply_ids: list[int]) -> list[bool]:
        """For each token of the rendered reply, whether it covers the scored text ``reply``."""
        from vidalign.motionenhancer.align import render_with_offsets

        if not getattr(self.llm.tokenizer, "is_fast", False):
            raise InvalidInput(f"likelihood scoring of {self.llm.spec.name!r} needs a fast tokenizer "
                               "(character offsets); this one is not")
        rendered = render_with_offsets(self.llm, prompt, reply, self.llm.family.placeholder)
        n = len(reply_ids)
        if rendered.ids[-n:] != reply_ids:
            raise InvalidInput(f"{self.llm.spec.name!r}: the reply's tokens differ between "
                               "build_inputs and the offsets rendering; cannot locate the option")
        begin = len(rendered.head) + rendered.target_offset
        end = begin + len(reply)
        keep = [a < end and b > begin for a, b in rendered.offsets[-n:]]
        if not any(keep):
            raise InvalidInput(f"{self.llm.spec.name!r}: no reply token covers {reply!r}")
        return keep


def videollm_option_scorer(llm: VideoLLM, **options: Any) -> VideoLLMOptionScorer:
    """The :class:`VideoLLMOptionScorer` of ``llm`` (``normalize``, ``continuation``, ``max_rows``)."""
    return VideoLLMOptionScorer(llm, **options)
