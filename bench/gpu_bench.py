"""GPU benchmark at the real model sizes, random init: ``make gpu-bench`` (one H100/H200, <= 8 min).

No weights are downloaded: every model is the real architecture built from its config
with random weights, directly on the device (``torch.device`` context; the big ones in
bfloat16), so construction takes seconds, not a CPU init and a copy. Timings and memory
do not depend on the weights' values.

Sections (peak memory reset before each, its models freed and the cache emptied after;
a section that fails records its error and the next one runs):

``teacher``  VDA's teacher: AnimateDiff (SD1.5 UNet + motion adapter at SD1.5's widths,
             the ``random-animatediff`` preset) in bfloat16 with a rank-16 LoRA adapter
             (stage 1's), fed 24 frames at 512 x 512 (the real teacher's input) and
             Video-LLaVA-7B's F_V (8 x 1024): loss + dL/dF_V per sample, one sample per
             request. samples/s and peak memory in-process (the TeacherEngine, what
             ``teacher.address: local`` runs) vs through a TeacherServer on loopback gRPC
             (the same engine, the same GPU), with the clip's latents cached by the
             teacher and with a new clip per call (VAE encode included).
``load``     The same teacher (at its preset's 256 x 256, so that a batch of 8 fits) behind two
             loopback TeacherServers, dynamic batching off and on (``--max-batch 8``): samples/s
             and latency percentiles for 1, 2, 4 and 8 concurrent gRPC clients of one-sample
             requests (``bench/teacher_load.py``'s cells), and the batching speed-up.
``priors``   MotionEnhancer prior extraction (PriorsEngine -> extract_priors: DDIM inversion,
             guided denoising with cross-stream memory, streaming attention capture, MHS,
             MTTI) on a CogVideoX1.5-5B-size teacher (transformer 42 layers x 48 heads x 64,
             T5-XXL encoder, CogVideoX VAE), 49 frames at 480 x 720, 5 inversion + 5
             denoising steps, CFG 6: s/sample and peak memory.
``student``  One training step of Video-LLaVA-7B (CLIP ViT-L/14 towers + 7B Llama): forward,
             backward and optimizer step on one clip (8 frames, ~2.2k tokens), every weight
             but the (unused) image tower trainable, as in MotionEnhancer's SFT.
             bfloat16 weights and gradients; AdamW keeps its state in bfloat16 too (fp32
             master weights + fp32 Adam state would need ~16 B/param = ~118 GB, more than
             an 80 GB GPU holds); LLM gradient checkpointing. Falls back to SGD (no state),
             and says so, on a GPU too small for that.

A global time budget (``--budget-s``, counted from start-up) bounds the run: a section
that cannot start within it is skipped with a message, and the repeated measurements
inside a section stop early when the time left is needed by the sections after it.

    python bench/gpu_bench.py --device cuda [--sections teacher load priors student] [--budget-s 480]
    python bench/gpu_bench.py --device cpu --tiny    # the same code on the tiny presets (seconds)

Writes JSON (``--json``, default runs/gpu_bench.json) and prints a markdown table.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts imports and CUDA start-up too

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("teacher", "load", "priors", "student")
DEFAULT_JSON = Path("runs/gpu_bench.json")
DEFAULT_BUDGET_S = 480.0

# Least time a section needs to give one measurement (construction included): a section
# is skipped when less is left, and the sections before it leave this much for it.
# Real sizes: rough estimates for one H100 from FLOP and memory-traffic counts, nothing
# measured yet: teacher ~50 TFLOP per call (UNet forward + backward to F_V); priors
# ~3.5 PFLOP bf16 + ~0.5 PFLOP fp32 + ~100 TB of fp32 attention-capture traffic per
# extraction (about a minute); student ~125 TFLOP per step.
MIN_SECTION_S = {
    False: {"teacher": 45.0, "load": 60.0, "priors": 90.0, "student": 45.0},
    True: {"teacher": 2.0, "load": 2.0, "priors": 2.0, "student": 2.0},
}

TEACHER_RESOLUTION = 512
"""Pixel side the real AnimateDiff teacher is fed (``animatediff-v1-5-2``); the
``random-animatediff`` preset's own default is 256."""
TEACHER_ITERS = {False: 10, True: 3}
"""Timed teacher calls per (path, mode), after one warm-up call."""
LOAD_REQUESTS = {False: 16, True: 4}
"""One-sample requests per load cell, split over its clients (at least LOAD_MIN_PER_CLIENT each)."""
LOAD_MIN_PER_CLIENT = {False: 2, True: 1}
LOAD_MAX_WAIT_MS = 10.0
"""The batching server's ``--max-wait-ms`` (the ``teacher serve`` default)."""
PRIORS_RUNS = {False: 2, True: 2}
"""Prior extractions: the first (cold) and repeats while the budget allows."""
PRIORS_VIDEO = {False: (49, 480, 720), True: None}
"""Frames, height, width of the clip (None: the tiny preset's native size)."""
STUDENT_STEPS = {False: 3, True: 2}
"""Timed training steps, after one warm-up step (which also allocates the optimizer state)."""
STUDENT_FRAMES = 8
"""Frames Video-LLaVA samples; its video path gives 8 x 257 tokens at 224 px."""
STUDENT_TEXT_TOKENS = (32, 64)
"""Prompt tokens and supervised answer tokens around the video tokens."""
PROMPT = "a person walks to the left, then turns and raises both arms above the head"
CAPTION = "a person walks to the left and raises both arms"

# CogVideoX1.5-5B (THUDM/CogVideoX1.5-5B, diffusers layout): transformer/config.json.
COGVIDEOX15_5B_TRANSFORMER = {
    "num_attention_heads": 48,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "time_embed_dim": 512,
    "ofs_embed_dim": None,
    "text_embed_dim": 4096,
    "num_layers": 42,
    "sample_width": 300,
    "sample_height": 300,
    "sample_frames": 81,
    "patch_size": 2,
    "patch_size_t": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "patch_bias": False,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
}
# Its vae/: the CogVideoX VAE (diffusers' defaults) with the 5B models' latent scale.
COGVIDEOX15_5B_VAE = {"scaling_factor": 0.7, "invert_scale_latents": True}
# Its text_encoder/: the T5 v1.1 XXL encoder.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
VIDEO_LLAVA_VOCAB = 32064
"""Llama vocabulary of the Video-LLaVA-7B text config: Vicuna's 32000 + <image>, <video>,
padded (the special ids 32000 and 32001 must be rows of the embedding)."""


# --- bookkeeping ------------------------------------------------------------------------


class Budget:
    """The global time budget, counted from the script's start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = STARTED + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Ctx:
    device: torch.device
    tiny: bool
    dtype: torch.dtype
    budget: Budget
    until: float = math.inf
    """Monotonic time by which this section should end (leaves the later sections theirs)."""
    tmp: Path = Path(".")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.until - time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-bench {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_gib(ctx: Ctx) -> float | None:
    """Peak GPU memory allocated by tensors since the last ``reset_peak`` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def allocated_gib(ctx: Ctx) -> float | None:
    return torch.cuda.memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def rss_peak_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


@contextmanager
def build_on(device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Construct modules directly on ``device`` (and in ``dtype``): random init runs there, no
    CPU init and no copy. The default device is thread-local: the gRPC threads do not see it."""
    previous = torch.get_default_dtype()
    with torch.device(device):
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def params_b(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def timed(ctx: Ctx, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(ctx)
    tic = time.perf_counter()
    out = fn()
    sync(ctx)
    return time.perf_counter() - tic, out


def timed_loop(ctx: Ctx, fn: Callable[[], Any], iters: int) -> list[float]:
    """Up to ``iters`` timed calls; stops early (after at least one) when the section's time
    left would not cover another call."""
    times: list[float] = []
    for _ in range(iters):
        if times and ctx.left() < max(times):
            break
        times.append(timed(ctx, fn)[0])
    return times


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


# --- 1. the AnimateDiff teacher: loss + dL/dF_V, in-process vs gRPC ----------------------


def _student_config(tiny: bool) -> Any:
    """Video-LLaVA's config: the tiny preset's or the 7B model's (CLIP ViT-L/14 + 7B Llama)."""
    from transformers import VideoLlavaConfig

    from vidalign.students import tiny_video_llava_config

    if tiny:
        return tiny_video_llava_config()
    # transformers' defaults are LanguageBind/Video-LLaVA-7B-hf's architecture: CLIP ViT-L/14
    # at 224 px for both towers, Llama-2-7B widths (4096 x 32 layers, 11008 MLP, 32 heads).
    return VideoLlavaConfig(text_config={"model_type": "llama", "vocab_size": VIDEO_LLAVA_VOCAB})


def bench_teacher(ctx: Ctx) -> dict[str, Any]:
    from vidalign.papers import VDA_LORA_RANK
    from vidalign.teacher.client import GrpcTeacher
    from vidalign.teacher.protocol import DenoisingLossRequest
    from vidalign.vda import TEACHER_MODELS, Adapter
    from vidalign_teacher.server import ServerConfig, TeacherServer

    name = "tiny-animatediff" if ctx.tiny else "random-animatediff"
    spec = TEACHER_MODELS[name]
    frames = spec.frames
    side = spec.resolution if ctx.tiny else TEACHER_RESOLUTION
    vision = _student_config(ctx.tiny).vision_config
    d_v, tokens, batch = vision.hidden_size, STUDENT_FRAMES, 1
    dtype_name = str(ctx.dtype).removeprefix("torch.")
    log(f"teacher: building {name} ({dtype_name}) on {ctx.device} behind a loopback TeacherServer")

    tic = time.perf_counter()
    server = TeacherServer(
        ServerConfig(model=name, host="127.0.0.1", port=0, device=str(ctx.device), dtype=dtype_name)
    )
    client = None
    try:
        with build_on(ctx.device):
            server.start()
        engine = server.servicer.engine
        teacher = engine.teacher
        adapter = Adapter.create(
            d_v=d_v,
            cond_dim=teacher.cond_dim,
            teacher_family=teacher.family,
            lora_rank=VDA_LORA_RANK,
            teacher=teacher,
        )
        path = ctx.tmp / f"{name}-adapter.safetensors"
        adapter.save(path)
        adapter_id = engine.load_adapter(path).id
        client = GrpcTeacher(f"127.0.0.1:{server.port}", wait_s=0.0)
        client.wait_ready(30.0)
        sync(ctx)
        construct_s = time.perf_counter() - tic
        result: dict[str, Any] = {
            "model": name,
            "dtype": dtype_name,
            "video": [frames, side, side],
            "latents": [
                teacher.latent_channels,
                frames,
                side // teacher.vae_scale_factor,
                side // teacher.vae_scale_factor,
            ],
            "features": [batch, tokens, d_v],
            "lora_rank": VDA_LORA_RANK,
            "batch": batch,
            "num_draws": 1,
            "unet_params_b": params_b(teacher.unet),
            "construct_s": construct_s,
            "weights_gib": allocated_gib(ctx),
        }
        log(f"teacher: built in {construct_s:.1f} s (UNet {result['unet_params_b']:.2f} B params)")

        gen = torch.Generator().manual_seed(0)
        features = torch.randn(batch, tokens, d_v, generator=gen).to(ctx.device)
        rng = np.random.default_rng(0)

        def clip() -> torch.Tensor:  # uint8 (B, F, H, W, 3): 19 MB at the real size
            return torch.from_numpy(
                rng.integers(0, 256, (batch, frames, side, side, 3), dtype=np.uint8)
            )

        def request(pixels: torch.Tensor, feats: torch.Tensor, seed: int) -> DenoisingLossRequest:
            return DenoisingLossRequest(
                sample_ids=[f"bench-{i}" for i in range(batch)],
                features=feats,
                pixels=pixels,
                captions=[CAPTION] * batch,
                adapter_id=adapter_id,
                seed=seed,
                num_draws=1,
                want_grad=True,
            )

        paths = {
            # What LocalTeacher does: the engine in this process, features on the device.
            "in_process": lambda pixels, seed: engine.denoising_loss(
                request(pixels, features, seed)
            ),
            # What RemoteDenoisingLoss does: features to the host, streamed over loopback gRPC.
            "grpc": lambda pixels, seed: client.denoising_loss(
                request(pixels, features.detach().cpu(), seed)
            ),
        }
        cached = clip()
        iters = TEACHER_ITERS[ctx.tiny]
        measured: dict[str, dict[str, Any]] = {}
        for mode in ("cached", "new_clip"):
            if measured and ctx.left() < 0:
                for path_name in paths:
                    measured[f"{path_name}_{mode}"] = {
                        "skipped": "the section's share of the budget is spent"
                    }
                continue

            # "cached": one clip, whose latents the engine keeps after the warm-up call; "new_clip":
            # a clip never seen (made outside the timing), so every call VAE-encodes it.
            def pixels(mode: str = mode) -> torch.Tensor:
                return cached if mode == "cached" else clip()

            warmup = {
                name: timed(ctx, lambda call=call: call(pixels(), 0))[0]
                for name, call in paths.items()
            }
            times: dict[str, list[float]] = {name: [] for name in paths}
            peaks: dict[str, float] = {name: 0.0 for name in paths}
            # The paths take turns call by call, so drift (clocks, other load) hits both alike.
            for i in range(iters):
                if i and ctx.left() < sum(t[-1] for t in times.values()):
                    break
                for name, call in paths.items():
                    clip_i = pixels()
                    reset_peak(ctx)
                    times[name].append(
                        timed(ctx, lambda call=call, clip_i=clip_i, i=i: call(clip_i, 1 + i))[0]
                    )
                    peaks[name] = max(peaks[name], peak_gib(ctx) or 0.0)
            for name in paths:
                key, t = f"{name}_{mode}", times[name]
                measured[key] = {
                    "samples_per_s": batch * len(t) / sum(t),
                    "s_per_call_median": float(np.median(t)),
                    "calls": len(t),
                    "warmup_s": warmup[name],
                    "peak_gpu_gib": peaks[name] if ctx.cuda else None,
                }
                log(
                    f"teacher: {key}: {measured[key]['samples_per_s']:.3f} samples/s over {len(t)} calls"
                    + (f", peak {peaks[name]:.2f} GiB" if ctx.cuda else "")
                )
        result["paths"] = measured
        if "samples_per_s" in measured.get("grpc_cached", {}):
            result["grpc_over_in_process_time_cached"] = (
                measured["in_process_cached"]["samples_per_s"]
                / measured["grpc_cached"]["samples_per_s"]
            )
        # The two paths answer the same request with the same engine: they must agree.
        local = paths["in_process"](cached, 7)
        remote = paths["grpc"](cached, 7)
        result["grpc_vs_in_process_max_abs_diff"] = {
            "loss": (local.losses - remote.losses).abs().max().item(),
            "grad": (local.grad - remote.grad).abs().max().item(),
        }
        result["peak_gpu_gib"] = (
            max((m.get("peak_gpu_gib") or 0.0) for m in measured.values()) if ctx.cuda else None
        )
        return result
    finally:
        if client is not None:
            client.close()
        server.stop(grace=0)
        server.servicer.engine = None


# --- 1b. the teacher under many clients: dynamic batching off and on ------------------------


def bench_load(ctx: Ctx) -> dict[str, Any]:
    """``bench/teacher_load.py`` on the device: two loopback TeacherServers (batching off,
    ``max_batch`` = the largest client count) with the section's teacher, 1/2/4/8
    closed-loop gRPC clients of one-sample requests each, cells alternating between the
    servers. Client counts whose turn comes after the section's share is spent are skipped."""
    import grpc
    import teacher_load  # bench/ is the script's directory, on sys.path

    from vidalign.teacher.client import channel_options
    from vidalign.teacher.v1 import teacher_pb2 as pb
    from vidalign.teacher.v1 import teacher_pb2_grpc as pb_grpc
    from vidalign.vda import TEACHER_MODELS, Adapter
    from vidalign_teacher.server import ServerConfig, TeacherServer

    name = "tiny-animatediff" if ctx.tiny else "random-animatediff"
    # The preset's own side (256 at real size), not the teacher section's 512: a batch of 8
    # clips x 24 frames at 512 would hold ~250 GiB of activations (`vidalign plan`'s teacher
    # model), at 256 ~62 GiB.
    side = TEACHER_MODELS[name].resolution
    d_v = _student_config(ctx.tiny).vision_config.hidden_size
    dtype_name = str(ctx.dtype).removeprefix("torch.")
    clients = teacher_load.CLIENTS
    log(f"load: building two {name} ({dtype_name}) servers on {ctx.device}, batching off / "
        f"up to {max(clients)}")
    tic = time.perf_counter()
    servers: dict[int, TeacherServer] = {}
    try:
        for max_batch in (1, max(clients)):
            server = TeacherServer(ServerConfig(
                model=name, host="127.0.0.1", port=0, device=str(ctx.device), dtype=dtype_name,
                max_batch=max_batch, max_wait_ms=LOAD_MAX_WAIT_MS,
                max_concurrent_rpcs=2 * max(clients), stream_idle_timeout_s=600.0,
                metrics_port=teacher_load.free_port()))
            with build_on(ctx.device):
                server.start()
            servers[max_batch] = server
        engine = servers[1].servicer.engine
        path = ctx.tmp / f"{name}-load-adapter.safetensors"
        adapter_id = Adapter.create(d_v=d_v, cond_dim=engine.teacher.cond_dim,
                                    teacher_family=engine.teacher.family).save(path)
        for server in servers.values():
            server.servicer.engine.load_adapter(path)
        address = {b: f"127.0.0.1:{server.port}" for b, server in servers.items()}
        with grpc.insecure_channel(address[1], options=channel_options()) as channel:
            info = pb_grpc.TeacherServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=60)
        construct_s = time.perf_counter() - tic

        def run_cell(max_batch: int, n: int, per_client: int) -> dict[str, Any]:
            registry = servers[max_batch].metrics.registry
            before = [registry.get_sample_value(f"vidalign_teacher_batch_samples_{k}") or 0.0
                      for k in ("count", "sum")]
            try:
                row = teacher_load.cell(address[max_batch], info, adapter_id, n, per_client, side)
            except SystemExit as exc:  # the script's way to stop; here one section fails
                raise RuntimeError(str(exc)) from None
            runs, samples = (
                (registry.get_sample_value(f"vidalign_teacher_batch_samples_{k}") or 0.0) - b
                for k, b in zip(("count", "sum"), before, strict=True))
            row.update(batching="on" if max_batch > 1 else "off", max_batch=max_batch,
                       samples_per_run=samples / runs if runs else 1.0)
            return row

        for max_batch in servers:  # warm-up: first calls, allocator, threads, kernels
            run_cell(max_batch, 2, 1)
        rows: list[dict[str, Any]] = []
        skipped: list[int] = []
        for i, n in enumerate(clients):
            # The last cell's time scaled by the requests of the next two (off and on).
            per_client = max(LOAD_MIN_PER_CLIENT[ctx.tiny], math.ceil(LOAD_REQUESTS[ctx.tiny] / n))
            if rows and ctx.left() < 2 * rows[-1]["wall_s"] * per_client * n / rows[-1]["requests"]:
                skipped = list(clients[i:])
                log(f"load: the section's share of the budget is spent; skipping {skipped} clients")
                break
            order = list(servers) if i % 2 == 0 else list(servers)[::-1]
            for max_batch in order:
                row = run_cell(max_batch, n, per_client)
                log(f"load: {n} clients, batching {row['batching']}: {row['samples_per_s']:.3f} "
                    f"samples/s, p99 {row['p99_s']:.3f} s, {row['samples_per_run']:.1f} samples/run")
                rows.append(row)
        rows.sort(key=lambda r: (r["batching"] == "on", r["clients"]))
        speedup = {
            str(r["clients"]): r["samples_per_s"] / off["samples_per_s"]
            for r in rows if r["batching"] == "on"
            for off in rows if off["batching"] == "off" and off["clients"] == r["clients"]
        }
        return {
            "model": name,
            "dtype": dtype_name,
            "video": [info.frames, side, side],
            "max_wait_ms": LOAD_MAX_WAIT_MS,
            "construct_s": construct_s,
            "rows": rows,
            "speedup": speedup,
            "skipped_clients": skipped,
            "peak_gpu_gib": peak_gib(ctx),
        }
    finally:
        for server in servers.values():
            server.stop(grace=0)
            server.servicer.engine = None


# --- 2. MotionEnhancer priors on a CogVideoX1.5-5B-size teacher ---------------------------


def build_cogvideox15_5b(ctx: Ctx) -> Any:
    """CogVideoX1.5-5B's classes and configs, random init, built on the device in ``ctx.dtype``.

    The tokenizer is the tiny preset's word-level T5 tokenizer (the real one's
    SentencePiece model cannot be downloaded here); prompts are padded to the real 226
    tokens either way, so the compute is the same.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from vidalign.motionenhancer import COGVIDEOX_MODELS, CogVideoXTeacher, tiny_t5_tokenizer
    from vidalign.motionenhancer.cogvideox import _cogvideox_scheduler

    spec = COGVIDEOX_MODELS["cogvideox1.5-5b"]
    scheduler = _cogvideox_scheduler()  # on the host, as a loaded one is
    tokenizer = tiny_t5_tokenizer(spec.max_text_len)
    with build_on(ctx.device, ctx.dtype):
        torch.manual_seed(0)
        transformer = CogVideoXTransformer3DModel(**COGVIDEOX15_5B_TRANSFORMER)
        vae = AutoencoderKLCogVideoX(**COGVIDEOX15_5B_VAE)
        text_encoder = T5EncoderModel(T5Config(**T5_XXL))
    teacher = CogVideoXTeacher(
        spec=spec,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
    )
    return teacher.to(device=ctx.device, dtype=ctx.dtype)


def bench_priors(ctx: Ctx) -> dict[str, Any]:
    from vidalign.motionenhancer import load_cogvideox
    from vidalign.papers import ME_DDIM_STEPS, ME_GUIDANCE
    from vidalign.teacher.priors import PriorsEngine
    from vidalign.teacher.protocol import AttentionPriorsRequest

    name = "tiny-cogvideox" if ctx.tiny else "cogvideox1.5-5b"
    log(f"priors: building {name} (random init) on {ctx.device}")
    tic = time.perf_counter()
    if ctx.tiny:
        with build_on(ctx.device):
            teacher = load_cogvideox(name, device=ctx.device, dtype=ctx.dtype)
    else:
        teacher = build_cogvideox15_5b(ctx)
    sync(ctx)
    construct_s = time.perf_counter() - tic
    engine = PriorsEngine(teacher, model_name=name)
    spec = teacher.spec
    frames, height, width = PRIORS_VIDEO[ctx.tiny] or (spec.frames, spec.height, spec.width)
    result: dict[str, Any] = {
        "model": name,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "video": [frames, height, width],
        "inversion_steps": ME_DDIM_STEPS,
        "denoising_steps": ME_DDIM_STEPS,
        "guidance": ME_GUIDANCE,
        "cross_stream_memory": True,
        "transformer_params_b": params_b(teacher.transformer),
        "text_encoder_params_b": params_b(teacher.text_encoder),
        "vae_params_b": params_b(teacher.vae),
        "construct_s": construct_s,
        "weights_gib": allocated_gib(ctx),
    }
    log(
        f"priors: built in {construct_s:.1f} s (transformer {result['transformer_params_b']:.2f} B, "
        f"T5 {result['text_encoder_params_b']:.2f} B params)"
    )
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    request = AttentionPriorsRequest(
        video=video, prompt=PROMPT, steps=ME_DDIM_STEPS, guidance=ME_GUIDANCE, memory=True
    )
    reset_peak(ctx)
    runs: list[float] = []
    priors = None
    for _ in range(PRIORS_RUNS[ctx.tiny]):
        if runs and ctx.left() < 1.2 * runs[-1]:
            break
        took, priors = timed(ctx, lambda: engine.attention_priors(request))
        runs.append(took)
        log(f"priors: one extraction in {took:.2f} s")
    assert priors is not None
    grid = priors.metadata["token_grid"]
    result.update(
        {
            "s_per_sample_first": runs[0],
            "s_per_sample_repeat": min(runs[1:]) if len(runs) > 1 else None,
            "runs": runs,
            "token_grid": grid,
            "video_tokens": grid["frames"] * grid["height"] * grid["width"],
            "captured_forwards": priors.metadata["forwards"],
            "layer_calls_captured": priors.metadata["layer_calls"],
            "selected_heads": len(priors.selected_heads),
            "selected_tokens": len(priors.selected_tokens),
            "peak_gpu_gib": peak_gib(ctx),
        }
    )
    return result


# --- 3. one training step of a 7B-size student -------------------------------------------


def bench_student(ctx: Ctx) -> dict[str, Any]:
    from transformers import VideoLlavaForConditionalGeneration

    from vidalign.papers import ME_LR_LLM, ME_WEIGHT_DECAY

    config = _student_config(ctx.tiny)
    name = "tiny-videollava" if ctx.tiny else "video-llava-7b"
    log(f"student: building {name} (random init, {ctx.dtype}) on {ctx.device}")
    tic = time.perf_counter()
    with build_on(ctx.device, ctx.dtype):
        torch.manual_seed(0)
        model = VideoLlavaForConditionalGeneration(config)
    model.to(device=ctx.device, dtype=ctx.dtype)
    sync(ctx)
    construct_s = time.perf_counter() - tic
    # The video path never runs the image tower: it would get no gradient.
    model.model.image_tower.requires_grad_(False)
    model.config.use_cache = False
    # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in v6).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    elem = torch.finfo(ctx.dtype).bits // 8
    # bf16 weights (all) + bf16 grads and two bf16 Adam moments (trainable ones).
    adamw_bytes = params_b(model) * 1e9 * elem + n_trainable * 3 * elem
    optimizer_name, why = (
        "AdamW",
        f"state in {str(ctx.dtype).removeprefix('torch.')}, the parameters' dtype",
    )
    if ctx.cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        if adamw_bytes > 0.85 * total:
            optimizer_name = "SGD"
            why = (
                f"AdamW would need ~{adamw_bytes / 2**30:.0f} GiB of weights, grads and state; "
                f"the GPU has {total / 2**30:.0f} GiB"
            )
    if optimizer_name == "AdamW":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            trainable, lr=ME_LR_LLM, weight_decay=ME_WEIGHT_DECAY, fused=ctx.cuda or None
        )
    else:
        optimizer = torch.optim.SGD(trainable, lr=ME_LR_LLM)

    text, answer = STUDENT_TEXT_TOKENS
    n_video = config.video_seq_length
    vocab = config.text_config.vocab_size
    low, high = 4, min(config.image_token_index, config.video_token_index)  # ordinary text ids
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.tensor([1]),
            torch.randint(low, high, (text // 2,), generator=gen),
            torch.full((n_video,), config.video_token_index),
            torch.randint(low, high, (text - text // 2 + answer,), generator=gen),
            torch.tensor([2]),
        ]
    )[None]
    labels = ids.clone()
    labels[:, : 1 + text + n_video] = -100  # supervise the answer and </s> only
    vision = config.vision_config
    pixels = torch.randn(1, STUDENT_FRAMES, 3, vision.image_size, vision.image_size, generator=gen)
    batch = {
        "input_ids": ids.to(ctx.device),
        "attention_mask": torch.ones_like(ids).to(ctx.device),
        "labels": labels.to(ctx.device),
        "pixel_values_videos": pixels.to(ctx.device, ctx.dtype),
    }

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    reset_peak(ctx)
    warmup_s, loss = timed(ctx, step)
    times = timed_loop(ctx, step, STUDENT_STEPS[ctx.tiny])
    result = {
        "model": name,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "params_b": params_b(model),
        "trainable_params_b": n_trainable / 1e9,
        "vocab": vocab,
        "sequence_tokens": ids.shape[1],
        "video_tokens": n_video,
        "frames": STUDENT_FRAMES,
        "optimizer": optimizer_name,
        "optimizer_note": why,
        "gradient_checkpointing": True,
        "construct_s": construct_s,
        "first_step_s": warmup_s,
        "s_per_step": float(np.median(times)),
        "steps": len(times),
        "loss": loss,
        "peak_gpu_gib": peak_gib(ctx),
    }
    log(
        f"student: {result['s_per_step']:.3f} s/step ({optimizer_name})"
        + (f", peak {result['peak_gpu_gib']:.2f} GiB" if ctx.cuda else "")
    )
    return result


BENCHES: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "teacher": bench_teacher,
    "load": bench_load,
    "priors": bench_priors,
    "student": bench_student,
}


# --- driver ------------------------------------------------------------------------------


def run_section(name: str, ctx: Ctx) -> dict[str, Any]:
    min_s = MIN_SECTION_S[ctx.tiny][name]
    left = ctx.budget.left()
    if left < min_s:
        message = (
            f"skipped: the time budget is spent ({max(left, 0.0):.0f} s of "
            f"{ctx.budget.seconds:.0f} s left, this section needs ~{min_s:.0f} s); "
            f"rerun with --sections {name}"
        )
        log(f"{name}: {message}")
        return {"status": "skipped", "message": message}
    free_memory(ctx)
    reset_peak(ctx)
    tic = time.perf_counter()
    error = None
    try:
        results = BENCHES[name](ctx)
    except Exception as exc:  # one section's failure must not stop the others
        error = f"{type(exc).__name__}: {exc}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - tic
    free_memory(ctx)  # the traceback and its frames are gone with the except block
    leftover = allocated_gib(ctx)
    if error is not None:
        log(f"{name}: failed after {seconds:.1f} s: {error}")
        return {
            "status": "error",
            "message": error,
            "seconds": seconds,
            "leftover_gpu_gib": leftover,
        }
    log(f"{name}: done in {seconds:.1f} s")
    return {"status": "ok", "seconds": seconds, "results": results, "leftover_gpu_gib": leftover}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    rows = [
        ("section", "measure", "value", "peak GPU GiB", "notes"),
        ("---", "---", "---:", "---:", "---"),
    ]
    sections = report["sections"]
    for name, section in sections.items():
        if section["status"] != "ok":
            rows.append((name, section["status"], "-", "-", section["message"].replace("|", "/")))
            continue
        r = section["results"]
        if name == "teacher":
            video = "x".join(map(str, r["video"]))
            for key, m in r["paths"].items():
                label = "gRPC loopback" if key.startswith("grpc") else "in-process"
                label += (
                    ", latents cached" if key.endswith("_cached") else ", new clip (+ VAE encode)"
                )
                if "samples_per_s" not in m:
                    rows.append((name, label, "-", "-", m.get("skipped", "")))
                    continue
                rows.append(
                    (
                        name,
                        f"loss + dL/dF_V, {label}",
                        f"{m['samples_per_s']:.3f} samples/s",
                        _fmt(m["peak_gpu_gib"], 2),
                        f"{r['model']} {r['dtype']}, {video}, LoRA r{r['lora_rank']}; "
                        f"median {m['s_per_call_median']:.3f} s/call over {m['calls']}",
                    )
                )
            if "grpc_over_in_process_time_cached" in r:
                diff = r["grpc_vs_in_process_max_abs_diff"]
                rows.append(
                    (
                        name,
                        "gRPC / in-process time (cached)",
                        f"{r['grpc_over_in_process_time_cached']:.3f}x",
                        "-",
                        f"built in {r['construct_s']:.1f} s; max |grad diff| {diff['grad']:.1e}",
                    )
                )
        elif name == "load":
            video = "x".join(map(str, r["video"]))
            for row in r["rows"]:
                up = r["speedup"].get(str(row["clients"])) if row["batching"] == "on" else None
                rows.append(
                    (
                        name,
                        f"{row['clients']} clients, batching {row['batching']}",
                        f"{row['samples_per_s']:.3f} samples/s",
                        _fmt(r["peak_gpu_gib"], 2),
                        f"{r['model']} {r['dtype']}, {video}; p50 {row['p50_s']:.3f} s, p99 "
                        f"{row['p99_s']:.3f} s; {row['samples_per_run']:.1f} samples/run"
                        + (f"; speed-up {up:.2f}x" if up is not None else ""),
                    )
                )
            if r["skipped_clients"]:
                rows.append((name, "skipped", "-", "-",
                             f"clients {r['skipped_clients']}: the budget's share is spent"))
        elif name == "priors":
            video = "x".join(map(str, r["video"]))
            notes = (
                f"{r['model']} {r['dtype']}, {video}, {r['inversion_steps']}+{r['denoising_steps']} "
                f"steps, CFG {r['guidance']:g}, {r['video_tokens']} video tokens; built in "
                f"{r['construct_s']:.1f} s"
            )
            rows.append(
                (
                    name,
                    "prior extraction, first call",
                    f"{r['s_per_sample_first']:.2f} s/sample",
                    _fmt(r["peak_gpu_gib"], 2),
                    notes,
                )
            )
            if r["s_per_sample_repeat"] is not None:
                rows.append(
                    (
                        name,
                        "prior extraction, repeat",
                        f"{r['s_per_sample_repeat']:.2f} s/sample",
                        _fmt(r["peak_gpu_gib"], 2),
                        "paper: 20-30 s on an A100",
                    )
                )
        elif name == "student":
            notes = (
                f"{r['model']} {r['dtype']}, {r['params_b']:.2f} B params ({r['trainable_params_b']:.2f} B "
                f"trained), {r['sequence_tokens']} tokens, {r['optimizer']} ({r['optimizer_note']}), "
                f"grad checkpointing; first step {r['first_step_s']:.2f} s; built in {r['construct_s']:.1f} s"
            )
            rows.append(
                (
                    name,
                    "train step (fwd + bwd + optimizer)",
                    f"{r['s_per_step']:.3f} s/step",
                    _fmt(r["peak_gpu_gib"], 2),
                    notes,
                )
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny presets instead of the real sizes"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="global time budget in seconds, start-up included (default %(default)s)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results"
    )
    args = parser.parse_args(argv)

    from vidalign.log import configure_logging

    configure_logging(level="WARNING")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu-bench: --device cuda, but CUDA is not available (use --device cpu --tiny for a dry run)",
            file=sys.stderr,
        )
        return 2
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    budget = Budget(args.budget_s)
    sections = [s for s in SECTIONS if s in args.sections]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": (
            torch.cuda.get_device_properties(device).total_memory / 2**30
            if device.type == "cuda"
            else None
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "sections": sections,
    }
    log(
        f"{'tiny presets' if args.tiny else 'real sizes'} on {meta['gpu'] or args.device}; "
        f"budget {args.budget_s:.0f} s; sections {' '.join(sections)}"
    )
    report: dict[str, Any] = {"meta": meta, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for i, name in enumerate(sections):
            later = sum(MIN_SECTION_S[args.tiny][s] for s in sections[i + 1 :])
            ctx = Ctx(
                device=device,
                tiny=args.tiny,
                dtype=torch.bfloat16,
                budget=budget,
                until=budget.deadline - later,
                tmp=Path(tmp),
            )
            report["sections"][name] = run_section(name, ctx)
    meta["wall_s"] = time.monotonic() - STARTED
    meta["peak_rss_gib"] = rss_peak_gib()
    report = rounded(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(markdown(report))
    print(f"\nwall {meta['wall_s']:.1f} s of a {args.budget_s:.0f} s budget; JSON: {args.json}")
    return 1 if any(s["status"] == "error" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
