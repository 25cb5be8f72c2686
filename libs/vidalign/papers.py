"""The two methods' published settings, as named constants (no heavy imports).

Every default that reproduces a setting of VDA (*Aligning VideoLLMs with Video
Diffusion for Fine-grained Temporal Understanding*) or MotionEnhancer is read
from here, so a setting is stated once with where it comes from. Where a paper
leaves a value out, the note says so and names what the value is instead.
Toy-scale defaults that deliberately differ (tiny models need larger learning
rates, fewer DDIM steps) stay where they are set, next to their reason.
"""

from __future__ import annotations

from types import MappingProxyType

# --- VDA -------------------------------------------------------------------------------------

VDA_LR = 1e-5
"""AdamW learning rate of all three stages (VDA §4.1, implementation details)."""

VDA_BATCH_SIZE = 1
"""Clips per step in every stage (VDA §4.1, implementation details)."""

VDA_LORA_RANK = 16
"""LoRA rank of the U-Net LoRA (stage 1) and of the LLM LoRA (stage 3) (VDA §4.1)."""

VDA_DIFFUSION_FRAMES = 24
"""Frames the diffusion teacher sees, whatever the VideoLLM samples (VDA §4.1, baselines)."""

VDA_TIMESTEP_RANGE = (0, 1000)
"""Half-open range t is drawn from in the denoising loss (VDA eq. 3/4 gives no range, so: every
timestep of the teacher's 1000-step training schedule, as in its own training)."""

VDA_PROJECTION = "linear"
"""W_proj: one linear layer, which beat a 2-layer GELU MLP (VDA §3.3 and appendix B)."""

# --- MotionEnhancer --------------------------------------------------------------------------

ME_INVERSION_STEPS = 5
"""DDIM inversion steps of prior extraction (MotionEnhancer §4.1 and §5.2; 2 is much worse,
10 slightly better, supp. §5.4)."""

ME_DENOISING_STEPS = 5
"""DDIM denoising steps after the inversion, attention captured at each (MotionEnhancer §4.1
and §5.2)."""

ME_DDIM_STEPS = ME_INVERSION_STEPS
"""The one step count extraction takes for both passes (``steps``); the paper's two are equal."""

ME_GUIDANCE = 6.0
"""Classifier-free guidance scale of the denoising pass (MotionEnhancer §4.1 uses CFG but
states no scale; 6 is the CogVideoX pipeline's own default)."""

ME_CROSS_STREAM_MEMORY = True
"""Denoise with cross-stream memory from the inverted path (MotionEnhancer §4.1)."""

ME_HEAD_RATIO = 0.5
"""Share of attention heads MHS keeps (MotionEnhancer §4.2; 50% beats 25% and 75% in the
ablation in supp. §5.4)."""

ME_TOKEN_RATIO = 0.5
"""Share of text tokens MTTI keeps, padding excluded (MotionEnhancer §4.2)."""

ME_MHS_WEIGHTS = MappingProxyType({"dfc": 1.0, "tcs": 1.0, "dsr": 1.0})
"""Weights of the z-scored DFC, TCS and DSR summed into a head's score: a plain sum
(MotionEnhancer §4.2)."""

ME_MTTI_MEAN_WEIGHT = 1.0
"""Weight of a token's mean attention over frames in its MTTI score (MotionEnhancer §4.2:
mean plus mean first-order difference; the formula itself is blank in the text)."""

ME_MTTI_DIFF_WEIGHT = 1.0
"""Weight of the mean absolute first-order difference over frames in the MTTI score
(MotionEnhancer §4.2, as above)."""

ME_ALIGN_WEIGHT = 1.0
"""lambda of L_SFT + lambda * L_align (MotionEnhancer §4.3; "loss factor 1", §5.2)."""

ME_WEIGHT_DECAY = 0.1
"""AdamW weight decay of the SFT (MotionEnhancer §5.2)."""

ME_WARMUP_RATIO = 0.03
"""Warmup share of the cosine schedule of the SFT (MotionEnhancer §5.2)."""

ME_BATCH_SIZE = 8
"""SFT batch size, one epoch (MotionEnhancer §5.2)."""

ME_LR_LLM = 1e-5
"""SFT learning rate of the LLM (MotionEnhancer §5.2 names separate rates for the LLM and
merger and for the vision tower, but the numbers are blank in the text; 1e-5 and 2e-6 are the
usual Qwen2.5-VL fine-tuning rates)."""

ME_LR_MERGER = 1e-5
"""SFT learning rate of the vision-language merger (projector); see ``ME_LR_LLM``."""

ME_LR_VISION = 2e-6
"""SFT learning rate of the vision tower; see ``ME_LR_LLM``."""

__all__ = [name for name in dir() if name.startswith(("VDA_", "ME_"))]
