"""Memory plan of a job: parameters and per-GPU bytes of weights, gradients, optimizer state
and activations, for a config, its precision, its DeepSpeed settings and a number of ranks
(``vidalign plan --config FILE [--ranks N] [--job ...]``). Pure functions of the config;
nothing is allocated, downloaded or read from a network.

**Parameters** are counted exactly: the models are built from their configs on the ``meta``
device and their parameters summed (tied ones once). Tiny presets use the registries'
configs; real checkpoints use the published config.json numbers in the tables below
(``STUDENT_CONFIGS``, ``SD15``, ``COGVIDEOX``), which reproduce the model cards' sizes:
Video-LLaVA-7B 7.37 B, Qwen2.5-VL-7B 8.29 B, InternVL3-8B 7.94 B, LLaVA-NeXT-Video-7B 7.06 B;
SD1.5 UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M, AnimateDiff v1-5-2 motion modules
453.2 M; CogVideoX1.5-5B transformer 5.57 B, T5-XXL encoder 4.76 B. A teacher directory is
read from its own configs. Trainable counts follow the jobs: stage 1 W_proj + the UNet LoRA
(every ``to_q/to_k/to_v/to_out.0``, motion modules included); stage 2 the encoder up to its
feature layer (what the encoder leaves trainable); stage 3 LoRA r x (in + out) per Linear
``lora.target_modules`` matches; SFT every weight but Video-LLaVA's image tower, plus the
aligner (2 N h + h^2 + 2 h + N). What is in the process: stage 1 the whole teacher; stage 2
the encoder (the teacher is a service; ``teacher.address: local`` adds it); stage 3 and SFT
the VideoLLM; features the encoder; priors the CogVideoX pipeline.

**Bytes per GPU**, P_t trainable parameters, N ranks:

- weights: frozen 4 B (fp32) or 2 B (bf16/fp16 storage; stage 2's encoder and the
  features and priors jobs load float32); trainable 4 B (the float32 master weights of
  ``vidalign.precision``). Under DeepSpeed bf16/fp16 every weight of the module the engine
  wraps is 2 B (it casts the module; the master copy is the optimizer's); ZeRO-3: / N, but
  parameters under ``deepspeed.param_persistence_threshold`` elements stay whole.
- gradients: 4 B x P_t (float32), / N at ZeRO >= 2.
- optimizer state: AdamW's two moments, 8 B x P_t, + 4 B x P_t for DeepSpeed's float32
  master copy when the weights are half; / N at ZeRO >= 1.
- buffers: DDP (N > 1 without DeepSpeed) keeps a flat copy of the gradients in its buckets,
  4 B x P_t. DeepSpeed (``contiguous_gradients``) allocates one whole
  ``reduce_bucket_size`` staging buffer in the module's dtype (measured: 1.0 GB for the
  default 5e8 elements at bf16, whatever the model's size); ZeRO-3 adds one layer's
  gathered weights (rough).
- activations: below.
- total: the sum; an upper bound in that all gradients and all saved activations are never
  alive together (the backward frees activations as it makes gradients).

**Activations** are what autograd saves for the backward, counted per tensor as
``torch.autograd.graph.saved_tensors_hooks`` sees them, in three regimes: ``fp32`` (4 B),
``autocast`` (bf16/fp16 compute over float32 master weights: half tensors of 2 B, a float32
residual stream, and each trained linear keeps its own half cast of a float32 input) and
``half`` (the module's weights are half: DeepSpeed bf16/fp16, or stage 3's frozen model).
Per token and pre-norm transformer layer (h hidden, k the k/v width, I the MLP width, a = 4
or 2 B, c the trained linears reading a norm: 3 for q/k/v, 1 fused, 1 or 2 in the MLP):

=================  ============================================  ===========================
                   trained (its weights learn)                   frozen, gradient through
=================  ============================================  ===========================
each norm          fp32: LayerNorm 2h x 4 (in, out); RMSNorm      4h B (its input, float32)
                   3h x 4 (x, x/rms, out). autocast: LayerNorm
                   4h + 2hc, RMSNorm 8h + 2hc; half: LayerNorm
                   4h + 2hc, RMSNorm 8h
attention (SDPA)   a (2h + 2k): q, k, v, out (fused qkv with      the same
                   rotary and windows, Qwen's ViT: 7h a)
MLP                a 4I (SwiGLU); a 2I (GELU), 3I (quick_gelu)    a 3I (SwiGLU); a I, 2I
layer scale        + 2h a (InternViT)
LoRA r on q/k/v/o                                                 + its input (4h B; under
                                                                  autocast 2h B per LoRA) + 4r a
=================  ============================================  ===========================

plus the log-sum-exp (4 B x heads) and, for an LLM batch with padding (b > 1), the float
copy of the boolean mask that SDPA makes in every layer, b s^2 a (with GQA and a mask, k
and v reach SDPA as repeat_kv's copies: k = h). This is Korthikanti et al. (2022)'s
``s*b*h*(34 + 5*A*s/h)`` bytes per layer at 16 bit, redone for SDPA (its flash kernels keep
q, k, v, the output and the log-sum-exp, never the A s^2 scores), SwiGLU, RMSNorm, no
dropout, frozen weights and mixed precision. With ``train.gradient_checkpointing`` a stack
keeps each layer's input, b s h a, plus one layer's activations while it is recomputed.

Around the layers: the preprocessing (the uint8 clips, the sampled frames and three float
copies), the pixels a trained patch embedding keeps (float32, + a half copy), CLIP's
pre-norm input, the projector or merger, the final norm, and the logits: b s V x 4 B of
float32 log-softmax saved by the cross-entropy, and twice that more at the start of the
backward (its gradients). SFT's attention capture adds per LLM layer a recomputed k and the
captured rows, b s (h + A R + R) x 4 B for R aligned rows (rough: R is assumed
``ME_TOKEN_RATIO`` of the text tokens). Layers that run after the feature layer keep their
tensors until the tower returns (Video-LLaVA's last ViT layer). Without DeepSpeed, autocast's
cached half copies of the float32 weights are kept for the backward: 2 B x P_t. The
activation term is the largest of: what is saved up to a point of the forward plus what is
alive only there (one layer's working set, (2h + I) a per token; those trailing layers; the
preprocessing), and everything saved plus the logits' gradients at the start of the
backward.

Rough terms, said so in the printed plan: the teacher's UNet (per pixel and frame, with the
gradient passing through: a ResNet 2 c_in + 2 c, a spatial transformer 24 c + 6 r plus keys
and values over the condition tokens, a motion module 28 c + 8 r, x a) and its VAE; the
aligned rows; the inference working sets (features: the pixels, the hidden states the tower
returns and one layer; priors: CogVideoX's block working set ~17h per token and stream, a
chunk of attention logits ``4 A chunk N_keys`` B, the kept statistics and the VAE's encoder,
~4 x 128 channels per pixel over 10 frames); ZeRO-3's gathered layer.

Checked against the tiny presets on the CPU (every tensor storage alive, counted at the
dispatcher: tests/support/memory.py), two training steps of stage 2, stage 3 and SFT are
within 11% of the measured peak on every student family in fp32, on Video-LLaVA and
Qwen2.5-VL in bf16, and on Video-LLaVA under one-rank DeepSpeed ZeRO-1/2/3 (fp32, bf16);
stage 1, features and priors within 10% (tests/e2e/test_memory_plan.py). Kernels differ on GPUs (cuDNN convolutions, flash
attention's own workspaces), and the real sizes were not measured here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vidalign.errors import InvalidInput, VidalignError

GiB = 1 << 30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
JOBS = ("stage1", "stage2", "stage3", "sft", "features", "priors")
DEFAULT_TEXT_TOKENS = 128
"""Text tokens of a training example (chat template, prompt, reply) when not given: a caption
or a MotionBench question with its options, in a BPE vocabulary."""
DEFAULT_FEATURE_DIM = 1024
"""d_v of W_proj for stage 1 when its feature set cannot be read: Video-LLaVA-7B's ViT-L/14."""
DEFAULT_FEATURE_TOKENS = 8
"""F_V tokens per clip for stage 1 (frame pooling of 8 frames) when not known."""
CFG_STREAMS = 2
"""Classifier-free guidance runs the unconditional and conditional streams in one batch."""

# --- published configs ----------------------------------------------------------------
# Each is the model repository's config.json (transformers / diffusers format), reduced to the
# numbers that set a size; the rest are the classes' defaults, which match.

STUDENT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # LanguageBind/Video-LLaVA-7B-hf: CLIP ViT-L/14 224 px video and image towers (the
    # transformers defaults), Vicuna-7B (Llama: 4096 x 32 layers, MLP 11008, 32 heads),
    # vocabulary 32064.
    "video-llava-7b": ("VideoLlavaConfig", {
        "text_config": {"model_type": "llama", "vocab_size": 32064},
    }),
    # llava-hf/LLaVA-NeXT-Video-7B-hf: CLIP ViT-L/14-336, Vicuna-7B, vocabulary 32064.
    "llava-next-video-7b": ("LlavaNextVideoConfig", {
        "text_config": {"model_type": "llama", "vocab_size": 32064},
    }),
    # Qwen/Qwen2.5-VL-7B-Instruct: ViT 1280 x 32 blocks (MLP 3420, 16 heads, patch 14, merge 2,
    # temporal patch 2, window 112), LLM 3584 x 28 layers, MLP 18944, 28 heads / 4 KV heads,
    # vocabulary 152064, untied head.
    "qwen2.5-vl-7b": ("Qwen2_5_VLConfig", {
        "vision_config": {
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
        "text_config": {
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": False,
    }),
    # OpenGVLab/InternVL3-8B-hf: InternViT-300M-448px-V2.5 (1024 x 24 layers, MLP 4096, 16 heads,
    # qkv bias, 448 px, patch 14), Qwen2.5-7B LLM (3584 x 28, MLP 18944, 28 / 4 KV heads),
    # vocabulary 151674.
    "internvl3-8b": ("InternVLConfig", {
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": [448, 448], "patch_size": [14, 14],
            "attention_bias": True, "layer_norm_eps": 1e-6,
        },
        "text_config": {
            "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 151674,
        },
        "tie_word_embeddings": False,
    }),
}

SD15: dict[str, dict[str, Any]] = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json.
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 32, "sample_size": 512,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    },
    # openai/clip-vit-large-patch14's text model.
    "text_encoder": {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    # guoyww/animatediff-motion-adapter-v1-5-2 (and -v1-5-3): config.json.
    "motion_adapter": {
        "block_out_channels": (320, 640, 1280, 1280), "motion_layers_per_block": 2,
        "motion_mid_block_layers_per_block": 1, "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32, "motion_max_seq_length": 32, "use_motion_mid_block": True,
    },
}

_COGVIDEOX_5B_TRANSFORMER = {
    "num_attention_heads": 48, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
    "time_embed_dim": 512, "text_embed_dim": 4096, "num_layers": 42, "sample_width": 90,
    "sample_height": 60, "sample_frames": 49, "patch_size": 2, "temporal_compression_ratio": 4,
    "max_text_seq_length": 226, "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
}
# google/t5-v1_1-xxl's encoder, CogVideoX's text_encoder/.
_T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "feed_forward_proj": "gated-gelu",
}
COGVIDEOX: dict[str, dict[str, dict[str, Any]]] = {
    # THUDM/CogVideoX-5b: transformer/config.json; the VAE is diffusers' defaults.
    "cogvideox-5b": {"transformer": _COGVIDEOX_5B_TRANSFORMER, "vae": {}, "text_encoder": _T5_XXL},
    # THUDM/CogVideoX1.5-5B: 2-frame temporal patches, no patch bias, 81 x 768 x 1360.
    "cogvideox1.5-5b": {
        "transformer": {
            **_COGVIDEOX_5B_TRANSFORMER, "sample_width": 300, "sample_height": 300,
            "sample_frames": 81, "patch_size_t": 2, "patch_bias": False,
        },
        "vae": {},
        "text_encoder": _T5_XXL,
    },
}


# --- the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A named piece of the activation estimate (bytes)."""

    name: str
    bytes: int


@dataclass
class MemoryPlan:
    """Parameters and per-GPU bytes of one job (module docstring)."""

    job: str
    what: str
    """What runs in the process, in words."""
    ranks: int
    precision: str
    zero_stage: int | None
    """None: no DeepSpeed."""
    params_total: int
    params_trainable: int
    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    parts: list[Part] = field(default_factory=list)
    """The activation estimate's pieces (the phase that sets it)."""
    assumptions: list[str] = field(default_factory=list)
    rough: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations

    def rows(self) -> list[tuple[str, int]]:
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer state", self.optimizer)]
        if self.buffers:
            rows.append(("buffers", self.buffers))
        rows += [("activations (estimate)", self.activations), ("total", self.total)]
        return rows


def _size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _unit(total: int) -> tuple[str, int]:
    for name, scale in (("GiB", GiB), ("MiB", 1 << 20)):
        if total >= scale:
            return name, scale
    return "KiB", 1 << 10


def format_plan(plan: MemoryPlan) -> str:
    """The plan as ``vidalign plan`` prints it."""
    zero = "no DeepSpeed" if plan.zero_stage is None else f"DeepSpeed ZeRO-{plan.zero_stage}"
    unit, scale = _unit(plan.total)
    lines = [
        f"{plan.job}: {plan.what}",
        f"  {plan.ranks} rank(s), {plan.precision}, {zero}",
        f"  parameters: {_size(plan.params_total)} total, {_size(plan.params_trainable)} trainable",
        f"  {'per GPU':<24}{unit:>10}",
    ]
    lines += [f"  {name:<24}{value / scale:>10.2f}" for name, value in plan.rows()]
    if plan.parts:
        lines.append(f"  activations ({unit}): "
                     + ", ".join(f"{p.name} {p.bytes / scale:.2f}" for p in plan.parts))
    if plan.assumptions:
        lines.append("  assumed: " + "; ".join(plan.assumptions))
    if plan.rough:
        lines.append("  rough: " + "; ".join(plan.rough))
    return "\n".join(lines)


# --- building models on meta ----------------------------------------------------------


def _meta():
    import torch

    return torch.device("meta")


def _count(params: Iterable[Any]) -> int:
    return sum(p.numel() for p in params)


def student_config(name: str) -> Any:
    """The transformers config of a registered student: a tiny preset's, or the published one."""
    import transformers

    from vidalign.students import get_student_spec

    spec = get_student_spec(name)
    if spec.tiny:
        from vidalign import students

        tiny = {"video-llava": students.tiny_video_llava_config,
                "qwen2.5-vl": students.tiny_qwen2_5_vl_config,
                "internvl": students.tiny_internvl_config,
                "llava-next-video": students.tiny_llava_next_video_config}
        if spec.family not in tiny:
            raise InvalidInput(f"plan: no tiny config for student family {spec.family!r}")
        return tiny[spec.family]()
    if name not in STUDENT_CONFIGS:
        raise InvalidInput(f"plan: no published config for student {name!r}; known: "
                           f"{sorted(STUDENT_CONFIGS)}")
    cls, kwargs = STUDENT_CONFIGS[name]
    return getattr(transformers, cls)(**kwargs)


def meta_student(name: str) -> tuple[Any, Any, Any]:
    """(spec, whole VideoLLM on the meta device, its family's encoder on the model's tower)."""
    import torch
    import transformers

    from vidalign.students import get_family, get_student_spec

    spec = get_student_spec(name)
    family = get_family(spec)
    config = student_config(name)
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    encoder = family.make_encoder(spec, model.get_submodule(family.tower), model.config, "frame")
    return spec, model, encoder


# --- the activation model -------------------------------------------------------------


REGIMES = ("fp32", "autocast", "half")
"""How a job's activations are stored: ``fp32``; ``autocast`` (bf16/fp16 compute, float32
master weights: the residual stream is float32 and each linear casts its input); ``half``
(the module's weights are half: DeepSpeed's bf16/fp16, or stage 3's frozen model)."""


@dataclass(frozen=True)
class Stack:
    """A stack of pre-norm transformer layers as the activation model sees it."""

    hidden: int
    kv: int
    heads: int
    intermediate: int
    norm: str
    """``layer`` (LayerNorm) or ``rms`` (HF's RMSNorm, computed in Python)."""
    gated: bool
    """SwiGLU MLP (gate, up, down) rather than fc1 -> activation -> fc2."""
    act_saves: int = 1
    """Tensors of width I the plain MLP's activation saves (GELU, SiLU: 1; quick_gelu: 2)."""
    scale: bool = False
    """Layer scale after attention and MLP (InternViT)."""
    fused_qkv: bool = False
    """One qkv projection, rotary q/k and attention in chunks (Qwen2.5-VL's ViT): its output,
    the rotated q and k, the chunks' outputs and their concatenation are kept, 7h."""

    def norm_bytes(self, mode: str, regime: str, consumers: int) -> int:
        """Bytes per token a norm keeps, with ``consumers`` trained linears reading it."""
        h = self.hidden
        if mode != "full":
            return 4 * h  # its input (float32 under autocast and for RMSNorm's upcast)
        if regime == "fp32":
            return (2 if self.norm == "layer" else 3) * h * 4
        if self.norm == "layer":  # float32 in, float32 out: each linear keeps its half cast
            return 4 * h + consumers * 2 * h
        if regime == "autocast":  # float32 x and x/rms; each linear casts the float32 output
            return 8 * h + consumers * 2 * h
        return 4 * h + 2 * h + 2 * h  # x upcast, x/rms and the output in the half type

    def bytes(self, mode: str, regime: str, *, lora_rank: int = 0, lora_linears: int = 0,
              kv: int | None = None) -> int:
        """Saved bytes per token of one layer: ``full`` (its weights train) or ``through``
        (frozen, the gradient passes through it; LoRA on ``lora_linears`` of q, k, v, o)."""
        h, inter = self.hidden, self.intermediate
        kv = self.kv if kv is None else kv
        a = 4 if regime == "fp32" else 2
        attention = a * (7 * h if self.fused_qkv else 2 * h + 2 * kv)
        mlp_in = 2 if self.gated else 1
        if mode == "full":
            norms = (self.norm_bytes(mode, regime, 1 if self.fused_qkv else 3)
                     + self.norm_bytes(mode, regime, mlp_in))
            mlp = a * (4 * inter if self.gated else (self.act_saves + 1) * inter)
            return norms + attention + mlp + (2 * h * a if self.scale else 0)
        mlp = a * (3 * inter if self.gated else self.act_saves * inter)
        lora = 0
        if lora_linears:
            on_input = min(lora_linears, 3)  # q, k, v read the norm's output; o reads attention's
            lora = (h * 4 if regime == "fp32" else 2 * h * (1 if regime == "half" else on_input))
            lora += lora_linears * lora_rank * a
        return 2 * self.norm_bytes(mode, regime, 0) + attention + mlp + lora

    def working(self) -> int:
        """Elements per token alive only inside one layer's forward (its working set)."""
        return 2 * self.hidden + self.intermediate


def _act_saves(act: str) -> int:
    return 2 if act == "quick_gelu" else 1


class Activations:
    """Pieces of the forward in order: saved (kept for the backward) and transient (alive only
    at that point); the estimate is the largest phase (module docstring)."""

    def __init__(self, regime: str) -> None:
        self.regime = regime
        self.act = 4 if regime == "fp32" else 2
        self.pieces: list[tuple[str, int, int]] = []
        self.backward = 0

    def add(self, name: str, saved: int, transient: int = 0) -> None:
        self.pieces.append((name, int(saved), int(transient)))

    def stack(self, name: str, stack: Stack, *, sequences: int, tokens: int, layers: int,
              mode: str, trailing: int = 0, trailing_mode: str = "through",
              masked: bool = False, lora_rank: int = 0, lora_linears: int = 0,
              kv: int | None = None, checkpointing: bool = False) -> None:
        """``layers`` layers in ``mode`` (``full``, ``through`` or ``none``: no gradient),
        then ``trailing`` layers in ``trailing_mode`` that run but whose output nothing uses
        (their tensors are kept until the tower returns)."""
        a, n = self.act, sequences * tokens
        per_layer = n * (stack.bytes(mode, self.regime, lora_rank=lora_rank,
                                     lora_linears=lora_linears, kv=kv)
                         + 4 * stack.heads) if mode != "none" else 0
        mask = sequences * tokens * tokens * a if masked else 0
        working = n * stack.working() * a + mask
        if mode == "none":
            self.add(name, 0, working)
            return
        if checkpointing:
            saved = layers * n * stack.hidden * a
            self.add(name, saved, per_layer + mask + working)
        else:
            self.add(name, layers * (per_layer + mask), working)
        if trailing:
            after = n * (stack.bytes(trailing_mode, self.regime) + 4 * stack.heads) + mask
            self.add(f"{name} (after the feature layer)", 0, trailing * after + working)

    def estimate(self) -> tuple[int, list[Part]]:
        best, parts, saved = 0, [], 0
        for i, (_name, s, t) in enumerate(self.pieces):
            saved += s
            if saved + t > best:
                best = saved + t
                parts = [Part(n, b) for n, b, _ in self.pieces[: i + 1] if b] + (
                    [Part(f"{self.pieces[i][0]}: alive there", t)] if t else [])
        if saved + self.backward > best:
            best = saved + self.backward
            parts = [Part(n, b) for n, b, _ in self.pieces if b] + [
                Part("backward start (logits' gradients)", self.backward)]
        return best, parts


# --- student geometry -------------------------------------------------------------------


@dataclass
class Student:
    """What the activation model needs to know about a VideoLLM."""

    spec: Any
    model: Any
    encoder: Any
    vision: Stack
    vision_layers: int
    """Layers up to the feature layer."""
    trailing: int
    """Layers that run after the feature layer."""
    vision_sequences: int
    """Sequences the tower sees per video (frames as images; Qwen: temporal patches)."""
    vision_tokens: int
    pre_norm: bool
    pixels: int
    """Elements of the tower's input per video."""
    keeps_hidden_states: bool
    video_tokens: int
    """LLM tokens per video."""
    projector_full: int
    """Elements the projector / merger saves per LLM video token when it trains."""
    llm: Stack
    llm_layers: int
    vocab: int


def describe_student(name: str) -> Student:
    spec, model, encoder = meta_student(name)
    config = model.config
    vc, tc = config.vision_config, config.text_config
    family = spec.family
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    llm = Stack(tc.hidden_size, kv_heads * head_dim, tc.num_attention_heads,
                tc.intermediate_size, "rms", gated=True)
    frames = spec.num_frames
    from vidalign.students import get_family

    grid = get_family(spec).vision_grid(encoder, config)
    if family in ("video-llava", "llava-next-video"):
        layers_total = vc.num_hidden_layers
        layer = config.vision_feature_layer
        used = max(i % (layers_total + 1) for i in ([layer] if isinstance(layer, int) else layer))
        vision = Stack(vc.hidden_size, vc.hidden_size, vc.num_attention_heads, vc.intermediate_size,
                       "layer", gated=False, act_saves=_act_saves(vc.hidden_act))
        tokens = encoder.patch_grid**2 + 1
        proj_in = vc.hidden_size * (len(layer) if isinstance(layer, list) else 1)
        return Student(spec, model, encoder, vision, used, layers_total - used, frames, tokens,
                       True, frames * 3 * vc.image_size**2, True, grid.n_tokens,
                       proj_in + 2 * tc.hidden_size, llm, tc.num_hidden_layers, tc.vocab_size)
    if family == "internvl":
        layer = config.vision_feature_layer
        used = vc.num_hidden_layers if layer == -1 else layer % (vc.num_hidden_layers + 1)
        vision = Stack(vc.hidden_size, vc.hidden_size, vc.num_attention_heads, vc.intermediate_size,
                       "layer", gated=False, act_saves=_act_saves(vc.hidden_act), scale=True)
        size = encoder.image_size
        shuffled = int(1 / config.downsample_ratio) ** 2 * vc.hidden_size
        return Student(spec, model, encoder, vision, used, vc.num_hidden_layers - used, frames,
                       encoder.patch_grid**2 + 1, False, frames * 3 * size**2, layer != -1,
                       grid.n_tokens, 2 * shuffled + 2 * tc.hidden_size, llm,
                       tc.num_hidden_layers, tc.vocab_size)
    if family == "qwen2.5-vl":
        vision = Stack(vc.hidden_size, vc.hidden_size, vc.num_heads, vc.intermediate_size, "rms",
                       gated=True, fused_qkv=True)
        steps = -(-frames // vc.temporal_patch_size)
        patches = (encoder.image_size // vc.patch_size) ** 2
        merged = vc.spatial_merge_size**2 * vc.hidden_size
        # merger: RMSNorm over the patches (3 x hidden each) + fc1 activation and fc2 input.
        return Student(spec, model, encoder, vision, vc.depth, 0, steps, patches, False,
                       steps * vc.temporal_patch_size * 3 * encoder.image_size**2, False,
                       grid.n_tokens, 3 * merged + 2 * merged, llm, tc.num_hidden_layers,
                       tc.vocab_size)
    raise InvalidInput(f"plan: no activation model for student family {family!r}")


# --- per-job planning -------------------------------------------------------------------


@dataclass
class Inputs:
    """What the plan assumes beyond the config."""

    text_tokens: int = DEFAULT_TEXT_TOKENS
    """Text tokens per training example (chat template, prompt, reply)."""
    align_rows: int | None = None
    """SFT: aligned query rows per example; None: ``ME_TOKEN_RATIO`` of the text tokens."""
    feature_dim: int | None = None
    """Stage 1: d_v of W_proj; None: the feature set's, else ``DEFAULT_FEATURE_DIM``."""
    feature_tokens: int | None = None
    """Stage 1: F_V tokens per clip; None: the feature set's, else ``DEFAULT_FEATURE_TOKENS``."""


def _deepspeed(config: Any) -> tuple[bool, int, int, int]:
    """(enabled, ZeRO stage, reduce_bucket_size, ZeRO-3's param_persistence_threshold)."""
    ds = getattr(config, "deepspeed", None)
    if ds is None or not ds.enabled:
        return False, 0, 0, 0
    return (True, int(ds.zero_stage), int(getattr(ds, "reduce_bucket_size", 500_000_000)),
            int(getattr(ds, "param_persistence_threshold", 100_000)))


@dataclass
class _Memory:
    """A job's parameters: trainable, frozen inside the module DeepSpeed (or DDP) wraps, and
    frozen outside it, each frozen group with its bytes per parameter without DeepSpeed."""

    trainable: int = 0
    wrapped_frozen: int = 0
    wrapped_frozen_bytes: int = 4
    outside: list[tuple[int, int]] = field(default_factory=list)
    largest_layer: int = 0
    """Parameters of the largest layer (ZeRO-3 gathers one at a time)."""
    sizes: list[int] = field(default_factory=list)
    """Element counts of the wrapped module's parameters (ZeRO-3 keeps the small ones whole)."""


def _finish(job: str, what: str, config: Any, ranks: int, precision: str, memory: _Memory,
            acts: Activations, total: int, assumptions: list[str], rough: list[str],
            extra_activation: int = 0) -> MemoryPlan:
    ds, stage, bucket, persist = _deepspeed(config)
    half = precision != "fp32"
    p_t = memory.trainable
    buffers = 0
    outside = sum(n * b for n, b in memory.outside)
    if ds:
        module_bytes = 2 if half else 4  # the engine casts the wrapped module
        wrapped = (p_t + memory.wrapped_frozen) * module_bytes
        if stage >= 3:  # each rank keeps its slice of every parameter but the small ones
            small = sum(n for n in memory.sizes if n < persist)
            wrapped = (wrapped - small * module_bytes) // ranks + small * module_bytes
        weights = outside + wrapped
        gradients = 4 * p_t // (ranks if stage >= 2 else 1)
        optimizer = (8 + (4 if half else 0)) * p_t // ranks
        # contiguous_gradients: one reduce_bucket_size staging buffer in the module's dtype,
        # allocated whole at the first backward
        buffers = bucket * module_bytes if p_t else 0
        if stage >= 3:
            buffers += memory.largest_layer * module_bytes
            rough.append("ZeRO-3's gathered layer")
    else:
        weights = outside + memory.wrapped_frozen * memory.wrapped_frozen_bytes + 4 * p_t
        gradients = 4 * p_t
        optimizer = 8 * p_t
        if ranks > 1 and p_t:
            buffers = 4 * p_t  # DDP's reducer: a flat copy of the gradients in buckets
    activations, parts = acts.estimate()
    if half and not ds and p_t:
        cast = 2 * p_t  # autocast's cached half copies of the float32 weights, kept for backward
        activations += cast
        parts.append(Part("autocast's half weight copies", cast))
    if extra_activation:
        activations += extra_activation
        parts.append(Part("in-process teacher", extra_activation))
    return MemoryPlan(job=job, what=what, ranks=ranks, precision=precision,
                      zero_stage=stage if ds else None, params_total=total,
                      params_trainable=p_t, weights=weights, gradients=gradients,
                      optimizer=optimizer, buffers=buffers, activations=activations,
                      parts=parts, assumptions=assumptions, rough=rough)


def _regime(config: Any, precision: str) -> str:
    """fp32; half (DeepSpeed casts the module); autocast (float32 master weights)."""
    if precision == "fp32":
        return "fp32"
    return "half" if _deepspeed(config)[0] else "autocast"


def _per_rank(batch: int, ranks: int, what: str = "train.batch_size") -> int:
    if batch % ranks:
        raise InvalidInput(f"plan: {what} ({batch}) must divide by --ranks ({ranks})")
    return batch // ranks


def _checkpointing(config: Any) -> bool:
    return bool(getattr(getattr(config, "train", None), "gradient_checkpointing", False))


def _decoded(data: Any) -> int:
    """Bytes of one decoded clip (uint8 frames at the data section's size)."""
    return data.frames * data.size * data.size * 3


def _vision_pieces(acts: Activations, st: Student, videos: int, mode: str,
                   checkpointing: bool, trailing_mode: str = "through", decoded: int = 0) -> None:
    """Preprocessing, then the tower over ``videos`` videos (``decoded`` bytes each)."""
    a = acts.act
    n_img, n_tok = videos * st.vision_sequences, st.vision_tokens
    # uint8 clips, the sampled frames, and three float copies (float, - mean, / std)
    acts.add("preprocessing", 0, videos * (decoded + st.pixels + 3 * 4 * st.pixels))
    if mode == "full":
        # float32 pixels; in half, also the half copy the patch embedding keeps
        acts.add("pixels", videos * st.pixels * (4 if a == 4 else 6))
        if st.pre_norm:
            acts.add("pre-norm", n_img * n_tok * st.vision.hidden * 4)
    hidden_states = (st.vision_layers + st.trailing + 1) * n_img * n_tok * st.vision.hidden * a
    if mode == "none":  # the pixels, the hidden states the tower returns, one layer
        acts.add("video tower (no gradient)", 0,
                 videos * st.pixels * 4 + (hidden_states if st.keeps_hidden_states else 0)
                 + n_img * n_tok * st.vision.working() * a)
        return
    acts.stack("video tower", st.vision, sequences=n_img, tokens=n_tok, layers=st.vision_layers,
               mode=mode, trailing=st.trailing, trailing_mode=trailing_mode,
               checkpointing=checkpointing)


def _llm_pieces(acts: Activations, st: Student, batch: int, tokens: int, mode: str, *,
                lora_rank: int = 0, lora_linears: int = 0, checkpointing: bool = False,
                align_rows: int = 0) -> None:
    a, llm = acts.act, st.llm
    masked = batch > 1
    kv = llm.hidden if masked else llm.kv  # a padding mask: SDPA gets repeat_kv's copies
    if mode == "full":
        acts.add("projector", batch * st.video_tokens * st.projector_full * a)
    acts.stack("LLM", llm, sequences=batch, tokens=tokens, layers=st.llm_layers, mode=mode,
               masked=masked, lora_rank=lora_rank, lora_linears=lora_linears, kv=kv,
               checkpointing=checkpointing)
    if align_rows:
        per_layer = batch * tokens * (llm.hidden + llm.heads * align_rows + align_rows) * 4
        acts.add("attention capture", st.llm_layers * per_layer)
    final = llm.norm_bytes(mode, acts.regime, 1)
    logits = batch * tokens * st.vocab * 4
    acts.add("final norm + log-softmax", batch * tokens * final + logits, logits)
    acts.backward = 2 * logits


def _student_memory(st: Student, trainable: set[str], frozen_bytes: int) -> tuple[_Memory, int]:
    """The VideoLLM's parameters, those named in ``trainable`` training (tied ones once)."""
    total = train = 0
    sizes = []
    for name, p in st.model.named_parameters():  # each shared parameter once
        total += p.numel()
        sizes.append(p.numel())
        if name in trainable:
            train += p.numel()
    memory = _Memory(trainable=train, wrapped_frozen=total - train,
                     wrapped_frozen_bytes=frozen_bytes, largest_layer=_largest_layer(st.model),
                     sizes=sizes)
    return memory, total


def _lora_params(model: Any, pattern: str, rank: int) -> tuple[int, int, list[int]]:
    """(LoRA parameters, targeted Linear layers, the A and B matrices' sizes) of peft's regex
    ``target_modules``."""
    import torch

    count = layers = 0
    sizes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name):
            sizes += [rank * module.in_features, rank * module.out_features]
            count += sizes[-2] + sizes[-1]
            layers += 1
    return count, layers, sizes


def plan_stage2(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    st = describe_student(config.student)
    precision = config.train.precision
    b = _per_rank(config.train.batch_size, ranks)
    acts = Activations(_regime(config, precision))
    _vision_pieces(acts, st, b, "full", _checkpointing(config), decoded=_decoded(config.data))
    tower = st.encoder.tower
    total = _count(tower.parameters())
    trainable = _count(p for p in tower.parameters() if p.requires_grad)
    memory = _Memory(trainable=trainable, wrapped_frozen=total - trainable,
                     wrapped_frozen_bytes=4, largest_layer=_largest_layer(tower),
                     sizes=[p.numel() for p in tower.parameters()])
    rough: list[str] = []
    what = f"{config.student} video encoder trains through the teacher's loss"
    extra = 0
    if getattr(config.teacher, "address", "local") == "local":
        # LocalTeacher: float32, the gradient through the whole UNet to F_V, in its own thread
        teacher = _teacher_plan(config.teacher.model, batch=b, frames=config.teacher.frames,
                                feature_tokens=st.spec.num_frames, lora_rank=0, act=4,
                                encode=True)
        memory.outside.append((teacher.params, 4))
        total += teacher.params
        extra = teacher.activations + teacher.vae
        rough.append("the in-process teacher's UNet activations")
        what += f"; teacher {config.teacher.model} in this process"
    else:
        what += f" (teacher {config.teacher.model} at {config.teacher.address})"
    return _finish("stage2", what, config, ranks, precision, memory, acts, total,
                   [f"{st.spec.num_frames} frames of {st.encoder.image_size} px per clip, "
                    f"{b} clip(s) per rank"], rough, extra)


def plan_stage3(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    st = describe_student(config.student)
    precision = config.train.precision
    b = _per_rank(config.train.batch_size, ranks)
    lora, linears, sizes = _lora_params(st.model, config.lora.target_modules, config.lora.rank)
    if not lora:
        raise InvalidInput(f"plan: lora.target_modules {config.lora.target_modules!r} matches "
                           f"no Linear of {config.student}")
    per_layer = round(linears / st.llm_layers)
    memory, total = _student_memory(st, set(), BYTES[precision])
    memory.trainable = lora
    memory.sizes += sizes
    total += lora
    tokens = st.video_tokens + inputs.text_tokens
    acts = Activations("fp32" if precision == "fp32" else "half")
    _vision_pieces(acts, st, b, "none", False, decoded=_decoded(config.data))
    _llm_pieces(acts, st, b, tokens, "through", lora_rank=config.lora.rank,
                lora_linears=per_layer, checkpointing=_checkpointing(config))
    return _finish("stage3", f"{config.student}, frozen, + LoRA r={config.lora.rank} on "
                   f"{linears} LLM projections", config, ranks, precision, memory, acts, total,
                   [f"{tokens} tokens per example ({st.video_tokens} video + "
                    f"{inputs.text_tokens} text), {b} per rank"], [])


def plan_sft(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    from vidalign.papers import ME_TOKEN_RATIO

    st = describe_student(config.student)
    precision = config.train.precision
    b = _per_rank(config.train.batch_size, ranks)
    names = {n for n, _ in st.model.named_parameters() if "image_tower" not in n}
    memory, total = _student_memory(st, names, BYTES[precision])
    from vidalign.students import get_family

    cells = get_family(st.spec).vision_grid(st.encoder, st.model.config).size
    hid = config.align.hidden
    aligner = 2 * cells * hid + hid * hid + 2 * hid + cells
    memory.trainable += aligner
    memory.sizes += [cells * hid, hid, hid * hid, hid, hid * cells, cells]  # its 3 Linear layers
    total += aligner
    tokens = st.video_tokens + inputs.text_tokens
    rows = 0
    if config.align.weight > 0:
        rows = inputs.align_rows if inputs.align_rows is not None else math.ceil(
            ME_TOKEN_RATIO * inputs.text_tokens)
    acts = Activations(_regime(config, precision))
    ckpt = _checkpointing(config)
    _vision_pieces(acts, st, b, "full", ckpt, trailing_mode="full", decoded=_decoded(config.data))
    _llm_pieces(acts, st, b, tokens, "full", checkpointing=ckpt, align_rows=rows)
    rough = ["aligned rows"] if rows else []
    frozen = " but the image tower" if memory.wrapped_frozen else ""
    return _finish("sft", f"{config.student}, all trainable{frozen}, + aligner "
                   f"({cells} cells x {hid})", config, ranks, precision, memory, acts, total,
                   [f"{tokens} tokens per example ({st.video_tokens} video + "
                    f"{inputs.text_tokens} text), {b} per rank"]
                   + ([f"{rows} aligned rows"] if rows else []), rough)


def _largest_layer(model: Any) -> int:
    best = 0
    for name, module in model.named_modules():
        if re.search(r"layers\.\d+$|blocks\.\d+$", name):
            best = max(best, _count(module.parameters()))
    return best


def plan_features(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    st = describe_student(config.student)
    b = config.batch_size
    acts = Activations("fp32")
    _vision_pieces(acts, st, b, "none", False, decoded=_decoded(config.data))
    total = _count(st.encoder.tower.parameters())
    memory = _Memory(outside=[(total, 4)])
    return _finish("features", f"{config.student} video encoder, frozen, inference",
                   config, 1, "fp32", memory, acts, total,
                   [f"{b} clip(s) per forward, float32", *_per_process(ranks)],
                   ["inference working set"])


def _per_process(ranks: int) -> list[str]:
    """What ``--ranks`` means to a sharded inference job: each process holds the same."""
    return [f"per process: {ranks} processes split the shards"] if ranks > 1 else []


# --- teachers ------------------------------------------------------------------------------


@dataclass
class _Teacher:
    params: int
    trainable: int
    activations: int
    lora_layers: int
    cond_dim: int
    vae: int
    frames: int
    resolution: int


def _unet_parts(model: str) -> tuple[dict[str, Any], Any]:
    """The teacher's components on meta (``unet``, optional ``motion_adapter``, ``vae``,
    ``text_encoder``) and its spec."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vidalign.vda.registry import TEACHER_MODELS, _directory_spec, tiny_components

    if model in TEACHER_MODELS:
        spec = TEACHER_MODELS[model]
    else:
        from pathlib import Path

        if not Path(model).is_dir():
            raise InvalidInput(f"plan: teacher model {model!r} is neither a registry name nor a "
                               f"directory; known: {sorted(TEACHER_MODELS)}")
        spec = _directory_spec(model, None)
    with torch.device("meta"):
        if spec.tiny:
            parts = tiny_components(spec.family, spec.preset)
        elif spec.base is not None and spec.name in TEACHER_MODELS:
            parts = {
                "unet": UNet2DConditionModel(**SD15["unet"]),
                "vae": AutoencoderKL(**SD15["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15["text_encoder"])),
            }
            if spec.family == "animatediff":
                parts["motion_adapter"] = MotionAdapter(**SD15["motion_adapter"])
        else:
            from diffusers import UNetMotionModel

            unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
            cls = UNetMotionModel if unet_config.get("_class_name") == "UNetMotionModel" else (
                UNet2DConditionModel)
            parts = {
                "unet": cls.from_config(unet_config),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(
                    model, subfolder="text_encoder")),
            }
    return {k: v for k, v in parts.items() if hasattr(v, "parameters")}, spec


def _teacher_plan(model: str, *, batch: int, frames: int, feature_tokens: int, lora_rank: int,
                  act: int, encode: bool = False) -> _Teacher:
    """Parameters and through-gradient activations of an SD1.5-family teacher (rough); with
    ``encode``, the VAE encodes the clips each step (a transient before the UNet)."""
    import torch

    from vidalign.vda.adapter import DEFAULT_LORA_TARGETS

    targets = tuple(DEFAULT_LORA_TARGETS)
    parts, spec = _unet_parts(model)
    params = sum(_count(m.parameters()) for m in parts.values())
    lora = layers = 0
    for key in ("unet", "motion_adapter"):
        if key not in parts:
            continue
        for name, module in parts[key].named_modules():
            if isinstance(module, torch.nn.Linear) and any(
                name == t or name.endswith(f".{t}") for t in targets
            ):
                lora += lora_rank * (module.in_features + module.out_features)
                layers += 1
    unet = parts["unet"]
    config = unet.config
    cond_dim = config.cross_attention_dim
    frames = frames or spec.frames
    scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    side = spec.resolution // scale
    motion = "motion_adapter" in parts or type(unet).__name__ == "UNetMotionModel"
    cond = parts["text_encoder"].config.max_position_embeddings + feature_tokens
    vae = 0
    if encode:  # the VAE's first level: ~4 tensors of its width at full resolution (rough)
        vae = 4 * batch * frames * spec.resolution**2 * parts["vae"].config.block_out_channels[0]
    acts = unet_activations(
        channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        down_types=tuple(config.down_block_types), frames=frames,
        side=side, batch=batch, cond_tokens=cond, motion=motion,
        lora_rank=lora_rank if layers else 0, act=act,
    )
    return _Teacher(params=params, trainable=lora, activations=acts, lora_layers=layers,
                    cond_dim=cond_dim, vae=vae * act, frames=frames, resolution=spec.resolution)


def unet_activations(*, channels: tuple[int, ...], layers_per_block: int,
                     down_types: tuple[str, ...], frames: int, side: int, batch: int,
                     cond_tokens: int, motion: bool, lora_rank: int, act: int) -> int:
    """Saved elements of an SD1.5-layout UNet (+ motion modules) that the gradient passes
    through, frozen but for LoRA on every attention projection (rough): per pixel and frame,
    a ResNet 2 c_in + 2 c, a spatial transformer 24 c + 6 r (+ its keys and values over the
    ``cond_tokens`` condition tokens), a motion module 28 c + 8 r."""
    total = 0
    n_levels = len(channels)
    r = lora_rank

    def level(c: int, c_in: int, s: int, attention: bool) -> int:
        pix = batch * frames * s * s
        n = pix * (2 * c_in + 2 * c)
        if attention:
            n += pix * (24 * c + 6 * r) + batch * frames * cond_tokens * 2 * c
        if motion:
            n += pix * (28 * c + 8 * r)
        return n

    side_l = side
    skips: list[int] = [channels[0]]
    c_prev = channels[0]
    for i, c in enumerate(channels):
        attention = down_types[i].startswith("CrossAttn")
        for _ in range(layers_per_block):
            total += level(c, c_prev, side_l, attention)
            c_prev = c
            skips.append(c)
        if i < n_levels - 1:
            skips.append(c)
            side_l //= 2
    c = channels[-1]  # the mid block: ResNet, transformer, motion module, ResNet
    total += level(c, c, side_l, True) + batch * frames * side_l * side_l * 4 * c
    for i, c in enumerate(reversed(channels)):
        attention = down_types[n_levels - 1 - i].startswith("CrossAttn")
        for _ in range(layers_per_block + 1):
            skip = skips.pop() if skips else c
            total += level(c, c_prev + skip, side_l, attention)
            c_prev = c
        if i < n_levels - 1:
            side_l *= 2
    return total * act


def plan_stage1(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    from vidalign.vda.adapter import _build_projection

    precision = config.train.precision
    dtype = config.teacher.dtype or precision
    b = _per_rank(config.train.batch_size, ranks)
    d_v, tokens, assumptions = _features_geometry(config.features, inputs)
    # the UNet's storage sets the residual stream's dtype; float32 with autocast casts
    regime = "fp32" if precision == "fp32" else ("half" if dtype != "fp32" else "autocast")
    act = 4 if regime == "fp32" else 2
    samples = b * config.train.num_draws
    teacher = _teacher_plan(config.teacher.model, batch=samples, frames=config.teacher.frames,
                            feature_tokens=tokens, lora_rank=config.adapter.lora_rank, act=act,
                            encode=config.data.kind not in ("toy", "synth"))
    with _meta():
        proj = _count(_build_projection(config.adapter.projection, d_v, teacher.cond_dim)
                      .parameters())
    memory = _Memory(trainable=proj + teacher.trainable, outside=[(teacher.params, BYTES[dtype])])
    acts = Activations(regime)
    if teacher.vae:
        acts.add("VAE encoder (no gradient)", 0, teacher.vae)
    acts.add("UNet (+ motion modules)", teacher.activations)
    return _finish("stage1", f"{config.teacher.model} frozen + W_proj ({d_v} -> "
                   f"{teacher.cond_dim}) + LoRA r={config.adapter.lora_rank} on "
                   f"{teacher.lora_layers} attention projections", config, ranks, precision,
                   memory, acts, teacher.params + proj + teacher.trainable,
                   [*assumptions, f"{teacher.frames} frames at {teacher.resolution} px, "
                    f"{samples} sample(s) per rank"],
                   ["the UNet's activations"]
                   + (["the VAE encoder's working set"] if teacher.vae else []))


def _features_geometry(uri: str, inputs: Inputs) -> tuple[int, int, list[str]]:
    """d_v and F_V tokens per clip: given, else a local feature set's, else the defaults."""
    d_v, tokens = inputs.feature_dim, inputs.feature_tokens
    assumed = []
    local = "://" not in uri or uri.startswith("file://")  # a plan reaches no network
    if (d_v is None or tokens is None) and local:
        try:
            from vidalign.shards import read_index
            from vidalign.store import open_store

            index = read_index(open_store(uri), "features", "vidalign features extract")
            d_v = d_v or int(index["d_v"])
            tokens = tokens or int(index["tokens"])
        except (VidalignError, OSError, KeyError, ValueError):  # planned before it exists
            pass
    if d_v is None:
        d_v = DEFAULT_FEATURE_DIM
        assumed.append(f"d_v {d_v} (Video-LLaVA-7B's; not read from {uri})")
    if tokens is None:
        tokens = DEFAULT_FEATURE_TOKENS
        assumed.append(f"{tokens} F_V tokens per clip")
    return d_v, tokens, assumed


def plan_priors(config: Any, ranks: int, inputs: Inputs) -> MemoryPlan:
    """CogVideoX prior extraction in this process (float32; rough working set)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from vidalign.motionenhancer.cogvideox import COGVIDEOX_MODELS, tiny_cogvideox_components

    name = config.model
    if config.teacher:
        raise InvalidInput(f"plan: priors from a teacher service ({config.teacher}) need no "
                           "memory here; plan the service's model with teacher: ''")
    spec = COGVIDEOX_MODELS.get(name)
    if spec is None:
        raise InvalidInput(f"plan: no CogVideoX config for {name!r}; known: "
                           f"{sorted(COGVIDEOX_MODELS)}")
    with torch.device("meta"):
        if spec.tiny:
            parts = tiny_cogvideox_components(spec)
        else:
            table = COGVIDEOX[name]
            parts = {
                "transformer": CogVideoXTransformer3DModel(**table["transformer"]),
                "vae": AutoencoderKLCogVideoX(**table["vae"]),
                "text_encoder": T5EncoderModel(T5Config(**table["text_encoder"])),
            }
    params = sum(_count(parts[k].parameters()) for k in ("transformer", "vae", "text_encoder"))
    tc, vc = parts["transformer"].config, parts["vae"].config
    frames = config.frames or spec.frames
    height, width = config.height or spec.height, config.width or spec.width
    scale_t, scale = vc.temporal_compression_ratio, 2 ** (len(vc.block_out_channels) - 1)
    token_frames = -(-((frames - 1) // int(scale_t) + 1) // (tc.patch_size_t or 1))
    spatial = (height // scale // tc.patch_size) * (width // scale // tc.patch_size)
    n_v, n_text = token_frames * spatial, tc.max_text_seq_length
    heads, hidden = tc.num_attention_heads, tc.num_attention_heads * tc.attention_head_dim
    streams = CFG_STREAMS * (2 if config.memory else 1)
    keys = n_text + n_v * (2 if config.memory else 1)
    a = 4
    acts = Activations("fp32")
    # the VAE's first level: ~4 tensors of its width over a temporal chunk of ~10 frames
    acts.add("VAE encoder", 0, 4 * 10 * height * width * vc.block_out_channels[0] * a)
    # lse, same-location entries, row masses and text-to-vision rows, per head
    acts.add("captured statistics",
             a * heads * (n_text + n_v + spatial * token_frames**2 + n_text * n_v))
    # one CogVideoX block's working set (~17h per token and stream) and a chunk of logits
    # (chunk_size 0: the rows the capture picks on an accelerator with room to spare)
    from vidalign.motionenhancer.attention import ACCELERATOR_CHUNK_BYTES, chunk_rows

    rows = config.chunk_size or chunk_rows(ACCELERATOR_CHUNK_BYTES, heads, n_text + n_v, keys)
    acts.add("transformer layer working set", 0,
             streams * (n_text + n_v) * 17 * hidden * a + a * heads * rows * keys)
    memory = _Memory(outside=[(params, 4)])
    return _finish("priors", f"{name} (transformer, VAE, T5) in this process, inference with CFG"
                   + (" and cross-stream memory" if config.memory else ""), config, 1, "fp32",
                   memory, acts, params,
                   [f"{frames} frames at {height} x {width} -> {n_v} video tokens + {n_text} text",
                    f"{streams} streams, chunks of {rows} query rows"
                    + ("" if config.chunk_size else " (auto)") + ", float32",
                    *_per_process(ranks)],
                   ["the working sets of the transformer and the VAE"])


PLANNERS = {
    "stage1": plan_stage1,
    "stage2": plan_stage2,
    "stage3": plan_stage3,
    "sft": plan_sft,
    "features": plan_features,
    "priors": plan_priors,
}


def plan(job: str, config: Any, *, ranks: int = 1, inputs: Inputs | None = None) -> MemoryPlan:
    """The memory plan of ``job`` for its loaded ``config`` on ``ranks`` ranks."""
    if job not in PLANNERS:
        raise InvalidInput(f"plan: job must be one of {list(JOBS)}, got {job!r}")
    if ranks < 1:
        raise InvalidInput(f"plan: --ranks must be >= 1, got {ranks}")
    return PLANNERS[job](config, ranks, inputs or Inputs())


def detect_job(data: dict[str, Any]) -> str:
    """The job a config's top-level keys belong to (``vidalign plan --job auto``)."""
    keys = set(data)
    if "adapter" in keys and "features" in keys:
        return "stage1"
    if "lora" in keys:
        return "stage3"
    if "align" in keys or "priors" in keys or "prior_steps" in keys:
        return "sft"
    if "pooling" in keys or ("batch_size" in keys and "student" in keys and "train" not in keys):
        return "features"
    if "teacher" in keys and "student" in keys:
        return "stage2"
    if "data" in keys and "out" in keys:
        return "priors"
    raise InvalidInput("plan: cannot tell the job from the config's keys; give --job "
                       f"({'|'.join(JOBS)})")


__all__ = [
    "BYTES",
    "COGVIDEOX",
    "JOBS",
    "SD15",
    "STUDENT_CONFIGS",
    "Inputs",
    "MemoryPlan",
    "Part",
    "Stack",
    "detect_job",
    "format_plan",
    "plan",
    "unet_activations",
]
