"""VDA's conditioning adapter: W_proj and an optional UNet LoRA, stored as one file.

Stage 1 trains both with the encoder frozen; stage 2 freezes both and trains the
encoder through them. The adapter therefore travels between processes (stage-1
job -> store -> teacher service) and is named by the sha256 of its file, so a
request that cites an adapter digest gets exactly those weights.

File format (version 2): safetensors with keys ``proj.<param>`` (W_proj) and
``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (the UNet LoRA: peft's
state-dict keys under the ``unet.`` prefix, the layout diffusers' LoRA training
scripts write). The metadata key ``vidalign.adapter`` holds JSON of
``format_version`` and the adapter's fields (d_v, cond_dim, projection,
lora_rank, lora_alpha, lora_targets, teacher_family, conditioning, frame_tokens,
max_frames, spatial_channels); with a LoRA,
``lora_adapter_metadata`` holds its ``LoraConfig`` (``unet.r``,
``unet.lora_alpha``, ``unet.target_modules``) as diffusers writes and reads it.
So diffusers loads the LoRA from the adapter file itself:
``unet.load_lora_adapter(path, prefix="unet", adapter_name=..., use_safetensors=True)``
(``use_safetensors=True`` makes it read the header, hence alpha); the projection
keys are not under ``unet.`` and are skipped. ``Adapter.save_lora_weights`` writes
the LoRA alone as ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights``.
Version-1 files (the LoRA under ``lora.<peft key>``, no LoRA metadata) still load.
Files written before the conditioning fields existed load as ``conditioning
"context"`` (what they were trained with); under ``"frame_pos"`` the projection
holds one more tensor, ``proj.frame_pos`` (the frame-position table).

Conditioning modes (docs/design.md, "VDA conditioning"): how W_proj(F_V) reaches
the teacher's F frames, given F_V's ``T * frame_tokens`` frame-major tokens:

- ``"frame"`` (new adapters' default): teacher frame f cross-attends to
  ``[text; W_proj(tokens of student frame frame_sources(F, T)[f])]``;
- ``"frame_pos"``: every frame sees all tokens, each plus a learned embedding of
  its student frame index (``proj.frame_pos``, zero at creation);
- ``"context"``: every frame sees all tokens, unordered (the original route);
- ``"spatial"``: W_proj maps each token to the UNet's first feature channels
  (``spatial_channels``); teacher frame f adds the tokens of student frame
  ``frame_sources(F, T)[f]``, laid out on their G x G grid (``frame_tokens`` =
  G * G, row-major as ``grid:G`` pooling writes them) and resized to the latent
  size, to the output of the UNet's input convolution. The text alone is the
  cross-attention context. The projection's last layer starts at zero, so a
  fresh adapter leaves the teacher's output unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from torch import Tensor

from vidalign.errors import InvalidInput, NotFound
from vidalign.vda.diffusion import FAMILIES, DiffusionTeacher
from vidalign.video import uniform_indices

METADATA_KEY = "vidalign.adapter"
FORMAT_VERSION = 2
LORA_PREFIXES = {1: "lora.", 2: "unet."}
"""Where each format version keeps the LoRA's peft keys; version 2 uses diffusers' UNet prefix."""
DIFFUSERS_LORA_METADATA_KEY = "lora_adapter_metadata"
"""diffusers' header key for a LoRA's ``LoraConfig`` (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``)."""
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file name ``pipeline.load_lora_weights(directory)`` looks for."""
PROJECTIONS = ("linear", "mlp")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""VDA's LoRA sites: every attention projection (on AnimateDiff this includes the motion modules)."""
CONDITIONINGS = ("frame", "frame_pos", "context", "spatial")
"""How W_proj(F_V) reaches the teacher's frames (module docstring)."""
DEFAULT_CONDITIONING = "frame"
"""New adapters' mode: the features of a student frame condition the teacher frames at its time."""
LEGACY_CONDITIONING = "context"
"""The mode of an adapter file without a ``conditioning`` field (written before it existed)."""
DEFAULT_MAX_FRAMES = 64
"""Rows of the ``frame_pos`` table: student frames (temporal steps) it can tell apart."""


def frame_sources(teacher_frames: int, student_frames: int) -> list[int]:
    """The student frame that conditions each teacher frame under ``"frame"`` conditioning.

    Both sides sample their frames uniformly over the same clip with both ends
    included (``vidalign.video.uniform_indices``), so student frame s sits at
    relative time s / (T - 1) and teacher frame f at f / (F - 1); teacher frame f
    gets the student frame nearest in time, ``round(f (T - 1) / (F - 1))``, which
    is ``uniform_indices(T, F)``. With F > T (VDA: 24 vs 8) each student frame
    conditions about F / T neighbouring teacher frames; with F < T some student
    frames condition none.
    """
    for name, value in (("teacher_frames", teacher_frames), ("student_frames", student_frames)):
        if not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name}: expected an int >= 1, got {value!r}")
    return uniform_indices(student_frames, teacher_frames)


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file, read in chunks."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _build_projection(
    projection: str, d_v: int, cond_dim: int, position_frames: int = 0, zero_out: bool = False
) -> torch.nn.Module:
    """W_proj, plus a zero ``frame_pos`` table ``(position_frames, cond_dim)`` if that is > 0.

    ``zero_out`` zeroes the last layer (``"spatial"``: the added feature map starts
    at zero, as ControlNet's zero convolutions do, so the teacher starts as pretrained;
    the first step's gradient still reaches that layer's weight through its input).

    The table is a parameter of the projection module itself, so whatever trains,
    checkpoints or loads W_proj (``adapter.proj``: stage 1, the adapter file's
    ``proj.`` keys) carries it too, and W_proj's own keys stay those of files
    written before it existed. Zero at creation: a fresh adapter projects as
    under ``"context"``, and training moves it.
    """
    if projection == "linear":
        module: torch.nn.Module = torch.nn.Linear(d_v, cond_dim)
    else:
        # The paper's appendix-B alternative (the linear W_proj did better).
        module = torch.nn.Sequential(
            torch.nn.Linear(d_v, cond_dim), torch.nn.GELU(), torch.nn.Linear(cond_dim, cond_dim)
        )
    if zero_out:
        last = module if isinstance(module, torch.nn.Linear) else module[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    if position_frames:
        module.register_parameter(
            "frame_pos", torch.nn.Parameter(torch.zeros(position_frames, cond_dim))
        )
    return module


def _lora_init(
    unet: torch.nn.Module, targets: list[str], rank: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """LoRA weights for the UNet's target layers, initialised as peft does.

    A is Kaiming-uniform and B is zero, so a fresh LoRA leaves the teacher's
    output unchanged. Built here rather than by injecting into the teacher, which
    is shared and may be serving other adapters.
    """
    state: dict[str, Tensor] = {}
    for name, module in unet.named_modules():
        # peft's rule: a module is a target if its name is, or ends with, ".<target>".
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if isinstance(module, BaseTunerLayer):  # another LoRA is attached already
            module = module.get_base_layer()
        if not isinstance(module, torch.nn.Linear):
            raise InvalidInput(
                f"lora_targets: {name} is a {type(module).__name__}; only Linear layers are supported"
            )
        lora_a = torch.empty(rank, module.in_features)
        torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        state[f"{name}.lora_A.weight"] = lora_a
        state[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    if not state:
        raise InvalidInput(f"lora_targets: no UNet layer matches {targets}")
    return state


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose header lists the metadata in sorted key order.

    safetensors writes ``__metadata__`` from a hash map: with more than one key
    the order, and so the file's digest (the adapter id), would change from one
    process to the next. Re-writing the header with sorted keys keeps the bytes a
    function of the content; the tensor entries and the data are left as written.
    """
    data = safetensors.torch.save(tensors, metadata=metadata)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw + data[8 + header_len :]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader (another replica, the store uploader) sees the old file or the
    # whole new one, never a torn write.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_metadata(data: bytes, path: Path) -> tuple[int, dict[str, Any]]:
    """The format version and adapter fields from a safetensors header (8-byte length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise InvalidInput(f"{path}: not a vidalign adapter (no {METADATA_KEY!r} metadata)")
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path}: {METADATA_KEY!r} metadata is not JSON: {e}") from e
    version = fields.pop("format_version", None) if isinstance(fields, dict) else None
    if type(version) is not int or version not in LORA_PREFIXES:
        raise InvalidInput(
            f"{path}: expected adapter format_version in {sorted(LORA_PREFIXES)}, "
            f"got metadata {raw:.200}"
        )
    return version, fields


class Adapter(torch.nn.Module):
    """VDA's conditioning adapter: W_proj (features -> cross-attention dim) + optional UNet LoRA.

    The LoRA weights are kept as a peft-format state dict, not as modules: they
    only take effect once attached to a teacher's UNet
    (``DiffusionTeacher.attach_lora``), which ``denoising_loss`` does on first use
    under ``lora_name``. Stage 1 trains the attached copy
    (``teacher.lora_parameters``) and copies it back with
    ``adapter.lora_state = teacher.lora_state_dict(adapter.lora_name)`` before saving.

    ``conditioning`` says how the projected tokens reach the teacher's frames
    (module docstring); ``frame_tokens`` is the number of F_V tokens per student
    frame (the encoder's ``tokens_per_frame``: 1 for ``"frame"`` pooling, G*G for
    ``"grid:G"``), needed to find a token's frame; ``max_frames`` is the size of
    the ``"frame_pos"`` table (stored in every mode, used by that one only);
    ``spatial_channels`` is W_proj's output width under ``"spatial"`` (the teacher's
    ``spatial_channels``) and 0 otherwise.
    """

    def __init__(
        self,
        *,
        d_v: int,
        cond_dim: int,
        projection: str = "linear",
        lora_rank: int = 0,
        lora_alpha: int | None = None,
        lora_targets: list[str] | None = None,
        teacher_family: str,
        lora_state: dict[str, Tensor] | None = None,
        conditioning: str = DEFAULT_CONDITIONING,
        frame_tokens: int = 1,
        max_frames: int = DEFAULT_MAX_FRAMES,
        spatial_channels: int = 0,
    ) -> None:
        super().__init__()
        for field, value in (
            ("d_v", d_v),
            ("cond_dim", cond_dim),
            ("frame_tokens", frame_tokens),
            ("max_frames", max_frames),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInput(f"{field}: expected a positive int, got {value!r}")
        if conditioning not in CONDITIONINGS:
            raise InvalidInput(
                f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}"
            )
        if projection not in PROJECTIONS:
            raise InvalidInput(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
        spatial = conditioning == "spatial"
        if not isinstance(spatial_channels, int) or isinstance(spatial_channels, bool) or (
            spatial_channels <= 0 if spatial else spatial_channels != 0
        ):
            want = "a positive int (the teacher's spatial_channels)" if spatial else "0"
            raise InvalidInput(
                f"spatial_channels: expected {want} under conditioning {conditioning!r}, "
                f"got {spatial_channels!r}"
            )
        if spatial and math.isqrt(frame_tokens) ** 2 != frame_tokens:
            raise InvalidInput(
                f"frame_tokens: 'spatial' conditioning lays a frame's tokens on a square grid, "
                f"got {frame_tokens}; use 'frame' or 'grid:G' pooling"
            )
        if teacher_family not in FAMILIES:
            raise InvalidInput(
                f"teacher_family: expected one of {FAMILIES}, got {teacher_family!r}"
            )
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise InvalidInput(f"lora_rank: expected an int >= 0, got {lora_rank!r}")
        self.d_v = d_v
        self.cond_dim = cond_dim
        self.projection = projection
        self.lora_rank = lora_rank
        # alpha = rank makes the LoRA scale alpha / r equal 1.
        self.lora_alpha = lora_rank if lora_alpha is None else lora_alpha
        self.lora_targets = list(DEFAULT_LORA_TARGETS if lora_targets is None else lora_targets)
        self.teacher_family = teacher_family
        self.conditioning = conditioning
        self.frame_tokens = frame_tokens
        self.max_frames = max_frames
        self.spatial_channels = spatial_channels
        self.proj = _build_projection(
            projection,
            d_v,
            spatial_channels if spatial else cond_dim,
            max_frames if conditioning == "frame_pos" else 0,
            zero_out=spatial,
        )
        self.lora_state = dict(lora_state or {})
        self._check_lora_state()
        self.digest: str | None = None
        # The name of this adapter's LoRA on a teacher: the file digest for a loaded
        # adapter (what service requests cite), a unique name for a created one. It
        # stays fixed when the adapter is saved, so the LoRA that stage 1 trains
        # inside the teacher stays the one in use.
        self.lora_name = f"adapter-{uuid.uuid4().hex}"

    def _check_lora_state(self) -> None:
        if self.lora_rank == 0 and self.lora_state:
            raise InvalidInput(
                f"lora_state: expected none for lora_rank 0, got {len(self.lora_state)} tensors"
            )
        if self.lora_rank > 0 and not self.lora_state:
            raise InvalidInput(
                f"lora_state: expected weights for lora_rank {self.lora_rank}, got none"
            )
        # lora_A is (r, in_features), lora_B is (out_features, r).
        for key, value in self.lora_state.items():
            kind = key.removesuffix(".weight").rsplit(".", 1)[-1]
            rank_dim = {"lora_A": 0, "lora_B": 1}.get(kind) if key.endswith(".weight") else None
            if rank_dim is None or value.ndim != 2 or value.shape[rank_dim] != self.lora_rank:
                raise InvalidInput(
                    f"lora_state[{key!r}]: expected a lora_A/lora_B weight of rank "
                    f"{self.lora_rank}, got shape {tuple(value.shape)}"
                )

    @classmethod
    def create(
        cls,
        *,
        d_v: int,
        cond_dim: int,
        projection: str = "linear",
        lora_rank: int = 0,
        lora_alpha: int | None = None,
        teacher_family: str,
        seed: int = 0,
        teacher: DiffusionTeacher | None = None,
        conditioning: str = DEFAULT_CONDITIONING,
        frame_tokens: int = 1,
        max_frames: int = DEFAULT_MAX_FRAMES,
        spatial_channels: int | None = None,
    ) -> Adapter:
        """A freshly initialised adapter, the same for the same arguments.

        A LoRA (``lora_rank > 0``) needs ``teacher`` to read its UNet's layer shapes.
        ``frame_tokens`` must be the student encoder's ``tokens_per_frame``.
        ``"spatial"`` conditioning needs ``spatial_channels``, read from ``teacher``
        when not given.
        """
        if teacher is not None and (teacher.family, teacher.cond_dim) != (teacher_family, cond_dim):
            raise InvalidInput(
                f"teacher: expected family {teacher_family!r} with cond_dim {cond_dim}, "
                f"got {teacher.family!r} with cond_dim {teacher.cond_dim}"
            )
        if lora_rank > 0 and teacher is None:
            raise InvalidInput("teacher: a LoRA (lora_rank > 0) needs the teacher's UNet, got None")
        if conditioning != "spatial":
            spatial_channels = 0
        elif spatial_channels is None:
            if teacher is None:
                raise InvalidInput(
                    "teacher: 'spatial' conditioning needs spatial_channels or the teacher to read "
                    "them from, got neither"
                )
            spatial_channels = teacher.spatial_channels
        targets = list(DEFAULT_LORA_TARGETS)
        lora_state = None
        if lora_rank > 0:
            generator = torch.Generator().manual_seed(seed)
            lora_state = _lora_init(teacher.unet, targets, lora_rank, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(
                d_v=d_v,
                cond_dim=cond_dim,
                projection=projection,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                lora_targets=targets,
                teacher_family=teacher_family,
                lora_state=lora_state,
                conditioning=conditioning,
                frame_tokens=frame_tokens,
                max_frames=max_frames,
                spatial_channels=spatial_channels,
            )

    @property
    def frame_grid(self) -> int:
        """G of the G x G grid a frame's tokens form under ``"spatial"`` (``isqrt(frame_tokens)``)."""
        return math.isqrt(self.frame_tokens)

    def student_frames(self, features: Tensor) -> int:
        """The number of student frames T in F_V ``(B, T * frame_tokens, d_v)``; checks the shape.

        InvalidInput when F_V is not 3-d with ``d_v`` channels, when its token count
        is not a multiple of ``frame_tokens`` (features pooled otherwise than this
        adapter was made for), or, under ``"frame_pos"``, when T exceeds ``max_frames``.
        """
        if features.ndim != 3 or features.shape[-1] != self.d_v:
            raise InvalidInput(
                f"features: expected (B, T * frame_tokens, {self.d_v}), got {tuple(features.shape)}"
            )
        tokens = features.shape[1]
        if tokens == 0 or tokens % self.frame_tokens:
            raise InvalidInput(
                f"features: shape {tuple(features.shape)} has {tokens} tokens per sample, not a "
                f"positive multiple of the adapter's frame_tokens {self.frame_tokens} (tokens per "
                "student frame); extract F_V with the pooling the adapter was made for"
            )
        frames = tokens // self.frame_tokens
        if self.conditioning == "frame_pos" and frames > self.max_frames:
            raise InvalidInput(
                f"features: shape {tuple(features.shape)} holds {frames} frames of "
                f"{self.frame_tokens} tokens; the adapter's frame_pos table covers "
                f"max_frames {self.max_frames}"
            )
        return frames

    def project(self, features: Tensor) -> Tensor:
        """W_proj(F_V): ``(B, T * frame_tokens, d_v)`` -> ``(B, T * frame_tokens, cond_dim)`` tokens
        (``spatial_channels`` wide under ``"spatial"``).

        Under ``"frame_pos"`` each token also gets ``proj.frame_pos[s]``, s its
        student frame (token index // frame_tokens), so the teacher can see order.
        """
        frames = self.student_frames(features)
        weight = next(self.proj.parameters())
        tokens = self.proj(features.to(weight.device, weight.dtype))
        if self.conditioning == "frame_pos":
            positions = self.proj.frame_pos[:frames].repeat_interleave(self.frame_tokens, dim=0)
            tokens = tokens + positions
        return tokens

    def lora_config(self) -> LoraConfig | None:
        """The peft config of the UNet LoRA, or None without one."""
        if self.lora_rank == 0:
            return None
        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.lora_targets),
            init_lora_weights=True,
        )

    def _fields(self) -> dict[str, Any]:
        # spatial_channels only where it is used: other adapters' files (and so their
        # digests, the ids requests cite) stay what they were before it existed.
        spatial = {"spatial_channels": self.spatial_channels} if self.spatial_channels else {}
        return {
            "d_v": self.d_v,
            "cond_dim": self.cond_dim,
            "projection": self.projection,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets,
            "teacher_family": self.teacher_family,
            "conditioning": self.conditioning,
            "frame_tokens": self.frame_tokens,
            "max_frames": self.max_frames,
        } | spatial

    def _diffusers_lora(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The LoRA as diffusers' pipeline LoRA files hold it: tensors and header metadata."""
        prefix = LORA_PREFIXES[FORMAT_VERSION]
        tensors = {f"{prefix}{k}": v for k, v in self.lora_state.items()}
        if not tensors:
            return {}, {}
        # What diffusers' save_lora_weights(unet_lora_adapter_metadata=...) writes:
        # LoraConfig fields under the component prefix. load_lora_adapter builds
        # its LoraConfig from these; without them it assumes lora_alpha = r.
        config = {
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.lora_targets),
        }
        config = {f"{prefix}{k}": v for k, v in config.items()}
        return tensors, {DIFFUSERS_LORA_METADATA_KEY: json.dumps(config, sort_keys=True)}

    def save(self, path: str | Path) -> str:
        """Write the adapter atomically; return (and keep) the file's digest."""
        path = Path(path)
        lora_tensors, lora_metadata = self._diffusers_lora()
        tensors = {f"proj.{k}": v for k, v in self.proj.state_dict().items()} | lora_tensors
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        fields = {"format_version": FORMAT_VERSION, **self._fields()}
        data = _serialize(tensors, {METADATA_KEY: json.dumps(fields), **lora_metadata})
        _write_atomic(path, data)
        self.digest = _bytes_digest(data)
        return self.digest

    def save_lora_weights(self, directory: str | Path) -> Path:
        """Write the UNet LoRA alone as ``<directory>/pytorch_lora_weights.safetensors``.

        The file diffusers' LoRA training scripts write (``unet.``-prefixed peft
        keys and ``lora_adapter_metadata``), for ``pipeline.load_lora_weights(directory)``,
        which refuses the adapter file itself because W_proj's keys are not LoRA keys.
        """
        tensors, metadata = self._diffusers_lora()
        if not tensors:
            raise InvalidInput("adapter: lora_rank is 0, there is no LoRA to write")
        path = Path(directory) / LORA_WEIGHT_NAME
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _write_atomic(path, _serialize(tensors, metadata))
        return path

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> Adapter:
        """Read an adapter file; its digest is computed from the same bytes that are parsed."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise NotFound(f"adapter file {path} does not exist") from e
        try:
            tensors = safetensors.torch.load(data)
        except SafetensorError as e:
            raise InvalidInput(f"{path}: not a safetensors file: {e}") from e
        version, fields = _read_metadata(data, path)
        # A file from before conditioning modes existed was trained with the one route then.
        fields.setdefault("conditioning", LEGACY_CONDITIONING)
        fields.setdefault("spatial_channels", 0)
        prefix = LORA_PREFIXES[version]
        proj_state = {
            k.removeprefix("proj."): v for k, v in tensors.items() if k.startswith("proj.")
        }
        lora_state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        unknown = sorted(k for k in tensors if not k.startswith(("proj.", prefix)))
        if unknown:
            raise InvalidInput(f"{path}: unexpected tensors {unknown[:3]}")
        try:
            adapter = cls(**fields, lora_state=lora_state)
            adapter.proj.load_state_dict(proj_state)
        except (TypeError, RuntimeError, InvalidInput) as e:
            raise InvalidInput(f"{path}: adapter does not match its metadata: {e}") from e
        adapter.to(map_location)
        adapter.lora_state = {k: v.to(map_location) for k, v in lora_state.items()}
        adapter.digest = _bytes_digest(data)
        adapter.lora_name = adapter.digest
        return adapter
