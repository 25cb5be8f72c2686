"""MotionEnhancer prior extraction: CogVideoX teacher, streaming attention capture, MHS, MTTI.

``load_cogvideox`` gives a frozen CogVideoX (real checkpoint or tiny preset);
``capture_attention`` installs a streaming processor that keeps only what MHS and
MTTI need (docs/design.md, decision 6); ``extract_priors`` runs DDIM inversion, guided
denoising with cross-stream memory, head selection and token selection.
"""

from vidalign.motionenhancer.attention import (
    AttentionStats,
    StreamingAttnProcessor,
    TokenGrid,
    capture_attention,
)
from vidalign.motionenhancer.cogvideox import (
    COGVIDEOX_MODELS,
    CogVideoXSpec,
    CogVideoXTeacher,
    load_cogvideox,
    tiny_cogvideox_components,
    tiny_t5_tokenizer,
)
from vidalign.motionenhancer.inversion import Priors, ddim_denoise, ddim_invert, extract_priors
from vidalign.motionenhancer.mhs import MHSResult, head_metrics, select_heads
from vidalign.motionenhancer.mtti import (
    MTTIResult,
    SelectedToken,
    pool_tokens,
    select_tokens,
    token_spans,
)

__all__ = [
    "COGVIDEOX_MODELS",
    "AttentionStats",
    "CogVideoXSpec",
    "CogVideoXTeacher",
    "MHSResult",
    "MTTIResult",
    "Priors",
    "SelectedToken",
    "StreamingAttnProcessor",
    "TokenGrid",
    "capture_attention",
    "ddim_denoise",
    "ddim_invert",
    "extract_priors",
    "head_metrics",
    "load_cogvideox",
    "pool_tokens",
    "select_heads",
    "select_tokens",
    "tiny_cogvideox_components",
    "tiny_t5_tokenizer",
    "token_spans",
]
