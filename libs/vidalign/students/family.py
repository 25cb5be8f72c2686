"""What a student family is, and the registries of families and of student names.

A *family* is one VideoLLM architecture (Video-LLaVA, Qwen2.5-VL, ...): a
:class:`StudentFamily` holds everything vidalign needs to know about it, and
the family's module (``vidalign.students.video_llava``, ...) builds one and
registers it with :func:`register_family`. Adding a family is one new module
that does the same (built-in families are imported by
``vidalign.students.__init__``, in the order their students are listed).

A *student* is a registry name (``"video-llava-7b"``, ``"tiny-qwen2.5-vl"``)
standing for a :class:`StudentSpec`: the family, where the weights come from,
how many frames it samples. Each family registers its own students.

Everything here stays free of transformers imports: listing students
(``STUDENT_MODELS``) should not pay for importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from vidalign.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    import torch

    from vidalign.students.encoder import VideoEncoder


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


@dataclass(frozen=True)
class VisionGrid:
    """The VLM's video tokens as a (frames, height, width) grid."""

    frames: int
    height: int
    width: int
    n_tokens: int
    """Video placeholder tokens per video (grid cells + e.g. CLS tokens)."""
    cells: tuple[int, ...]
    """For each grid cell in (t, y, x) order, its index among the video tokens."""
    frames_per_step: int = 1
    """Sampled frames per temporal position (Qwen2.5-VL: 2)."""
    num_frames: int = 1
    """Frames the VLM samples from a clip."""

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width

    @classmethod
    def dense(cls, num_frames: int, side: int, frames_per_step: int = 1) -> VisionGrid:
        """Every video token a grid cell: ``ceil(num_frames / frames_per_step)`` steps of
        ``side x side`` tokens, in (t, y, x) order."""
        steps = -(-num_frames // frames_per_step)
        n = steps * side * side
        return cls(steps, side, side, n, tuple(range(n)), frames_per_step, num_frames)


ParamGroups = dict[str, list[tuple[str, nn.Parameter]]]
"""``{"vision": [...], "projector": [...], "llm": [...]}`` of ``(name, parameter)``."""

PARAM_GROUPS = ("vision", "projector", "llm")


def _inside(name: str, module: str) -> bool:
    """Whether parameter ``name`` lies inside submodule ``module`` (whole dotted components;
    any prefix allowed, so names under a wrapper such as ``peft.PeftModel`` match too)."""
    return f".{module}." in f".{name}"


def tower_view(make: Callable[[nn.Module], VideoEncoder], tower: nn.Module) -> VideoEncoder:
    """``make(tower)``, leaving the tower's ``requires_grad`` flags as they were."""
    flags = [p.requires_grad for p in tower.parameters()]
    encoder = make(tower)
    for p, flag in zip(tower.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return encoder


TINY_FRAMES = 8
"""Frames a tiny student samples (the tiny configs' video token counts are sized for it)."""


def family_students(
    family: str,
    *,
    tiny: str,
    tiny_description: str,
    name: str,
    hf_id: str,
    description: str,
    num_frames: int = 8,
) -> tuple[StudentSpec, StudentSpec]:
    """A family's two registry entries: its tiny preset ``tiny`` (random init of the real
    classes, no download) and the real checkpoint ``name`` at ``hf_id``."""
    tiny_spec, real_spec = (
        StudentSpec(
            name=key,
            family=family,
            hf_id=hub,
            tiny=hub is None,
            num_frames=frames,
            description=text,
        )
        for key, hub, frames, text in (
            (tiny, None, TINY_FRAMES, tiny_description),
            (name, hf_id, num_frames, description),
        )
    )
    return tiny_spec, real_spec


def encoder_factory(
    encoder_class: Callable[..., VideoEncoder],
) -> Callable[[StudentSpec, nn.Module, Any, str], VideoEncoder]:
    """A family's ``make_encoder`` for an encoder class built as
    ``encoder_class(spec=, tower=, config=, pooling=)``."""

    def make(spec: StudentSpec, tower: nn.Module, config: Any, pooling: str) -> VideoEncoder:
        return encoder_class(spec=spec, tower=tower, config=config, pooling=pooling)

    return make


@dataclass(frozen=True, kw_only=True)
class StudentFamily:
    """Everything about one VideoLLM family; its module builds one and registers it.

    The methods (:meth:`load_encoder`, :meth:`encoder`, :meth:`param_groups`)
    work from the fields; a family whose model needs something else can
    subclass and override them.
    """

    name: str
    """Family key, the ``family`` of its :class:`StudentSpec` entries."""
    students: tuple[StudentSpec, ...]
    """Its registry entries (names, HF ids, frames)."""

    # -- the model ------------------------------------------------------------------------
    model_class: str
    """transformers class of the whole VideoLLM."""
    build_tiny: Callable[[int], nn.Module]
    """``seed`` -> the whole tiny VideoLLM (random init, deterministic, eval mode)."""
    tower: str
    """Path of the video encoder's module (E_phi) in the VideoLLM, e.g. ``"model.video_tower"``."""
    make_encoder: Callable[[StudentSpec, nn.Module, Any, str], VideoEncoder]
    """``(spec, tower, VideoLLM config, pooling)`` -> the family's :class:`VideoEncoder`."""

    # -- real checkpoints -----------------------------------------------------------------
    model_type: str
    """``model_type`` of the checkpoint's ``config.json``."""
    checkpoint_prefixes: tuple[str, ...]
    """Key prefixes of the tower's tensors in a checkpoint (see ``loading.load_tower``)."""

    # -- text -----------------------------------------------------------------------------
    tiny_specials: Mapping[str, int]
    """Special tokens of the tiny tokenizer and their ids in the tiny config."""
    tiny_eos: str
    chat_template: str
    """Tiny chat template (real checkpoints bring their own)."""
    placeholder: str
    """The video placeholder the chat template writes (expanded per video)."""
    video_token: str
    """The token the model fills with video features."""
    inputs: Callable[[VideoEncoder, Any, Tensor], tuple[dict[str, Tensor], str]]
    """(encoder, model config, pixels) -> model kwargs and the placeholder's expansion."""

    # -- alignment and training -----------------------------------------------------------
    vision_grid: Callable[[VideoEncoder, Any], VisionGrid]
    """(encoder, model config) -> the grid of the video tokens (``vidalign.motionenhancer.align``)."""
    vision_modules: tuple[str, ...]
    """Submodules (paths in the VideoLLM) whose parameters are the vision group."""
    projector_modules: tuple[str, ...] = field(default=())
    """Submodules of the projector group; they win over ``vision_modules`` (a merger inside
    the vision tower is the projector). Everything else is the LLM group."""

    def load_encoder(
        self,
        spec: StudentSpec,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        pooling: str,
        path: str | None,
    ) -> VideoEncoder:
        """The student's encoder: built tiny (no ``path``) or read from a checkpoint."""
        from vidalign.students.loading import load_tower, require_source

        if path is None and spec.tiny:
            model = self.build_tiny(0)
            config, tower = model.config, model.get_submodule(self.tower)
        else:
            require_source(spec, path)
            config, tower = load_tower(
                path, spec.hf_id, model_type=self.model_type, prefixes=self.checkpoint_prefixes
            )
        return self.make_encoder(spec, tower.to(device=device, dtype=dtype), config, pooling)

    def encoder(self, spec: StudentSpec, model: nn.Module, pooling: str = "frame") -> VideoEncoder:
        """The family's encoder (``pooling``: ``"frame"`` or ``"grid:G"``) on the VideoLLM's own
        tower (not a copy); the tower's ``requires_grad`` flags are left as they were."""
        return tower_view(
            lambda t: self.make_encoder(spec, t, model.config, pooling),
            model.get_submodule(self.tower),
        )

    def param_groups(self, model: nn.Module) -> ParamGroups:
        """Trainable parameters of the VideoLLM ``model`` (or a wrapper of it) by group."""
        groups: ParamGroups = {key: [] for key in PARAM_GROUPS}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if any(_inside(name, m) for m in self.projector_modules):
                groups["projector"].append((name, p))
            elif any(_inside(name, m) for m in self.vision_modules):
                groups["vision"].append((name, p))
            else:
                groups["llm"].append((name, p))
        return groups


FAMILIES: dict[str, StudentFamily] = {}
"""Registered families by name, in registration order."""

STUDENT_MODELS: dict[str, StudentSpec] = {}
"""Registered students by name: every family's ``students``, in registration order."""


def register_family(family: StudentFamily) -> StudentFamily:
    """Add ``family`` and its students to the registries; returns it (for ``FAMILY = register_family(...)``).

    Refused if the family or one of its student names is already registered,
    or a student belongs to another family.
    """
    if family.name in FAMILIES:
        raise InvalidInput(f"student family {family.name!r} is already registered")
    for spec in family.students:
        if spec.family != family.name:
            raise InvalidInput(
                f"student {spec.name!r}: family {spec.family!r} is not {family.name!r}"
            )
        if spec.name in STUDENT_MODELS or spec.name in FAMILIES:
            raise InvalidInput(f"student {spec.name!r} is already registered")
    names = [spec.name for spec in family.students]
    if len(set(names)) != len(names):
        raise InvalidInput(f"student family {family.name!r}: duplicate student names {names}")
    FAMILIES[family.name] = family
    STUDENT_MODELS.update((spec.name, spec) for spec in family.students)
    return family


def get_student_spec(name: str) -> StudentSpec:
    """Return the spec registered under ``name``; :class:`NotFound` lists the known names."""
    try:
        return STUDENT_MODELS[name]
    except KeyError:
        raise NotFound(
            f"student model {name!r} is not registered; known: {sorted(STUDENT_MODELS)}"
        ) from None


def get_family(family: StudentFamily | StudentSpec | str) -> StudentFamily:
    """The registered family of a spec, a family name or a student name."""
    if isinstance(family, StudentFamily):
        return family
    if isinstance(family, StudentSpec):
        key, owner = family.family, f" of {family.name!r}"
    elif family in FAMILIES or family not in STUDENT_MODELS:
        key, owner = family, ""
    else:
        key, owner = STUDENT_MODELS[family].family, f" of {family!r}"
    try:
        return FAMILIES[key]
    except KeyError:
        raise NotFound(
            f"student family {key!r}{owner} is not registered; known: {sorted(FAMILIES)}"
        ) from None


def param_groups(model: nn.Module, family: StudentFamily | StudentSpec | str) -> ParamGroups:
    """Trainable parameters of a VideoLLM of ``family`` (a family, spec, family or student name)
    by group: ``{"vision": [...], "projector": [...], "llm": [...]}`` of ``(name, parameter)``
    in ``model.named_parameters()`` order. ``model`` may be wrapped (``peft.PeftModel``)."""
    return get_family(family).param_groups(model)


__all__ = [
    "FAMILIES",
    "PARAM_GROUPS",
    "STUDENT_MODELS",
    "TINY_FRAMES",
    "ParamGroups",
    "StudentFamily",
    "StudentSpec",
    "VisionGrid",
    "encoder_factory",
    "family_students",
    "get_family",
    "get_student_spec",
    "param_groups",
    "register_family",
    "tower_view",
]
