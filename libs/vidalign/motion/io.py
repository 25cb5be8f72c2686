"""Priors on disk: one safetensors file per (clip, prompt), reusable across VLMs and runs.

Tensors: ``prior`` (n_tokens, F_tok, h, w) float32, ``head_scores`` (H,),
``token_scores`` (L,). Metadata (JSON under ``vidalign.priors``): the prompt,
the selected heads, the selected tokens with their character spans in the
prompt (``index``, ``start``, ``end``, ``text``, ``score``) and the
extraction metadata (model, steps, guidance, token grid, ...). The character
spans are what a VLM needs to find its own tokens for each selected word,
whatever its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from vidalign.errors import InvalidInput
from vidalign.motion.inversion import Priors
from vidalign.motion.mtti import SelectedToken

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
