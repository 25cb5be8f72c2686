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
    """Model family; selects the encoder implementation (``"video-llava"``)."""
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
