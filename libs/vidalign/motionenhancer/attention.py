"""Streaming attention capture for CogVideoX (docs/design.md, decision 6).

``StreamingAttnProcessor`` replaces ``CogVideoXAttnProcessor2_0`` on every
attention layer of a ``CogVideoXTransformer3DModel``. It computes the same
output (text tokens first, q/k norms, RoPE on the video part only), and for one
batch element, the *captured* one, it computes the softmax in chunks of query
rows and keeps only what MHS and MTTI need:

* ``lse``: per head, the row normaliser (logsumexp of the scaled logits) of
  every query row, text and video: (H, L + N_v);
* ``same_location``: per head, the entries A[(f, s), (f', s)] that join one
  spatial location s across frames, over the video-to-video block:
  (H, S, F, F) with ``[h, s, f, f']``;
* ``row_vision_mass``: per head, each video query row's mass on the video keys,
  sum_k A[(f, s), k]: (H, N_v); ``vision_mass`` is its sum over rows (H,);
* ``text_to_vision``: per head, the text-query rows over the video keys:
  (H, L, N_v).

Video tokens are ordered frame-major, as ``CogVideoXPatchEmbed`` lays them out:
token j is frame ``j // S``, location ``j % S`` (S = h * w of the token grid).

**Softmax.** Probabilities are the model's own: each row is normalised over
*all* keys, text included (and, in cross-stream-memory mode, the reference
stream's keys too). The video-to-video block is therefore a sub-block of a
stochastic matrix, and its rows sum to ``row_vision_mass`` (< 1), not 1. MHS
uses the row masses to get everything it needs about the block without
materialising it (see ``vidalign.motionenhancer.mhs``).

**Averaging.** Every statistic is summed over layers and calls (timesteps) and
divided by the number of layer calls; ``lse`` is averaged likewise (an average
of log normalisers: a diagnostic, not a normaliser of the averaged map).

Memory: a chunk holds (H, chunk, N_keys) float32 probabilities; the kept
statistics are O(H * (N + S F^2 + L N_v)), linear in N for a fixed frame count
and text length. The captured element's output is computed from the same chunked
probabilities (float32), the other batch elements' with SDPA as the stock processor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from vidalign.errors import InvalidInput

DEFAULT_CHUNK_SIZE = 256
"""Query rows per chunk. A chunk's float32 logits take 4 * H * chunk * N_keys bytes:
CogVideoX-5B at 49 frames with cross-stream memory (48 heads, 35,552 keys): 1.7 GB."""


@dataclass(frozen=True)
class TokenGrid:
    """The joint sequence layout of one CogVideoX forward."""

    text_len: int
    frames: int
    """Token frames (latent frames, / patch_size_t in CogVideoX 1.5)."""
    height: int
    width: int

    @property
    def spatial(self) -> int:
        return self.height * self.width

    @property
    def n_vision(self) -> int:
        return self.frames * self.spatial


class AttentionStats:
    """Running sums of the captured attention statistics, averaged over layer calls.

    ``enabled`` switches capture off (e.g. during inversion); ``memory`` turns on
    cross-stream memory (the batch is [main..., reference...]: main queries
    attend to their own keys and the reference stream's, reference queries to
    their own); ``capture_index`` is the captured element of the (main) batch,
    -1 by default: the conditional half under classifier-free guidance.
    """

    def __init__(self, *, capture_index: int = -1) -> None:
        self.enabled = True
        self.memory = False
        self.capture_index = capture_index
        self.grid: TokenGrid | None = None
        self._pending: tuple[int, int, int] | None = None
        self.layer_calls = 0
        self.forwards = 0
        self._lse: torch.Tensor | None = None
        self._same: torch.Tensor | None = None
        self._row_mass: torch.Tensor | None = None
        self._text: torch.Tensor | None = None

    # -- geometry ---------------------------------------------------------------

    def _set_pending(self, frames: int, height: int, width: int) -> None:
        self._pending = (frames, height, width)
        if self.enabled:
            self.forwards += 1

    def _grid_for(self, text_len: int, n_vision: int) -> TokenGrid:
        if self._pending is None:
            raise InvalidInput(
                "attention stats: no token grid; run the transformer inside capture_attention"
            )
        grid = TokenGrid(text_len, *self._pending)
        if grid.n_vision != n_vision:
            raise InvalidInput(
                f"hidden_states: expected {grid.n_vision} video tokens for grid {grid}, got {n_vision}"
            )
        if self.grid is not None and grid != self.grid:
            raise InvalidInput(
                f"token grid: expected the grid of the earlier calls {self.grid}, got {grid}"
            )
        return grid

    # -- accumulation -----------------------------------------------------------

    def _init(self, heads: int, grid: TokenGrid, device: torch.device) -> None:
        self.grid = grid
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        self._lse = zeros(heads, grid.text_len + grid.n_vision)
        self._same = zeros(heads, grid.spatial * grid.frames, grid.frames)
        self._row_mass = zeros(heads, grid.n_vision)
        self._text = zeros(heads, grid.text_len, grid.n_vision)

    def _accumulate(self, probs: torch.Tensor, lse: torch.Tensor, start: int) -> None:
        """Add one chunk: probs (H, c, N_keys) for query rows [start, start + c)."""
        grid = self.grid
        assert grid is not None and self._lse is not None
        L, S, Fr, Nv = grid.text_len, grid.spatial, grid.frames, grid.n_vision
        c = probs.shape[1]
        self._lse[:, start : start + c] += lse
        vision_keys = probs[:, :, L : L + Nv]
        n_text = max(0, min(L - start, c))
        if n_text:
            self._text[:, start : start + n_text] += vision_keys[:, :n_text]
        if n_text < c:
            rows = torch.arange(start + n_text - L, start + c - L, device=probs.device)
            block = vision_keys[:, n_text:].reshape(probs.shape[0], c - n_text, Fr, S)
            loc, frame = rows % S, rows // S
            index = loc.view(1, -1, 1, 1).expand(block.shape[0], -1, Fr, 1)
            same = block.gather(3, index).squeeze(3)  # (H, c_v, F): A[(f, s), (f', s)]
            self._same.index_add_(1, loc * Fr + frame, same)
            self._row_mass[:, rows] += block.sum(dim=(2, 3))

    # -- results (means over layer calls) ------------------------------------------

    def _mean(self, value: torch.Tensor | None) -> torch.Tensor:
        if value is None or self.layer_calls == 0:
            raise InvalidInput("attention stats: nothing captured yet (0 layer calls)")
        return value / self.layer_calls

    @property
    def lse(self) -> torch.Tensor:
        """(H, L + N_v) mean row logsumexp."""
        return self._mean(self._lse)

    @property
    def same_location(self) -> torch.Tensor:
        """(H, S, F, F) mean A[(f, s), (f', s)], indexed [h, s, f, f']."""
        same = self._mean(self._same)
        grid = self.grid
        assert grid is not None
        return same.view(same.shape[0], grid.spatial, grid.frames, grid.frames)

    @property
    def row_vision_mass(self) -> torch.Tensor:
        """(H, N_v) mean mass of each video query row on the video keys."""
        return self._mean(self._row_mass)

    @property
    def vision_mass(self) -> torch.Tensor:
        """(H,) mean total mass of the video-to-video block (sum of all its entries)."""
        return self.row_vision_mass.sum(dim=1)

    @property
    def text_to_vision(self) -> torch.Tensor:
        """(H, L, N_v) mean text-query rows over the video keys."""
        return self._mean(self._text)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def _rope(x: torch.Tensor, text_len: int, rotary: Any) -> torch.Tensor:
    if rotary is None:
        return x
    return torch.cat([x[:, :, :text_len], apply_rotary_emb(x[:, :, text_len:], rotary)], dim=2)


class StreamingAttnProcessor:
    """``CogVideoXAttnProcessor2_0``'s output, plus chunked capture into ``stats``."""

    def __init__(self, stats: AttentionStats, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise InvalidInput(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        self.stats, self.chunk_size = stats, chunk_size

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise InvalidInput("attention_mask: CogVideoX passes none; expected None, got a tensor")
        text_len, n_vision = encoder_hidden_states.size(1), hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = x.shape[0]
        q = _split_heads(attn.to_q(x), attn.heads)
        k = _split_heads(attn.to_k(x), attn.heads)
        v = _split_heads(attn.to_v(x), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q = _rope(q, text_len, image_rotary_emb)
        if not attn.is_cross_attention:
            k = _rope(k, text_len, image_rotary_emb)

        stats = self.stats
        if stats.memory:
            if batch % 2:
                raise InvalidInput(
                    f"hidden_states: cross-stream memory needs an even batch [main; reference], "
                    f"got {batch}"
                )
            half = batch // 2
            groups = [
                (
                    q[:half],
                    torch.cat([k[:half], k[half:]], dim=2),
                    torch.cat([v[:half], v[half:]], dim=2),
                ),
                (q[half:], k[half:], v[half:]),
            ]
        else:
            half = batch
            groups = [(q, k, v)]
        capture = None
        if stats.enabled:
            if not -half <= stats.capture_index < half:
                raise InvalidInput(
                    f"capture_index: expected an index into a batch of {half}, got {stats.capture_index}"
                )
            capture = stats.capture_index % half

        outputs = []
        for g, (qg, kg, vg) in enumerate(groups):
            if g or capture is None:
                outputs.append(F.scaled_dot_product_attention(qg, kg, vg, dropout_p=0.0))
                continue
            # The captured element's output comes from the chunked softmax; the rest from SDPA.
            out = torch.empty_like(qg)
            out[capture] = self._capture(qg[capture], kg[capture], vg[capture], text_len, n_vision)
            rest = [i for i in range(len(qg)) if i != capture]
            if rest:
                out[rest] = F.scaled_dot_product_attention(
                    qg[rest], kg[rest], vg[rest], dropout_p=0.0
                )
            outputs.append(out)
        out = torch.cat(outputs, dim=0)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, hidden_out = out.split([text_len, n_vision], dim=1)
        return hidden_out, encoder_out

    def _capture(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, n_vision: int
    ) -> torch.Tensor:
        """Chunked softmax attention of one element (H, N, d); accumulates the statistics."""
        stats = self.stats
        grid = stats._grid_for(text_len, n_vision)
        heads, n_query, dim = q.shape
        if stats._lse is None:
            stats._init(heads, grid, q.device)
        scale = 1.0 / math.sqrt(dim)
        kf, vf = k.float(), v.float()
        out = torch.empty(heads, n_query, dim, dtype=q.dtype, device=q.device)
        for start in range(0, n_query, self.chunk_size):
            stop = min(start + self.chunk_size, n_query)
            logits = torch.matmul(q[:, start:stop].float(), kf.transpose(1, 2)).mul_(scale)
            lse = torch.logsumexp(logits, dim=-1)
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()
            out[:, start:stop] = torch.matmul(probs, vf).to(q.dtype)
            stats._accumulate(probs, lse, start)
        stats.layer_calls += 1
        return out


@contextmanager
def capture_attention(
    transformer: Any, stats: AttentionStats, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[AttentionStats]:
    """Install a ``StreamingAttnProcessor`` on every attention layer for the block.

    The original processors come back on exit, also when the block raises. A
    forward pre-hook reads each call's token grid from ``hidden_states``
    (B, F, C, H, W) and the transformer's patch sizes.
    """
    config = transformer.config
    p, p_t = config.patch_size, config.patch_size_t

    def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, frames, _, height, width = latents.shape
        token_frames = frames if p_t is None else math.ceil(frames / p_t)
        stats._set_pending(token_frames, height // p, width // p)

    processor = StreamingAttnProcessor(stats, chunk_size)
    originals = dict(transformer.attn_processors)
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        transformer.set_attn_processor(processor)
        yield stats
    finally:
        handle.remove()
        transformer.set_attn_processor(originals)
