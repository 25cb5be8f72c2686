"""Streaming attention capture vs materialising the full softmax map, as the token count grows.

Tiny CogVideoX (2 layers x 2 heads, RoPE), one forward of a CFG batch of 2 with the
conditional element captured, on latents of growing frames x resolution (the VAE is
skipped). Three methods compute the same MHS/MTTI statistics:

* ``fused``: ``capture_attention`` as it runs on the CPU by default: row normalisers
  from the SDPA kernel's own logsumexp, the kept entries one dot product each;
* ``chunked``: ``capture_attention(method="chunked")``, query chunks of ``--chunk`` rows
  (0: ``auto_chunk_size``, printed), the path of devices without the fused kernel;
* ``naive``: each layer's full (H, N, N) softmax map is materialised and summed
  into a full-map accumulator; the statistics are read from it at the end.

``stock`` (the model's own processor, nothing captured) is timed too, as the floor.

Time: one subprocess per size runs the methods interleaved, ``--repeats`` rounds
(more at small sizes: at least 5 s of rounds) after a warm-up, so each round's methods see the same machine load; printed are the
median wall time per method and the median over rounds of each round's ratio to
``naive`` (CPU seconds of the process, ``time.process_time``, give the ``cpu``
ratios: less sensitive to a shared host). Peak memory: one fresh subprocess per
method and size, one forward, the process's peak RSS during it (VmHWM, reset
through /proc/self/clear_refs) minus its RSS just before. Also printed: the max abs
difference of the statistics of ``fused`` and ``chunked`` against ``naive``, and
the bytes of one full map set (layers x H x N^2 x 4). ``naive`` is skipped above
``--max-naive-n`` tokens (its maps would not fit this host's memory).

    .venv/bin/python bench/attention_capture.py [--chunk 0] [--repeats 5] [--threads 1]
        [--baseline OLD_attention.py]

``--baseline FILE`` times an earlier ``attention.py`` too (its own default chunk size),
interleaved with the others: ``git show REV:libs/vidalign/motionenhancer/attention.py``.
Where ``naive`` is skipped, "diff" compares against ``fused``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from vidalign.motionenhancer.attention import DEFAULT_CHUNK_SIZE, auto_chunk_size

SIZES = [(2, 16), (4, 32), (8, 32), (8, 48), (13, 48), (13, 64), (13, 96)]
"""(latent frames, latent side): N_v = frames * (side / 2)^2 video tokens (+ 64 text)."""
METHODS = ("fused", "chunked", "naive", "stock")
LAYERS, HEADS, TEXT = 2, 2, 64
MIN_SECONDS = 5.0
"""Each size runs at least ``--repeats`` rounds and at least this long (up to 500 rounds)."""


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


def _setup(threads: int, frames: int, side: int):
    from vidalign.motionenhancer.cogvideox import load_cogvideox

    torch.set_num_threads(threads)
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

    forward(torch.randn(2, 1, 4, 8, 8, generator=g))  # warm-up: first-call costs
    latents = torch.randn(2, frames, 4, side, side, generator=g)
    return teacher, transformer, forward, latents


_BASELINE: list = []


def _baseline(path: str):
    """An earlier ``attention.py`` (e.g. ``git show REV:libs/.../attention.py > FILE``)."""
    if not _BASELINE:
        spec = importlib.util.spec_from_file_location("attention_baseline", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        _BASELINE.append(module)
    return _BASELINE[0]


def _run(method: str, teacher, transformer, forward, latents, chunk: int, baseline: str = ""):
    """One capture forward; returns the statistics (None for ``stock``)."""
    from vidalign.motionenhancer import attention

    keys = ("same_location", "row_vision_mass", "text_to_vision")
    if method == "stock":
        forward(latents)
        return None
    if method in ("fused", "chunked"):
        stats = attention.AttentionStats()
        with attention.capture_attention(transformer, stats, chunk_size=chunk, method=method):
            forward(latents)
        return {k: getattr(stats, k) for k in keys}
    if method == "baseline":  # its own defaults
        module = _baseline(baseline)
        stats = module.AttentionStats()
        with module.capture_attention(transformer, stats):
            forward(latents)
        return {k: getattr(stats, k) for k in keys}
    naive = _Naive()
    originals = dict(transformer.attn_processors)
    transformer.set_attn_processor(naive)
    try:
        forward(latents)
    finally:
        transformer.set_attn_processor(originals)
    frames, side = latents.shape[1], latents.shape[-1]
    return naive.stats(teacher.spec.max_text_len, frames, (side // 2) ** 2)


def _methods(naive: bool, baseline: str) -> list[str]:
    return [m for m in METHODS if naive or m != "naive"] + (["baseline"] if baseline else [])


def time_size(
    frames: int, side: int, chunk: int, repeats: int, threads: int, naive: bool, baseline: str
) -> dict:
    """Methods interleaved over ``repeats`` rounds; per-method medians and per-round ratios."""
    teacher, transformer, forward, latents = _setup(threads, frames, side)
    methods = _methods(naive, baseline)
    run = lambda m: _run(m, teacher, transformer, forward, latents, chunk, baseline)  # noqa: E731
    began = time.perf_counter()
    results = {m: run(m) for m in methods}  # warm
    # small sizes: more rounds, at least MIN_SECONDS measured (ms-long forwards are noisy)
    rounds = max(repeats, min(500, math.ceil(MIN_SECONDS / (time.perf_counter() - began))))
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]  # no method always first
        for m in order:
            w, c = time.perf_counter(), time.process_time()
            run(m)
            wall[m].append(time.perf_counter() - w)
            cpu[m].append(time.process_time() - c)
    out: dict = {
        m: {"wall": statistics.median(wall[m]), "cpu": statistics.median(cpu[m])} for m in methods
    }
    out["rounds"] = rounds
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b, strict=True))  # noqa: E731
    reference = "naive" if naive else "fused"  # statistics compared against
    for m in methods:
        if naive:
            out[m]["ratio"] = ratio(wall[m], wall["naive"])
            out[m]["cpu_ratio"] = ratio(cpu[m], cpu["naive"])
        out[m]["over_stock"] = ratio(wall[m], wall["stock"])
        if results[m] is not None and m != reference:
            got, want = results[m], results[reference]
            out[m]["diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
    return out


def peak_size(
    method: str, frames: int, side: int, chunk: int, threads: int, baseline: str
) -> float:
    """Peak RSS growth (MB) of one capture forward in this (fresh) process."""
    teacher, transformer, forward, latents = _setup(threads, frames, side)
    base = _reset_peak()
    _run(method, teacher, transformer, forward, latents, chunk, baseline)
    return _status_mb("VmHWM") - base


def _child(args: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="0: auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-naive-n", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, default=len(SIZES), help="the first N sizes")
    parser.add_argument(
        "--baseline", default="", help="an earlier attention.py to time too, as 'baseline'"
    )
    parser.add_argument(
        "--time", nargs=3, metavar=("FRAMES", "SIDE", "NAIVE"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--peak", nargs=3, metavar=("METHOD", "FRAMES", "SIDE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.time:
        frames, side, naive = (int(x) for x in args.time)
        result = time_size(
            frames, side, args.chunk, args.repeats, args.threads, bool(naive), args.baseline
        )
        print(json.dumps(result))
        return
    if args.peak:
        method, frames, side = args.peak[0], int(args.peak[1]), int(args.peak[2])
        peak = peak_size(method, frames, side, args.chunk, args.threads, args.baseline)
        print(json.dumps({"peak_mb": peak}))
        return
    common = ["--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    common += ["--threads", str(args.threads), "--baseline", args.baseline]
    print(
        f"tiny CogVideoX, {LAYERS} layers x {HEADS} heads, text {TEXT} tokens, chunk {args.chunk} "
        f"(0: auto), {args.threads} thread(s), {args.repeats} interleaved rounds, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    captured = ["fused", "chunked"] + (["baseline"] if args.baseline else [])
    short = {"fused": "fused", "chunked": "chunk", "baseline": "base", "naive": "naive"}
    print(
        f"{'frames':>6} {'side':>4} {'N':>6} {'maps MB':>8} {'chunk':>5} {'rounds':>6} | "
        + " ".join(f"{short[m] + ' s':>7}" for m in [*captured, "naive"])
        + f" {'stock s':>7} | "
        + " ".join(f"{short[m] + '/n':>8}" for m in captured)
        + " "
        + " ".join(f"{'cpu ' + short[m][0] + '/n':>7}" for m in captured)
        + f" {'f/stock':>7} | "
        + " ".join(f"{short[m] + ' MB':>8}" for m in [*captured, "naive"])
        + " | "
        + " ".join(f"{'diff ' + short[m][0]:>7}" for m in captured)
    )
    nan = float("nan")
    for frames, side in SIZES[: args.sizes]:
        n = TEXT + frames * (side // 2) ** 2
        full_mb = LAYERS * HEADS * n * n * 4 / 2**20
        naive = n <= args.max_naive_n
        rows = args.chunk or auto_chunk_size(HEADS, n, n, torch.device("cpu"))
        t = _child([*common, "--time", str(frames), str(side), str(int(naive))])
        peaks = {
            m: _child([*common, "--peak", m, str(frames), str(side)])["peak_mb"]
            for m in _methods(naive, args.baseline)
            if m != "stock"
        }
        g = lambda m, k: t.get(m, {}).get(k, nan)  # noqa: E731, B023
        print(
            f"{frames:>6} {side:>4} {n:>6} {full_mb:>8.1f} {rows:>5} {t['rounds']:>6} | "
            + " ".join(f"{g(m, 'wall'):>7.3f}" for m in [*captured, "naive"])
            + f" {g('stock', 'wall'):>7.3f} | "
            + " ".join(f"{g(m, 'ratio'):>8.2f}" for m in captured)
            + " "
            + " ".join(f"{g(m, 'cpu_ratio'):>7.2f}" for m in captured)
            + f" {g('fused', 'over_stock'):>7.2f} | "
            + " ".join(f"{peaks.get(m, nan):>8.1f}" for m in [*captured, "naive"])
            + " | "
            + " ".join(f"{g(m, 'diff'):>7.1e}" for m in captured),
            flush=True,
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
