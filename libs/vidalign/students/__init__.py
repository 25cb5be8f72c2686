"""Student VideoLLMs: their video encoders (E_phi, what VDA's stage 2 trains) and whole models.

``load_student(name)`` gives a :class:`VideoEncoder` for a registered name
(``STUDENT_MODELS``); :meth:`VideoEncoder.from_module` wraps any other module.
``load_videollm(name)`` wraps the whole VideoLLM for stage 3, SFT and evaluation.

One module per family holds everything about it and registers a
:class:`StudentFamily` with its students (``family``): ``video_llava``
(Video-LLaVA), ``qwen2_5_vl`` (Qwen2.5-VL), ``internvl`` (InternVL3),
``llava_next_video`` (LLaVA-NeXT-Video). Shared machinery: ``encoder`` (the
VideoEncoder base and ``load_student``), ``loading`` (reading a tower out of a
checkpoint), ``tokenizer`` (tokenizers for tiny models, ChatML), ``videollm``
(the VideoLLM wrapper), ``answerer`` (trained students for evaluation).
"""

# Shared machinery first, then the family modules, which register themselves on import; their
# order is the order of STUDENT_MODELS. A new family is one new module, imported here.
from vidalign.students.encoder import CLIP_MEAN, CLIP_STD, VideoEncoder, load_student
from vidalign.students.family import (
    FAMILIES,
    STUDENT_MODELS,
    ParamGroups,
    StudentFamily,
    StudentSpec,
    VisionGrid,
    get_family,
    get_student_spec,
    param_groups,
    register_family,
)
from vidalign.students.video_llava import (  # isort: split
    VideoLlavaEncoder,
    build_tiny_video_llava,
    tiny_video_llava_config,
)

from vidalign.students.qwen2_5_vl import (  # isort: split
    Qwen25VLEncoder,
    build_tiny_qwen2_5_vl,
    tiny_qwen2_5_vl_config,
)

from vidalign.students.internvl import (  # isort: split
    IMAGENET_MEAN,
    IMAGENET_STD,
    InternVLEncoder,
    build_tiny_internvl,
    tiny_internvl_config,
)

from vidalign.students.llava_next_video import (  # isort: split
    LlavaNextVideoEncoder,
    build_tiny_llava_next_video,
    tiny_llava_next_video_config,
)

from vidalign.students.videollm import VideoLLM, load_videollm  # isort: split

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STUDENT_MODELS",
    "InternVLEncoder",
    "LlavaNextVideoEncoder",
    "ParamGroups",
    "Qwen25VLEncoder",
    "StudentFamily",
    "StudentSpec",
    "VideoEncoder",
    "VideoLLM",
    "VideoLlavaEncoder",
    "VisionGrid",
    "build_tiny_internvl",
    "build_tiny_llava_next_video",
    "build_tiny_qwen2_5_vl",
    "build_tiny_video_llava",
    "get_family",
    "get_student_spec",
    "load_student",
    "load_videollm",
    "param_groups",
    "register_family",
    "tiny_internvl_config",
    "tiny_llava_next_video_config",
    "tiny_qwen2_5_vl_config",
    "tiny_video_llava_config",
]
