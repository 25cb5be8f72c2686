"""Streaming attention capture for CogVideoX (docs/design.md, decision 6).

``StreamingAttnProcessor`` replaces ``CogVideoXAttnProcessor2_0`` on every
attention layer of a ``CogVideoXTransformer3DModel``. It computes the same
output (text tokens first, q/k norms, RoPE on the video part only), and for one
batch element, the *captured* one, it keeps only what MHS and MTTI need, without
ever holding its whole attention map (see "How" below):

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

**How (never the whole map).** Every output, the captured element's included,
is the model's own SDPA output. The captured element's rows are then read
through their normalisers: with ``lse`` known, any entry is one dot product,
A[i, j] = exp(q_i . k_j / sqrt(d) - lse_i), so the same-location entries
(N_v x F dot products per head) and the text rows (L x N_v) are computed
directly, and a video row's mass on the video keys is exp(lse^V_i - lse_i),
lse^V being the normaliser over the video keys alone. Two ways to get lse:

* ``fused`` (CPU): PyTorch's flash-attention kernel returns each row's
  logsumexp with the output (``_scaled_dot_product_flash_attention_for_cpu``,
  the kernel ``F.scaled_dot_product_attention`` runs on the CPU, bitwise the
  same output), and one more flash call over the video block gives lse^V. No
  query-by-key tile outlives the kernel's cache-sized blocks.
* ``chunked`` (other devices, or asked for): query rows in chunks; one
  ``baddbmm`` gives a chunk's scaled logits, then max, exp in place and two row
  sums (all keys, video keys) give lse and the row mass in one pass.
  ``chunk_size=0`` (the default) picks the rows per chunk from a memory budget
  (``auto_chunk_size``); an explicit value is the rows per chunk.

Memory: the kept statistics are O(H * (N + S F^2 + L N_v)), linear in N for a
fixed frame count and text length; transient work is one (H, chunk, N_keys)
float32 buffer (chunked), or the flash kernel's blocks (fused), plus (H, L, N_v)
for the text rows (the size of the kept text statistic).
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

DEFAULT_CHUNK_SIZE = 0
"""0: auto (``auto_chunk_size``). Otherwise query rows per chunk of the ``chunked``
method; a chunk's float32 logits take 4 * H * chunk * N_keys bytes: CogVideoX-5B
at 49 frames with cross-stream memory (48 heads, 35,552 keys), 256 rows: 1.7 GB."""

CPU_CHUNK_BYTES = 8 << 20
"""Auto chunk budget on the CPU: a chunk's logits stay near the caches (on a 2-core
Xeon with 2 MB L2 per core, 1-16 MB chunks ran alike and 32+ MB ones 1.5-2x slower)."""
ACCELERATOR_CHUNK_BYTES = 1 << 30
"""Auto chunk budget on an accelerator, at most 1/8 of its free memory: large
enough that each kernel fills the device, small beside the model."""

MIN_CHUNK_ROWS = 32
"""Auto chunks hold at least this many query rows (fewer would spend the time in
per-chunk overhead), or the whole query when it is shorter."""

CAPTURE_METHODS = ("auto", "fused", "chunked")


def auto_chunk_size(heads: int, n_query: int, n_keys: int, device: torch.device) -> int:
    """Query rows per chunk whose (heads, rows, n_keys) float32 logits fit the device's budget."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(ACCELERATOR_CHUNK_BYTES, free // 8)
    elif device.type != "cpu":
        budget = ACCELERATOR_CHUNK_BYTES
    return chunk_rows(budget, heads, n_query, n_keys)


def chunk_rows(budget_bytes: int, heads: int, n_query: int, n_keys: int) -> int:
    """Query rows per chunk whose (heads, rows, n_keys) float32 logits fit ``budget_bytes``
    (at least ``MIN_CHUNK_ROWS``, at most the whole query)."""
    rows = max(MIN_CHUNK_ROWS, budget_bytes // (4 * heads * max(n_keys, 1)))
    return max(1, min(n_query, rows))


def fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``fused`` method runs here: the CPU flash kernel that returns logsumexp."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _flash_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, d) SDPA output and (B, H, N) row logsumexp of q.k / sqrt(d), on the CPU."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)


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

    def _accumulate(
        self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, vision_mass: torch.Tensor
    ) -> None:
        """Add one layer call of the captured element.

        q (H, N, d) and k (H, N_keys, d) float32 after norms and RoPE; lse (H, N) every
        row's normaliser over all its keys; vision_mass (H, N_v) each video row's mass
        on the video keys. Entries are exp(q.k / sqrt(d) - lse), one dot product each.
        """
        grid = self.grid
        assert grid is not None and self._lse is not None
        assert self._same is not None and self._row_mass is not None and self._text is not None
        L, S, Fr, Nv = grid.text_len, grid.spatial, grid.frames, grid.n_vision
        heads, _, dim = q.shape
        scale = 1.0 / math.sqrt(dim)
        self._lse += lse
        self._row_mass += vision_mass
        k_vision = k[:, L : L + Nv]
        if L:  # text rows over the video keys: (H, L, N_v), the kept statistic's size
            text = torch.baddbmm(
                lse[:, :L, None].neg().expand(heads, L, Nv),
                q[:, :L],
                k_vision.transpose(1, 2),
                alpha=scale,
            )
            self._text += text.exp_()
        # same location: row (f, s) against keys (f', s) for every f', batched over (H, S)
        q_loc = q[:, L : L + Nv].reshape(heads, Fr, S, dim).transpose(1, 2)
        k_loc = k_vision.reshape(heads, Fr, S, dim).transpose(1, 2)
        lse_loc = lse[:, L : L + Nv].reshape(heads, Fr, S).transpose(1, 2)
        same = torch.matmul(q_loc, k_loc.transpose(-1, -2)).mul_(scale)  # (H, S, F, F)
        same = same.sub_(lse_loc.unsqueeze(-1)).exp_()
        self._same += same.reshape(heads, S * Fr, Fr)

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
    """``CogVideoXAttnProcessor2_0``'s output, plus capture into ``stats`` (see the module doc).

    ``chunk_size``: 0 = auto (``auto_chunk_size``), else query rows per chunk of the
    ``chunked`` method. ``method``: ``"auto"`` (``fused`` where ``fused_available``,
    else ``chunked``), ``"fused"`` or ``"chunked"``.
    """

    def __init__(
        self, stats: AttentionStats, chunk_size: int = DEFAULT_CHUNK_SIZE, method: str = "auto"
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise InvalidInput(f"chunk_size: expected an int >= 0 (0: auto), got {chunk_size!r}")
        if method not in CAPTURE_METHODS:
            raise InvalidInput(f"method: expected one of {CAPTURE_METHODS}, got {method!r}")
        self.stats, self.chunk_size, self.method = stats, chunk_size, method
        self._buffer: torch.Tensor | None = None

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
            else:
                outputs.append(self._capture(qg, kg, vg, capture, text_len, n_vision))
        out = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, hidden_out = out.split([text_len, n_vision], dim=1)
        return hidden_out, encoder_out

    def _fused(self, q: torch.Tensor) -> bool:
        if self.method == "chunked":
            return False
        available = fused_available(q.device, q.dtype)
        if self.method == "fused" and not available:
            raise InvalidInput(
                f"method: 'fused' needs the CPU flash-attention kernel, not available for "
                f"{q.device.type} / {q.dtype}"
            )
        return available

    def _capture(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        capture: int,
        text_len: int,
        n_vision: int,
    ) -> torch.Tensor:
        """SDPA output of the batch (B, H, N, d); accumulates element ``capture``'s statistics."""
        stats = self.stats
        grid = stats._grid_for(text_len, n_vision)
        heads = q.shape[1]
        if stats._lse is None:
            stats._init(heads, grid, q.device)
        L, Nv = text_len, n_vision
        qc, kc = q[capture].float(), k[capture].float()
        if self._fused(q):
            out, lse = _flash_lse(q, k, v)
            if q.dtype == torch.float32:
                lse = lse[capture]
            else:  # the statistics in float32, as the chunked method computes them
                _, lse = _flash_lse(qc[None], kc[None], v[capture, None].float())
                lse = lse[0]
            vc = v[capture].float()
            _, lse_vision = _flash_lse(
                qc[None, :, L:], kc[None, :, L : L + Nv], vc[None, :, L : L + Nv]
            )
            vision_mass = torch.exp(lse_vision[0] - lse[:, L:])
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
            lse, vision_mass = self._row_stats(qc, kc, L, Nv)
        stats._accumulate(qc, kc, lse, vision_mass)
        stats.layer_calls += 1
        return out

    def _row_stats(
        self, q: torch.Tensor, k: torch.Tensor, text_len: int, n_vision: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked: (H, N) row logsumexp and (H, N_v) video rows' mass on the video keys."""
        heads, n_query, dim = q.shape
        n_keys = k.shape[1]
        rows = self.chunk_size or auto_chunk_size(heads, n_query, n_keys, q.device)
        rows = min(rows, n_query)
        size = heads * rows * n_keys
        buffer = self._buffer  # kept across calls: no fresh pages per layer
        if buffer is None or buffer.numel() < size or buffer.device != q.device:
            buffer = self._buffer = torch.empty(size, dtype=torch.float32, device=q.device)
        scale = 1.0 / math.sqrt(dim)
        keys = k.transpose(1, 2)
        vision = slice(text_len, text_len + n_vision)
        lse = torch.empty(heads, n_query, dtype=torch.float32, device=q.device)
        mass = torch.empty_like(lse)
        for start in range(0, n_query, rows):
            stop = min(start + rows, n_query)
            logits = buffer[: heads * (stop - start) * n_keys].view(heads, stop - start, n_keys)
            logits.baddbmm_(q[:, start:stop], keys, beta=0.0, alpha=scale)  # beta 0: buffer unread
            peak = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(peak).exp_().sum(dim=-1)
            torch.add(peak.squeeze(-1), total.log(), out=lse[:, start:stop])
            torch.div(logits[:, :, vision].sum(dim=-1), total, out=mass[:, start:stop])
        return lse, mass[:, text_len:]


@contextmanager
def capture_attention(
    transformer: Any,
    stats: AttentionStats,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    method: str = "auto",
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

    processor = StreamingAttnProcessor(stats, chunk_size, method)
    originals = dict(transformer.attn_processors)
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        transformer.set_attn_processor(processor)
        yield stats
    finally:
        handle.remove()
        transformer.set_attn_processor(originals)
