"""Streaming attention capture vs materialising the full softmax map, as the token count grows.

Tiny CogVideoX (2 layers x 2 heads, RoPE), one forward of a CFG batch of 2 with the
conditional element captured, on latents of growing frames x resolution (the VAE is
skipped). Two methods compute the same MHS/MTTI statistics:

* ``stream``: ``capture_attention`` with query chunks of ``--chunk`` rows;
* ``naive``: each layer's full (H, N, N) softmax map is materialised and summed
  into a full-map accumulator; the statistics are read from it at the end.

Each measurement runs in a fresh subprocess; peak memory is the process's peak
RSS during the measured forwards (VmHWM, reset through /proc/self/clear_refs)
minus its RSS just before them. Also printed: the
max abs difference of the two methods' statistics (checked in the parent) and the
bytes of one full map set (layers x H x N^2 x 4).

    .venv/bin/python bench/attention_capture.py [--chunk 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time

import torch

from vidalign.motionenhancer.attention import DEFAULT_CHUNK_SIZE

SIZES = [(2, 16), (4, 32), (8, 32), (8, 48), (13, 48), (13, 64)]
"""(latent frames, latent side): N_v = frames * (side / 2)^2 video tokens (+ 64 text)."""


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak() -> float:
    """Reset the peak RSS (VmHWM, Linux >= 4.0) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


class _Naive:
    """Materialises the captured element's full softmax map in every layer call."""

    def __init__(self) -> None:
        self.full: torch.Tensor | None = None
        self.calls = 0

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        from vidalign.motionenhancer.attention import _rope, _split_heads

        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_split_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = (
            _rope(attn.norm_q(q), text_len, image_rotary_emb),
            _rope(attn.norm_k(k), text_len, image_rotary_emb),
        )
        out = torch.nn.functional.scaled_dot_product_attention(q[:-1], k[:-1], v[:-1])
        probs = (q[-1] @ k[-1].transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        self.full = probs if self.full is None else self.full + probs
        self.calls += 1
        out = torch.cat([out, (probs @ v[-1]).unsqueeze(0)]).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        enc, hid = out.split([text_len, hidden_states.size(1)], dim=1)
        return hid, enc

    def stats(self, text_len: int, frames: int, spatial: int) -> dict[str, torch.Tensor]:
        assert self.full is not None
        full = self.full / self.calls
        L, Nv = text_len, frames * spatial
        f, s, f2 = torch.meshgrid(
            torch.arange(frames), torch.arange(spatial), torch.arange(frames), indexing="ij"
        )
        return {
            "same_location": full[:, L + f * spatial + s, L + f2 * spatial + s].permute(0, 2, 1, 3),
            "row_vision_mass": full[:, L:, L : L + Nv].sum(-1),
            "text_to_vision": full[:, :L, L : L + Nv],
        }


def one(method: str, frames: int, side: int, chunk: int, repeats: int) -> dict:
    from vidalign.motionenhancer.attention import AttentionStats, capture_attention
    from vidalign.motionenhancer.cogvideox import load_cogvideox

    torch.set_num_threads(2)
    teacher = load_cogvideox("tiny-cogvideox")
    transformer = teacher.transformer
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, teacher.spec.max_text_len, 32, generator=g)

    def forward(latents):
        with torch.no_grad():
            transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                timestep=torch.tensor([500, 500]),
                image_rotary_emb=teacher.rotary_emb(latents),
            )

    forward(torch.randn(2, 1, 4, 8, 8, generator=g))  # warm-up
    latents = torch.randn(2, frames, 4, side, side, generator=g)
    base = _reset_peak()
    times = []
    for _ in range(repeats):  # the min over repeats: the host is shared and noisy
        began = time.perf_counter()
        if method == "stream":
            stats = AttentionStats()
            with capture_attention(transformer, stats, chunk_size=chunk):
                forward(latents)
            keys = ("same_location", "row_vision_mass", "text_to_vision")
            out = {k: getattr(stats, k) for k in keys}
        else:
            naive = _Naive()
            originals = dict(transformer.attn_processors)
            transformer.set_attn_processor(naive)
            forward(latents)
            transformer.set_attn_processor(originals)
            out = naive.stats(teacher.spec.max_text_len, frames, (side // 2) ** 2)
        times.append(time.perf_counter() - began)
    seconds = min(times)
    torch.save(out, f"/tmp/attention_capture_{method}.pt")
    return {"seconds": seconds, "peak_mb": _status_mb("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "FRAMES", "SIDE"))
    parser.add_argument("--max-naive-n", type=int, default=20_000)
    args = parser.parse_args()
    if args.one:
        method, frames, side = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one(method, frames, side, args.chunk, args.repeats)))
        return
    layers, heads, text = 2, 2, 64
    print(
        f"tiny CogVideoX, {layers} layers x {heads} heads, text {text} tokens, chunk {args.chunk}"
    )
    print(
        f"{'frames':>6} {'side':>4} {'N':>6} {'full maps MB':>12} | {'stream s':>8} {'stream MB':>9} | "
        f"{'naive s':>8} {'naive MB':>9} | {'max diff':>8}"
    )
    for frames, side in SIZES:
        n = text + frames * (side // 2) ** 2
        full_mb = layers * heads * n * n * 4 / 2**20
        row = {}
        for method in ("stream", "naive"):
            if method == "naive" and n > args.max_naive_n:
                continue
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--chunk",
                    str(args.chunk),
                    "--repeats",
                    str(args.repeats),
                    "--one",
                    method,
                    str(frames),
                    str(side),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row[method] = json.loads(result.stdout.strip().splitlines()[-1])
        diff = float("nan")
        if "naive" in row:
            a = torch.load("/tmp/attention_capture_stream.pt")
            b = torch.load("/tmp/attention_capture_naive.pt")
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        naive = row.get("naive", {"seconds": float("nan"), "peak_mb": float("nan")})
        print(
            f"{frames:>6} {side:>4} {n:>6} {full_mb:>12.1f} | {row['stream']['seconds']:>8.3f} "
            f"{row['stream']['peak_mb']:>9.1f} | {naive['seconds']:>8.3f} {naive['peak_mb']:>9.1f} | "
            f"{diff:>8.1e}"
        )


if __name__ == "__main__":
    main()
