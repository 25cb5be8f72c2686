"""Motion-aware Text Token Identification (MotionEnhancer §4.2, docs/papers.md).

The selected heads' text-query rows over the video keys, averaged over those
heads, are pooled (mean) over each frame's h x w locations into A_tok (L x F).
A token's score is ``mean_weight * mean_f A_tok + diff_weight * mean_f |A_tok[f+1]
- A_tok[f]|`` (the paper leaves the formula blank; absolute first differences,
weights configurable, default 1 and 1). Only eligible tokens compete: not
padding and, by default, not special tokens (``</s>``); the top ``ratio``
(default 0.5, at least one) are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vidalign.errors import InvalidInput
from vidalign.motionenhancer.mhs import top_count
from vidalign.papers import ME_MTTI_DIFF_WEIGHT, ME_MTTI_MEAN_WEIGHT, ME_TOKEN_RATIO


@dataclass
class MTTIResult:
    a_tok: torch.Tensor
    """(L, F) pooled text-to-frame attention of the selected heads."""
    mean: torch.Tensor
    """(L,) mean over frames."""
    diff: torch.Tensor
    """(L,) mean absolute first difference over frames (0 with one frame)."""
    score: torch.Tensor
    """(L,) combined score; -inf for tokens that do not compete."""
    selected: list[int]
    """Selected token positions, in text order."""


@dataclass(frozen=True)
class SelectedToken:
    index: int
    """Position in the padded token sequence."""
    span: tuple[int, int]
    """Character span [start, end) in the original prompt."""
    text: str
    """``prompt[start:end]``."""
    score: float


def pool_tokens(text_to_vision: torch.Tensor, heads: Sequence[int], frames: int) -> torch.Tensor:
    """(H, L, F * S) -> (L, F): mean over the given heads and over each frame's locations."""
    if text_to_vision.ndim != 3 or text_to_vision.shape[2] % frames:
        raise InvalidInput(
            f"text_to_vision: expected shape (H, L, F * S) with F = {frames}, "
            f"got {tuple(text_to_vision.shape)}"
        )
    if not heads or not all(0 <= h < text_to_vision.shape[0] for h in heads):
        raise InvalidInput(
            f"heads: expected indices in [0, {text_to_vision.shape[0]}), got {list(heads)}"
        )
    rows = text_to_vision[list(heads)].float().mean(0)
    return rows.view(rows.shape[0], frames, -1).mean(-1)


def select_tokens(
    a_tok: torch.Tensor,
    eligible: torch.Tensor,
    *,
    ratio: float = ME_TOKEN_RATIO,
    mean_weight: float = ME_MTTI_MEAN_WEIGHT,
    diff_weight: float = ME_MTTI_DIFF_WEIGHT,
) -> MTTIResult:
    """Score tokens from A_tok (L, F) and keep the top ``ratio`` of the eligible ones."""
    if a_tok.ndim != 2 or eligible.shape != a_tok.shape[:1]:
        raise InvalidInput(
            f"a_tok, eligible: expected shapes (L, F) and (L,), got {tuple(a_tok.shape)} and "
            f"{tuple(eligible.shape)}"
        )
    eligible = eligible.bool().to(a_tok.device)
    mean = a_tok.mean(1)
    diff = a_tok.diff(dim=1).abs().mean(1) if a_tok.shape[1] > 1 else torch.zeros_like(mean)
    score = mean_weight * mean + diff_weight * diff
    score = torch.where(eligible, score, torch.full_like(score, float("-inf")))
    k = top_count(ratio, int(eligible.sum()))
    order = torch.argsort(score, descending=True, stable=True)[:k]
    return MTTIResult(
        a_tok=a_tok, mean=mean, diff=diff, score=score, selected=sorted(int(i) for i in order)
    )


def token_spans(
    result: MTTIResult, offsets: Sequence[tuple[int, int]], prompt: str
) -> list[SelectedToken]:
    """The selected tokens with their character spans in ``prompt`` (tokenizer offsets)."""
    out = []
    for index in result.selected:
        start, end = offsets[index]
        out.append(
            SelectedToken(index, (start, end), prompt[start:end], float(result.score[index]))
        )
    return out
