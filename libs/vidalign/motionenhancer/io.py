"""Priors on disk: one safetensors file per (clip, prompt), reusable across VLMs and runs.

A priors set (what `vidalign priors extract` writes, what `vidalign train sft`
reads) is a store prefix of committed shards, ``shard-NNNNN/<clip key>.safetensors``,
and an ``index`` artifact committed last that maps clip ids to their shard and
prompt; ``load_priors_set`` refuses a set without it.

Tensors: ``prior`` (n_tokens, F_tok, h, w) float32, ``head_scores`` (H,),
``token_scores`` (L,). Metadata (JSON under ``vidalign.priors``): the prompt,
the selected heads, the selected tokens with their character spans in the
prompt (``index``, ``start``, ``end``, ``text``, ``score``) and the
extraction metadata (model, steps, guidance, token grid, ...). The character
spans are what a VLM needs to find its own tokens for each selected word,
whatever its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from vidalign.errors import InvalidInput, NotFound
from vidalign.motionenhancer.inversion import Priors
from vidalign.motionenhancer.mtti import SelectedToken
from vidalign.shards import INDEX, INDEX_FILE, ShardOutput, read_index, run_sharded, shard_name
from vidalign.store import open_store, read_artifact_file

FORMAT = 1
KEY = "vidalign.priors"


def priors_to_bytes(priors: Priors, *, prompt: str, meta: dict[str, Any] | None = None) -> bytes:
    header = {
        "format": FORMAT,
        "prompt": prompt,
        "selected_heads": [int(h) for h in priors.selected_heads],
        "tokens": [
            {"index": t.index, "start": t.span[0], "end": t.span[1], "text": t.text, "score": t.score}
            for t in priors.selected_tokens
        ],
        "metadata": {**priors.metadata, **(meta or {})},
    }
    tensors = {
        "prior": priors.prior.detach().float().cpu().contiguous(),
        "head_scores": priors.head_scores.detach().float().cpu().contiguous(),
        "token_scores": priors.token_scores.detach().float().cpu().contiguous(),
    }
    return save(tensors, metadata={KEY: json.dumps(header, default=str)})


def priors_from_bytes(data: bytes, where: str = "priors") -> tuple[Priors, str]:
    """(priors, prompt); InvalidInput naming ``where`` on a corrupt or foreign file."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        raise InvalidInput(f"{where}: not a safetensors file ({err})") from None
    header_bytes = data[8 : 8 + int.from_bytes(data[:8], "little")]
    try:
        header = json.loads(json.loads(header_bytes)["__metadata__"][KEY])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise InvalidInput(f"{where}: a safetensors file without vidalign priors metadata") from None
    if header.get("format") != FORMAT or not {"prior", "head_scores", "token_scores"} <= tensors.keys():
        raise InvalidInput(f"{where}: unsupported priors format {header.get('format')!r}")
    tokens = [
        SelectedToken(index=t["index"], span=(t["start"], t["end"]), text=t["text"], score=t["score"])
        for t in header["tokens"]
    ]
    if tensors["prior"].shape[0] != len(tokens):
        raise InvalidInput(
            f"{where}: prior has {tensors['prior'].shape[0]} rows for {len(tokens)} selected tokens"
        )
    priors = Priors(
        head_scores=tensors["head_scores"],
        selected_heads=header["selected_heads"],
        token_scores=tensors["token_scores"],
        selected_tokens=tokens,
        prior=tensors["prior"],
        metadata=header["metadata"],
    )
    return priors, header["prompt"]


def save_priors(priors: Priors, path: str | Path, *, prompt: str, meta: dict[str, Any] | None = None) -> None:
    Path(path).write_bytes(priors_to_bytes(priors, prompt=prompt, meta=meta))


def load_priors(path: str | Path) -> tuple[Priors, str]:
    return priors_from_bytes(Path(path).read_bytes(), str(path))


# --- priors sets in the store --------------------------------------------------------


def clip_key(clip_id: str) -> str:
    """A file-name-safe key for a clip id (ids may hold '/' or spaces)."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id).strip(".") or "clip"
    if key != clip_id:  # keep distinct ids distinct
        key += "-" + hashlib.sha256(clip_id.encode()).hexdigest()[:8]
    return key


@dataclass
class PriorsSet:
    """A committed priors set: its index, and each clip's priors read on demand."""

    uri: str
    clips: list[dict[str, Any]]
    source: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        return [c["id"] for c in self.clips]

    def get(self, clip_id: str):
        """(Priors, prompt) of one clip, verified against its shard's manifest."""
        entry = next((c for c in self.clips if c["id"] == clip_id), None)
        if entry is None:
            raise NotFound(f"priors {self.uri}: no clip {clip_id!r} (it has {len(self.clips)})")
        rel = f"{entry['key']}.safetensors"
        data = read_artifact_file(open_store(self.uri), entry["shard"], rel)
        return priors_from_bytes(data, f"{self.uri}/{entry['shard']}/{rel}")


def load_priors_set(uri: str) -> PriorsSet:
    store = open_store(uri)
    index = read_index(store, "priors", "vidalign priors extract")
    return PriorsSet(uri=store.uri, clips=index["clips"], source=index["source"])


def write_priors_set(
    uri: str, items: Mapping[str, tuple[Priors, str]], *, source: Mapping[str, Any] | None = None
) -> str:
    """Commit ``clip id -> (priors, prompt)`` as a one-shard priors set at ``uri``."""
    ids = list(items)
    keys = [clip_key(c) for c in ids]

    def run_shard(shard, advance) -> ShardOutput:
        files = {f"{k}.safetensors": priors_to_bytes(p, prompt=prompt)
                 for k, (p, prompt) in zip(keys, items.values(), strict=True)}
        return ShardOutput(files, {"keys": keys})

    def index(shards, manifests):
        clips = [{"id": c, "key": k, "shard": shard_name(0), "prompt": prompt}
                 for c, k, (_, prompt) in zip(ids, keys, items.values(), strict=True)]
        return {"clips": clips}, {}

    return run_sharded(open_store(uri), ids, max(len(ids), 1), run_shard, source=dict(source or {}),
                       producer="vidalign.motionenhancer.io", index=index, resume=False,
                       name="priors_set").uri


__all__ = [
    "FORMAT",
    "INDEX",
    "INDEX_FILE",
    "KEY",
    "PriorsSet",
    "clip_key",
    "load_priors",
    "load_priors_set",
    "priors_from_bytes",
    "priors_to_bytes",
    "save_priors",
    "shard_name",
    "write_priors_set",
]
