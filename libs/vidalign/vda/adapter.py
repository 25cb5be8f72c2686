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
lora_rank, lora_alpha, lora_targets, teacher_family); with a LoRA,
``lora_adapter_metadata`` holds its ``LoraConfig`` (``unet.r``,
``unet.lora_alpha``, ``unet.target_modules``) as diffusers writes and reads it.
So diffusers loads the LoRA from the adapter file itself:
``unet.load_lora_adapter(path, prefix="unet", adapter_name=..., use_safetensors=True)``
(``use_safetensors=True`` makes it read the header, hence alpha); the projection
keys are not under ``unet.`` and are skipped. ``Adapter.save_lora_weights`` writes
the LoRA alone as ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights``.
Version-1 files (the LoRA under ``lora.<peft key>``, no LoRA metadata) still load.
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


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file, read in chunks."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _build_projection(projection: str, d_v: int, cond_dim: int) -> torch.nn.Module:
    if projection == "linear":
        return torch.nn.Linear(d_v, cond_dim)
    # The paper's appendix-B alternative (the linear W_proj did better).
    return torch.nn.Sequential(
        torch.nn.Linear(d_v, cond_dim), torch.nn.GELU(), torch.nn.Linear(cond_dim, cond_dim)
    )


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
    ) -> None:
        super().__init__()
        for field, value in (("d_v", d_v), ("cond_dim", cond_dim)):
            if not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{field}: expected a positive int, got {value!r}")
        if projection not in PROJECTIONS:
            raise InvalidInput(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
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
        self.proj = _build_projection(projection, d_v, cond_dim)
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
    ) -> Adapter:
        """A freshly initialised adapter, the same for the same arguments.

        A LoRA (``lora_rank > 0``) needs ``teacher`` to read its UNet's layer shapes.
        """
        if teacher is not None and (teacher.family, teacher.cond_dim) != (teacher_family, cond_dim):
            raise InvalidInput(
                f"teacher: expected family {teacher_family!r} with cond_dim {cond_dim}, "
                f"got {teacher.family!r} with cond_dim {teacher.cond_dim}"
            )
        if lora_rank > 0 and teacher is None:
            raise InvalidInput("teacher: a LoRA (lora_rank > 0) needs the teacher's UNet, got None")
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
            )

    def project(self, features: Tensor) -> Tensor:
        """W_proj(F_V): ``(B, T, d_v)`` -> ``(B, T, cond_dim)`` conditioning tokens."""
        if features.ndim != 3 or features.shape[-1] != self.d_v:
            raise InvalidInput(
                f"features: expected (B, T, {self.d_v}), got {tuple(features.shape)}"
            )
        weight = next(self.proj.parameters())
        return self.proj(features.to(weight.device, weight.dtype))

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
        return {
            "d_v": self.d_v,
            "cond_dim": self.cond_dim,
            "projection": self.projection,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets,
            "teacher_family": self.teacher_family,
        }

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
