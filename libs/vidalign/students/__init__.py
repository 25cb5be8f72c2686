"""Student VideoLLMs' video encoders (E_phi), the part VDA's stage 2 trains.

``load_student(name)`` gives a :class:`VideoEncoder` for a registered name
(``STUDENT_MODELS``); :meth:`VideoEncoder.from_module` wraps any other module.
Families: Video-LLaVA (``encoder``), Qwen2.5-VL, InternVL3, LLaVA-NeXT-Video
(``families``); ``videollm`` wraps a whole student VideoLLM for stage 3 and
evaluation.
"""

from vidalign.students.encoder import (
    CLIP_MEAN,
    CLIP_STD,
    VideoEncoder,
    VideoLlavaEncoder,
    build_tiny_video_llava,
    load_student,
    tiny_video_llava_config,
)
from vidalign.students.families import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InternVLEncoder,
    LlavaNextVideoEncoder,
    Qwen25VLEncoder,
    build_tiny_internvl,
    build_tiny_llava_next_video,
    build_tiny_qwen2_5_vl,
)
from vidalign.students.registry import STUDENT_MODELS, StudentSpec, get_student_spec
from vidalign.students.videollm import VideoLLM, load_videollm

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STUDENT_MODELS",
    "InternVLEncoder",
    "LlavaNextVideoEncoder",
    "Qwen25VLEncoder",
    "StudentSpec",
    "VideoEncoder",
    "VideoLLM",
    "VideoLlavaEncoder",
    "build_tiny_internvl",
    "build_tiny_llava_next_video",
    "build_tiny_qwen2_5_vl",
    "build_tiny_video_llava",
    "get_student_spec",
    "load_student",
    "load_videollm",
    "tiny_video_llava_config",
]
