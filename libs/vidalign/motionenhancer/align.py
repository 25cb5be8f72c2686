"""MotionEnhancer attention alignment on the VLM side (docs/papers.md, paper section 4.3).

Four pieces, each usable on its own:

* **Token mapping** (:func:`render_with_offsets`, :func:`covering_tokens`,
  :func:`map_selected_tokens`). A prior's selected tokens carry character spans
  in the teacher's (T5) prompt. The VLM sequence is rendered by the student's
  chat template with sentinels in place of the prompt and the reply, so the
  character offset of each inside the rendered text is known exactly; the
  fast tokenizer's offsets mapping then gives the VLM tokens covering each
  selected span (whitespace at a span's edges is trimmed first; a VLM token
  covers a span when their character ranges overlap). One T5 token may map to
  several VLM tokens (a character-level VLM tokenizer) and several T5 tokens to
  one VLM token (a coarser BPE); the VLM row of a selected token is the mean of
  its covering tokens' rows.
* **Attention capture** (:func:`capture_text_to_vision`). Forward hooks on the
  LLM's attention modules (``*language_model*.layers.N.self_attn``) recompute
  ``softmax(q k^T * scaling)`` for the needed query rows only, from the
  module's own input hidden states, projections (``q_proj``/``k_proj``,
  ``q_norm``/``k_norm`` when present), RoPE tables (the ``position_embeddings``
  it was called with; Qwen2.5-VL's M-RoPE is already folded into them) and
  GQA, with a causal + padding mask built from the 2-D attention mask. The
  model itself keeps running SDPA (no eager fallback, no ``output_attentions``);
  the extra cost per layer is one ``k_proj`` over the sequence and ``R x L``
  logits per head. Rows are averaged over heads and layers and kept at the
  video placeholder positions. Everything stays in the autograd graph.
* **Prior -> VLM grid** (:class:`VisionGrid`, :func:`vision_grid`,
  :func:`prior_to_grid`). The prior (n_tok, F_tok, h, w) is resampled in time
  at the VLM's sampled frames (their positions in the clip mapped onto the
  teacher's token frames; Qwen2.5-VL's temporal patches average their two
  frames), then in space (area when shrinking, bilinear otherwise), and each
  row is normalised to a distribution (supp. eq. 22-23).
* **Aligner and loss** (:class:`AttentionAligner`, :func:`align_loss`). A
  3-layer MLP on a VLM row (a distribution over the N grid cells), used as a
  residual in log space, ``softmax(log p + MLP(N p))``, its last layer zero-
  initialised so it starts as the identity; hidden width 64 by default (the
  tiny config uses 16). Parameters: ``2 N h + h^2 + 2 h + N``.
  ``L_align`` = mean over selected tokens of the squared L2 distance between the
  aligned VLM row and the prior row (both distributions).

Per-family VLM grids (:func:`vision_grid`): each student family's module
(``vidalign.students.video_llava``, ...) says how its video tokens, in
placeholder order, form the grid (``StudentFamily.vision_grid``); e.g.
Video-LLaVA's CLS token of each frame is in the sequence but not a grid cell
(its column is dropped from the VLM row before normalising), and Qwen2.5-VL's
temporal patches make ceil(T / 2) grid frames.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.motionenhancer.mtti import SelectedToken
from vidalign.students.family import VisionGrid, get_family  # VisionGrid: public here too
from vidalign.video import uniform_indices

_PROMPT_SENTINEL = "\ue000vidalign-prompt\ue000"
_TARGET_SENTINEL = "\ue000vidalign-target\ue000"
ATTENTION_MODULES = re.compile(r"(^|.*\.)language_model\.(.*\.)?layers\.\d+\.self_attn$")
"""Names of the LLM attention modules the capture hooks (peft prefixes allowed)."""

# --------------------------------------------------------------------------------------------
# Token mapping


def covering_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character range overlaps ``[start, end)`` (empty ranges never do)."""
    return [i for i, (a, b) in enumerate(offsets) if a < b and a < end and b > start]


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` without whitespace at its edges (``start == end`` when all whitespace)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def map_selected_tokens(
    tokens: Sequence[SelectedToken],
    prior_text: str,
    vlm_text: str,
    text_offset: int,
    offsets: Sequence[tuple[int, int]],
) -> list[list[int]]:
    """For each selected token: the VLM token indices covering its characters.

    ``prior_text`` is the teacher's prompt (the spans' reference); it sits at
    ``vlm_text[text_offset:]``; ``offsets`` is the VLM tokenizer's offsets
    mapping of ``vlm_text``. A token whose span is only whitespace maps to [].
    """
    if vlm_text[text_offset : text_offset + len(prior_text)] != prior_text:
        raise InvalidInput(
            f"prior text {prior_text[:40]!r} is not at offset {text_offset} of the VLM text"
        )
    out = []
    for token in tokens:
        start, end = token.span
        if not 0 <= start <= end <= len(prior_text):
            raise InvalidInput(
                f"selected token {token.text!r}: span {token.span} outside the prior's prompt "
                f"({len(prior_text)} characters)"
            )
        start, end = trim_span(prior_text, start, end)
        out.append(
            covering_tokens(offsets, text_offset + start, text_offset + end) if end > start else []
        )
    return out


@dataclass(frozen=True)
class Rendered:
    """One conversation as the VideoLLM tokenizes it, with character offsets."""

    head: str
    """User turn + generation prompt, the video placeholder already expanded."""
    reply: str
    """Assistant reply text ("" without a target)."""
    prompt_offset: int
    """Character offset of the user prompt inside ``head``."""
    target_offset: int
    """Character offset of the target inside ``reply`` (-1 without a target)."""
    ids: list[int]
    """``tokenize(head) + tokenize(reply)``, as ``VideoLLM.build_inputs`` builds them."""
    offsets: list[tuple[int, int]]
    """Character range of each id in ``head + reply``."""


def render_with_offsets(llm: Any, prompt: str, target: str | None, video_text: str) -> Rendered:
    """Render (prompt, target) with the student's chat template and know where each landed.

    Sentinels go through the template first: their positions are the prompt's
    and the target's offsets. The real rendering must equal the sentinel
    rendering with the texts substituted (a template that rewrites the text,
    e.g. strips it, is refused).
    """
    placeholder = llm.family.placeholder
    for name, text in (("prompt", prompt), ("target", target or "")):
        if placeholder in text or "\ue000" in text:
            raise InvalidInput(f"{name}: must not contain {placeholder!r} or U+E000")
    head_s, reply_s = llm._render(_PROMPT_SENTINEL, None if target is None else _TARGET_SENTINEL)
    if head_s.count(_PROMPT_SENTINEL) != 1 or head_s.count(placeholder) != 1:
        raise InvalidInput(
            f"chat template of {llm.spec.name!r}: expected the prompt and the video placeholder "
            "once in the user turn"
        )
    head_s = head_s.replace(placeholder, video_text)
    prompt_offset = head_s.index(_PROMPT_SENTINEL)
    head = head_s.replace(_PROMPT_SENTINEL, prompt)
    target_offset, reply = -1, ""
    if target is not None:
        if reply_s.count(_TARGET_SENTINEL) != 1:
            raise InvalidInput(
                f"chat template of {llm.spec.name!r}: reply does not hold the target once"
            )
        target_offset = reply_s.index(_TARGET_SENTINEL)
        reply = reply_s.replace(_TARGET_SENTINEL, target)
    real_head, real_reply = llm._render(prompt, target)
    if real_head.replace(placeholder, video_text) != head or real_reply != reply:
        raise InvalidInput(
            f"chat template of {llm.spec.name!r} rewrites the prompt or target text; "
            "their character offsets cannot be located"
        )
    tok = llm.tokenizer
    h = tok(head, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(h["input_ids"]), [tuple(o) for o in h["offset_mapping"]]
    if reply:
        r = tok(reply, add_special_tokens=False, return_offsets_mapping=True)
        ids += list(r["input_ids"])
        offsets += [(a + len(head), b + len(head)) for a, b in r["offset_mapping"]]
    return Rendered(head, reply, prompt_offset, target_offset, ids, offsets)


def locate_prior_text(rendered: Rendered, prompt: str, target: str | None, prior_text: str) -> int:
    """Character offset of ``prior_text`` in ``head + reply``: inside the target, else the prompt."""
    if target is not None and prior_text in target:
        return len(rendered.head) + rendered.target_offset + target.index(prior_text)
    if prior_text in prompt:
        return rendered.prompt_offset + prompt.index(prior_text)
    raise InvalidInput(
        f"prior text {prior_text[:60]!r} appears in neither the prompt nor the target"
    )


# --------------------------------------------------------------------------------------------
# Attention capture


def attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules() if ATTENTION_MODULES.match(name)]
    if not mods:
        raise InvalidInput(
            f"{type(model).__name__}: no LLM attention modules named like "
            "'language_model.layers.N.self_attn'"
        )
    for m in mods:
        for attr in ("q_proj", "k_proj", "head_dim", "scaling"):
            if not hasattr(m, attr):
                raise InvalidInput(f"{type(m).__name__}: attention capture needs .{attr}")
        if getattr(m, "sliding_window", None) or hasattr(m, "sinks"):
            raise InvalidInput(
                f"{type(m).__name__}: sliding-window / sink attention is not supported by the capture"
            )
    return mods


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-style rotary embedding; x (B, H, R, D), cos/sin (B, R, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TextToVision:
    """Filled by :func:`capture_text_to_vision`: ``attention`` (B, R, N), mean over heads and layers."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.layers = 0

    @property
    def attention(self) -> Tensor:
        if self.total is None:
            raise InvalidInput("no attention captured: run the model inside capture_text_to_vision")
        return self.total / self.layers


@contextmanager
def capture_text_to_vision(
    model: nn.Module, queries: Tensor, keys: Tensor, attention_mask: Tensor
) -> Iterator[TextToVision]:
    """Capture ``softmax(q k^T)`` rows of ``queries`` at the ``keys`` columns, every LLM layer.

    ``queries`` (B, R) and ``keys`` (B, N) are sequence positions (long; -1
    pads queries, whose rows come back as zeros); ``attention_mask`` (B, L) is
    the 2-D padding mask the model gets. Rows are normalised over all allowed
    keys (causal and not padding), exactly as the model's own softmax.
    """
    mods = attention_modules(model)
    result = TextToVision()
    device = attention_mask.device
    queries, keys = queries.to(device), keys.to(device)
    valid_q = queries >= 0
    q_idx = queries.clamp_min(0)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, length, _ = hidden.shape
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # (1, L, D) when shared
        hd = module.head_dim
        gather = q_idx.unsqueeze(-1)
        h_rows = hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1]))
        q = module.q_proj(h_rows).view(b, q_idx.shape[1], -1, hd)
        k = module.k_proj(hidden).view(b, length, -1, hd)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = _rope(
            q,
            cos.gather(1, gather.expand(-1, -1, cos.shape[-1])),
            sin.gather(1, gather.expand(-1, -1, sin.shape[-1])),
        )
        k = _rope(k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        with torch.autocast(q.device.type, enabled=False):  # float32 under a bf16/fp16 run too
            logits = (q.float() @ k.float().transpose(-1, -2)) * module.scaling  # (B, H, R, L)
        positions = torch.arange(length, device=device)
        allowed = (positions.view(1, 1, -1) <= q_idx.unsqueeze(-1)) & attention_mask.bool()[
            :, None, :length
        ]
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        probs = logits.softmax(-1).mean(1)  # heads -> (B, R, L)
        rows = probs.gather(2, keys.unsqueeze(1).expand(-1, probs.shape[1], -1))
        rows = rows * valid_q.unsqueeze(-1)
        result.total = rows if result.total is None else result.total + rows
        result.layers += 1

    _release_deferred(model)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
    try:
        yield result
    finally:
        if getattr(model, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
            # The backward pass recomputes each checkpointed layer, hooks included, and torch
            # checks that the recomputation saves what the forward saved: the hooks must
            # outlive this block. They go when the next capture starts (or release_capture).
            _DEFERRED[id(model)] = handles
        else:
            for h in handles:
                h.remove()


_DEFERRED: dict[int, list[Any]] = {}
"""Hooks kept past their ``capture_text_to_vision`` block for a checkpointed backward."""


def _release_deferred(model: nn.Module) -> None:
    for h in _DEFERRED.pop(id(model), []):
        h.remove()


def release_capture(model: nn.Module) -> None:
    """Remove capture hooks kept for a gradient-checkpointed backward (after training)."""
    _release_deferred(model)


# --------------------------------------------------------------------------------------------
# Grids


def vision_grid(llm: Any) -> VisionGrid:
    """The grid of ``llm``'s video tokens, as its family lays them out (``StudentFamily.vision_grid``)."""
    return get_family(llm.spec).vision_grid(llm.encoder, llm.config)


def frame_positions(
    grid: VisionGrid, clip_frames: int, teacher_frames_used: int, teacher_token_frames: int
) -> Tensor:
    """Each VLM temporal position on the prior's token-frame axis (fractional, cell centres at k).

    The VLM samples ``uniform_indices(clip_frames, num_frames)``; the teacher saw
    the first ``teacher_frames_used`` frames, spread over its token frames.
    Qwen-style temporal patches average their frames (the last one repeated
    to fill the patch, as the processor does).
    """
    idx = list(uniform_indices(clip_frames, grid.num_frames))
    while len(idx) % grid.frames_per_step:
        idx.append(idx[-1])
    used = max(1, teacher_frames_used)
    pos = (torch.tensor(idx, dtype=torch.float32) + 0.5) / used * teacher_token_frames - 0.5
    pos = pos.clamp(0, teacher_token_frames - 1)
    return pos.view(-1, grid.frames_per_step).mean(1)


def _resample_time(prior: Tensor, positions: Tensor) -> Tensor:
    """Linear interpolation of (n, F, h, w) along F at fractional ``positions`` -> (n, T, h, w)."""
    f = prior.shape[1]
    lo = positions.floor().long().clamp(0, f - 1)
    hi = (lo + 1).clamp(max=f - 1)
    w = (positions - lo.float()).clamp(0, 1).view(1, -1, 1, 1).to(prior)
    return prior[:, lo] * (1 - w) + prior[:, hi] * w


def _resize_axis(x: Tensor, dim: int, size: int) -> Tensor:
    if x.shape[dim] == size:
        return x
    moved = x.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    if size < shape[-1]:
        out = F.adaptive_avg_pool1d(flat, size)
    else:
        out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return out.reshape(*shape[:-1], size).movedim(-1, dim)


def normalise_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows (last axis) as distributions: clamp at 0, divide by the sum (eq. 22-23)."""
    x = x.clamp_min(0)
    return x / x.sum(-1, keepdim=True).clamp_min(eps)


def prior_to_grid(prior: Tensor, grid: VisionGrid, positions: Tensor | None = None) -> Tensor:
    """(n, F, h, w) prior -> (n, grid.size) row distributions on the VLM grid.

    ``positions`` (grid.frames,): fractional token-frame coordinates of the VLM's
    temporal positions (:func:`frame_positions`); ``None`` spreads both axes
    over the same span (plain linear resize).
    """
    if prior.ndim != 4:
        raise InvalidInput(f"prior: expected (n, F, h, w), got {tuple(prior.shape)}")
    x = prior.float()
    if positions is None:
        f = x.shape[1]
        positions = ((torch.arange(grid.frames) + 0.5) * f / grid.frames - 0.5).clamp(0, f - 1)
    x = _resample_time(x, positions)
    x = _resize_axis(_resize_axis(x, 2, grid.height), 3, grid.width)
    return normalise_rows(x.flatten(1))


# --------------------------------------------------------------------------------------------
# Aligner and loss


class AttentionAligner(nn.Module):
    """3-layer MLP on a VLM attention row, a residual in log space (see the module docstring)."""

    def __init__(self, n_locations: int, hidden: int = 64, eps: float = 1e-8) -> None:
        super().__init__()
        if n_locations < 1 or hidden < 1:
            raise InvalidInput("aligner: n_locations and hidden must be >= 1")
        self.n_locations = n_locations
        self.eps = eps
        self.net = nn.Sequential(
            nn.Linear(n_locations, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, n_locations),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @staticmethod
    def param_bound(n_locations: int, hidden: int) -> int:
        """Exact parameter count: ``2 N h + h^2 + 2 h + N``."""
        return 2 * n_locations * hidden + hidden * hidden + 2 * hidden + n_locations

    def forward(self, rows: Tensor) -> Tensor:
        """(..., N) distributions -> (..., N) distributions, in float32.

        The MLP runs in its weights' dtype (half when a DeepSpeed engine cast it); the log
        of the rows and the softmax stay float32, where ``eps`` (1e-8) exists: in fp16 it
        flushes to 0 and an all-zero (padded) row would give log 0 and a NaN softmax.
        """
        dtype = next(self.net.parameters()).dtype
        residual = self.net((rows * self.n_locations).to(dtype)).float()
        return torch.softmax(rows.float().clamp_min(self.eps).log() + residual, dim=-1)


def align_loss(aligned: Tensor, prior: Tensor, mask: Tensor) -> Tensor:
    """Mean over the ``mask``-ed rows of the squared L2 distance ``||aligned - prior||^2``."""
    per_row = (aligned - prior).pow(2).sum(-1)
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# A whole batch


@dataclass
class PriorItem:
    """One clip's prior: the selected tokens, their (n, F, h, w) maps and the teacher's prompt."""

    tokens: list[SelectedToken]
    prior: Tensor
    text: str
    frames_used: int
    """Clip frames the teacher saw (``metadata['frames_used']``); 0: spread over the clip."""


@dataclass
class AlignBatch:
    inputs: dict[str, Tensor]
    """Model kwargs from ``VideoLLM.build_inputs`` (labels included with targets)."""
    queries: Tensor
    """(B, R) VLM positions whose rows are captured (-1 pads)."""
    keys: Tensor
    """(B, N_tok) video placeholder positions."""
    pool: Tensor
    """(B, S, R) averaging weights: selected token s's row = pool[s] @ captured rows."""
    prior: Tensor
    """(B, S, grid.size) prior distributions (zeros on padded rows)."""
    mask: Tensor
    """(B, S) bool: a real selected token with at least one covering VLM token."""


def build_align_batch(
    llm: Any,
    videos: Tensor,
    prompts: Sequence[str],
    targets: Sequence[str],
    priors: Sequence[PriorItem | None],
    grid: VisionGrid,
) -> AlignBatch:
    """Inputs plus everything the alignment loss needs for one batch (right padding).

    A ``None`` prior (or one whose text is in neither the prompt nor the target)
    gives the example no aligned rows: it carries CE only.
    """
    inputs = llm.build_inputs(videos, prompts, targets)
    _, video_text = llm._video_inputs(videos[:1])
    b = len(prompts)
    per_query: list[list[int]] = []
    per_pool: list[list[list[int]]] = []
    for i in range(b):
        rendered = render_with_offsets(llm, prompts[i], targets[i], video_text)
        ids = inputs["input_ids"][i, : len(rendered.ids)].tolist()
        if ids != rendered.ids:
            raise InvalidInput("token mapping: ids differ from VideoLLM.build_inputs")
        item = priors[i]
        if item is None or (item.text not in targets[i] and item.text not in prompts[i]):
            per_query.append([])
            per_pool.append([])
            continue
        text = rendered.head + rendered.reply
        offset = locate_prior_text(rendered, prompts[i], targets[i], item.text)
        cover = map_selected_tokens(item.tokens, item.text, text, offset, rendered.offsets)
        per_query.append(sorted({p for c in cover for p in c}))
        per_pool.append(cover)
    r = max(1, max(len(q) for q in per_query))
    s = max(1, max(len(p) for p in per_pool))
    queries = torch.full((b, r), -1, dtype=torch.long)
    pool = torch.zeros(b, s, r)
    prior = torch.zeros(b, s, grid.size)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        where = {p: j for j, p in enumerate(per_query[i])}
        if not per_pool[i]:
            continue
        queries[i, : len(per_query[i])] = torch.tensor(per_query[i], dtype=torch.long)
        item = priors[i]
        assert item is not None
        positions = None
        if item.frames_used > 0:
            positions = frame_positions(
                grid, videos.shape[1], item.frames_used, item.prior.shape[1]
            )
        rows = prior_to_grid(item.prior, grid, positions)
        for t, cover in enumerate(per_pool[i]):
            if cover:
                pool[i, t, [where[p] for p in cover]] = 1.0 / len(cover)
                mask[i, t] = True
        prior[i, : rows.shape[0]] = rows
    keys = torch.stack(
        [(row == llm.video_token_id).nonzero().flatten() for row in inputs["input_ids"]]
    )
    if keys.shape[1] != grid.n_tokens:
        raise InvalidInput(
            f"vision grid: expected {grid.n_tokens} video tokens, the inputs hold {keys.shape[1]}"
        )
    device = inputs["input_ids"].device
    return AlignBatch(
        inputs=inputs,
        queries=queries.to(device),
        keys=keys.to(device),
        pool=pool.to(device),
        prior=prior.to(device),
        mask=mask.to(device),
    )


def vlm_rows(captured: Tensor, batch: AlignBatch, grid: VisionGrid) -> Tensor:
    """Captured (B, R, N_tok) rows -> (B, S, grid.size) distributions over the grid cells."""
    cells = torch.tensor(grid.cells, device=captured.device)
    rows = batch.pool @ captured[..., cells]
    return normalise_rows(rows)


@dataclass
class AlignOutput:
    loss: Tensor
    """CE + lambda * L_align."""
    ce: Tensor
    align: Tensor
    rows: Tensor
    """(B, S, grid.size) VLM rows (before the aligner)."""


def motion_sft_loss(
    llm: Any,
    aligner: AttentionAligner,
    batch: AlignBatch,
    grid: VisionGrid,
    *,
    weight: float = 1.0,
) -> AlignOutput:
    """One forward: ``CE + weight * L_align`` with the capture hooks installed."""
    with capture_text_to_vision(
        llm.model, batch.queries, batch.keys, batch.inputs["attention_mask"]
    ) as captured:
        out = llm.model(**batch.inputs)
    # The rows and L_align in float32 under a bf16/fp16 run too: the rows are probabilities
    # down to ~1e-4, which fp16's 10-bit mantissa and range would blur.
    with torch.autocast(captured.attention.device.type, enabled=False):
        rows = vlm_rows(captured.attention.float(), batch, grid)
        l_align = align_loss(aligner(rows), batch.prior, batch.mask)
    if not math.isfinite(float(l_align.detach())):
        raise FloatingPointError(f"L_align is {float(l_align.detach())}")
    return AlignOutput(loss=out.loss + weight * l_align, ce=out.loss, align=l_align, rows=rows)
