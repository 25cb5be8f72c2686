"""Names of the student VideoLLMs whose video encoder vidalign can train.

A name maps to a :class:`StudentSpec`: the model family (which decides how the
encoder is built and what its features are), where the weights come from, and
how many frames the student samples. Tiny presets are random-init configs of
the same classes as the real models, so tests and the CPU demo run the code
path that real runs use, without a download (DESIGN.md, decision 9).
"""

from dataclasses import dataclass

from vidalign.errors import NotFound


@dataclass(frozen=True, kw_only=True, slots=True)
class StudentSpec:
    """What a student name stands for."""

    name: str
    """Registry key, e.g. ``"video-llava-7b"``."""
    family: str
    """Model family; selects the encoder implementation (``"video-llava"``, ``"qwen2.5-vl"``,
    ``"internvl"``, ``"llava-next-video"``)."""
    hf_id: str | None
    """Hugging Face repository of the full VideoLLM; ``None`` for tiny presets."""
    tiny: bool
    """Random-init tiny config of the real classes (deterministic, no download)."""
    num_frames: int
    """Frames the student samples from a video (T in F_V in R^{T x d_v})."""
    description: str
    """One line for listings and ``--help``."""


STUDENT_MODELS: dict[str, StudentSpec] = {
    spec.name: spec
    for spec in (
        StudentSpec(
            name="tiny-videollava",
            family="video-llava",
            hf_id=None,
            tiny=True,
            num_frames=8,
            description="Video-LLaVA classes at toy size (CLIP ViT: 32 wide, 2 layers, 32 px); random init.",
        ),
        StudentSpec(
            name="video-llava-7b",
            family="video-llava",
            hf_id="LanguageBind/Video-LLaVA-7B-hf",
            tiny=False,
            num_frames=8,
            description="Video-LLaVA 7B; its LanguageBind video encoder (CLIP ViT-L/14, 224 px) is E_phi.",
        ),
        StudentSpec(
            name="tiny-qwen2.5-vl",
            family="qwen2.5-vl",
            hf_id=None,
            tiny=True,
            num_frames=8,
            description="Qwen2.5-VL classes at toy size (ViT 32 wide, 2 blocks, patch 4, 16 px); random init.",
        ),
        StudentSpec(
            name="qwen2.5-vl-7b",
            family="qwen2.5-vl",
            hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
            tiny=False,
            num_frames=16,
            description="Qwen2.5-VL 7B Instruct; its vision transformer + merger (224 px, 2-frame temporal patches) is E_phi.",
        ),
        StudentSpec(
            name="tiny-internvl3",
            family="internvl",
            hf_id=None,
            tiny=True,
            num_frames=8,
            description="InternVL classes at toy size (InternViT 32 wide, 2 layers, 32 px); random init.",
        ),
        StudentSpec(
            name="internvl3-8b",
            family="internvl",
            hf_id="OpenGVLab/InternVL3-8B-hf",
            tiny=False,
            num_frames=8,
            description="InternVL3 8B; its InternViT-300M vision tower (448 px, frames as images) is E_phi.",
        ),
        StudentSpec(
            name="tiny-llava-next-video",
            family="llava-next-video",
            hf_id=None,
            tiny=True,
            num_frames=8,
            description="LLaVA-NeXT-Video classes at toy size (CLIP ViT 32 wide, 2 layers, 32 px); random init.",
        ),
        StudentSpec(
            name="llava-next-video-7b",
            family="llava-next-video",
            hf_id="llava-hf/LLaVA-NeXT-Video-7B-hf",
            tiny=False,
            num_frames=8,
            description="LLaVA-NeXT-Video 7B; its CLIP ViT-L/14 (336 px) vision tower is E_phi.",
        ),
    )
}


def get_student_spec(name: str) -> StudentSpec:
    """Return the spec registered under ``name``; :class:`NotFound` lists the known names."""
    try:
        return STUDENT_MODELS[name]
    except KeyError:
        raise NotFound(
            f"student model {name!r} is not registered; known: {sorted(STUDENT_MODELS)}"
        ) from None
