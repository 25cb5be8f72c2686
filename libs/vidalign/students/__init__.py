"""Student VideoLLMs' video encoders (E_phi), the part VDA's stage 2 trains.

``load_student(name)`` gives a :class:`VideoEncoder` for a registered name
(``STUDENT_MODELS``); :meth:`VideoEncoder.from_module` wraps any other module.
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
from vidalign.students.registry import STUDENT_MODELS, StudentSpec, get_student_spec

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "STUDENT_MODELS",
    "StudentSpec",
    "VideoEncoder",
    "VideoLlavaEncoder",
    "build_tiny_video_llava",
    "get_student_spec",
    "load_student",
    "tiny_video_llava_config",
]
