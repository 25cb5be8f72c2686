"""Reading a student's video tower out of a whole-VideoLLM checkpoint (any family).

Only the tower's tensors are read (and, for a hub id, only the files holding
them are fetched), so a 7B model's LLM shards are never downloaded. A family
says which ``model_type`` its ``config.json`` has and under which key
prefixes its tower's tensors are (:class:`~vidalign.students.StudentFamily`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from vidalign.errors import InvalidInput, NotFound
from vidalign.students.family import StudentSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def require_source(spec: StudentSpec, path: str | None) -> None:
    """Refuse a student that has neither a checkpoint ``path`` nor an ``hf_id``."""
    if path is None and spec.hf_id is None:
        raise InvalidInput(
            f"path: student {spec.name!r} has no hf_id, so a checkpoint path is required"
        )


def tower_key(key: str, prefixes: Sequence[str]) -> str | None:
    """Checkpoint key -> key in the tower's state dict, or ``None`` if not a tower key.

    Hub checkpoints converted before transformers 5 nest CLIP under
    ``vision_model.``; transformers 5's ``CLIPVisionModel`` does not.
    """
    for prefix in prefixes:
        if key.startswith(prefix):
            return key.removeprefix(prefix).removeprefix("vision_model.")
    return None


def checkpoint_dir(path: str | None, hf_id: str | None, files: list[str]) -> Path:
    """A local directory holding ``files`` (those that exist in the checkpoint).

    For a hub id only ``files`` are fetched (or found in the HF cache), so the
    7B model's LLM shards are never downloaded.
    """
    if path is not None:
        root = Path(path)
        if not root.is_dir():
            raise NotFound(f"path: student checkpoint directory {str(root)!r} does not exist")
        return root
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hf_id, allow_patterns=files))


def load_tower(
    path: str | None,
    hf_id: str | None,
    *,
    model_type: str,
    prefixes: Sequence[str],
    vision_config: Callable[[object], object] = lambda config: config.vision_config,  # type: ignore[attr-defined]
) -> tuple:
    """The VideoLLM's config and its vision tower, built from ``vision_config(config)``
    and filled with only the checkpoint tensors under one of ``prefixes``."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    source = path if path is not None else hf_id
    root = checkpoint_dir(path, hf_id, ["config.json", INDEX_FILE])
    if not (root / "config.json").is_file():
        raise NotFound(f"config.json: not found in student checkpoint {source!r}")
    config = AutoConfig.from_pretrained(root)
    if config.model_type != model_type:
        raise InvalidInput(
            f"config.json of {source!r}: expected model_type {model_type!r}, got {config.model_type!r}"
        )
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        shards = sorted(
            {f for key, f in weight_map.items() if tower_key(key, prefixes) is not None}
        )
    else:
        shards = [SINGLE_FILE]
    if not shards:
        raise InvalidInput(f"{INDEX_FILE} of {source!r}: no key starts with {tuple(prefixes)}")
    if path is None:
        root = checkpoint_dir(None, hf_id, shards)
    missing_files = [f for f in shards if not (root / f).is_file()]
    if missing_files:
        raise NotFound(
            f"safetensors: {missing_files} not found in student checkpoint {source!r} "
            f"(expected {SINGLE_FILE}, or {INDEX_FILE} and its shards)"
        )

    state: dict[str, Tensor] = {}
    for shard in shards:
        with safe_open(root / shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                name = tower_key(key, prefixes)
                if name is None:
                    continue
                if name in state:
                    raise InvalidInput(f"{source!r}: tower weight {name!r} appears under two names")
                state[name] = f.get_tensor(key)

    # Every tensor is overwritten below, so random init would be wasted work
    # (seconds for ViT-L); non-persistent buffers are still computed.
    with no_init_weights():
        tower = AutoModel.from_config(vision_config(config))
    expected = tower.state_dict()
    problems = {
        "missing": sorted(expected.keys() - state.keys()),
        "unexpected": sorted(state.keys() - expected.keys()),
        "wrong shape": sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    }
    if any(problems.values()):
        summary = "; ".join(
            f"{kind} ({len(keys)}): {keys[:5]}" for kind, keys in problems.items() if keys
        )
        raise InvalidInput(
            f"{source!r}: video-tower weights do not match its config.json ({summary})"
        )
    tower.load_state_dict(state)
    return config, tower.eval()


TINY_LLM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
"""The tiny LLM of every tiny family's ``text_config`` (32 wide, 2 layers, 128 tokens); a family
adds its ``model_type`` and special-token ids."""


def build_tiny_model(model_class: str, config: object, seed: int):
    """``transformers.<model_class>(config)`` in eval mode, weights fixed by ``seed``.

    Initialised inside ``torch.random.fork_rng`` so that building it never
    shifts the caller's random stream (a training run's draws do not depend on
    whether a model was built first).
    """
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(config)
    return model.eval()
