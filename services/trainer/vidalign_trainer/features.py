"""VDA feature extraction: the frozen encoder E_phi over a dataset, F_V to the store.

Stage 1 trains W_proj and the UNet LoRA with the encoder frozen, so F_V = E_phi(V)
is a fixed input there: it is computed once, here, and read by the stage-1 job
(which runs on the teacher's GPUs and never loads the student).

Layout of a feature set at ``output.dir`` (a local dir or ``s3://...``)::

    shard-00000/features.safetensors   clip id -> F_V (T, d_v) float32
    shard-00000/MANIFEST.json          meta: clip_ids, source (what made them)
    shard-00001/...
    index/index.json                   clip_ids, shards, d_v, tokens, source

Every shard is an artifact (files first, manifest last), so a killed job
leaves whole shards only; a rerun skips the shards already committed with the
same source and recomputes the rest. ``index`` is committed last: a feature
set without it is incomplete, and ``load_features`` refuses it.

Plug-in point: a dataset is anything with ``ids`` (list of clip ids) and
``clips(indices) -> ClipBatch``; the toy clips are the only one today.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.config import ConfigError, config_digest, load_config, to_dict
from vidalign.errors import InvalidInput, NotFound, VidalignError
from vidalign.hub import weights_component
from vidalign.log import configure_logging, get_logger
from vidalign.store import commit_artifact, open_store, read_artifact_file, read_manifest
from vidalign.students import load_student
from vidalign_trainer.common import ClipDataset, DataConfig, open_dataset

log = get_logger("vidalign.features")

FEATURES_FILE = "features.safetensors"
INDEX = "index"
INDEX_FILE = "index.json"
PRODUCER = "vidalign features extract"


# --- datasets -------------------------------------------------------------------


# --- config ---------------------------------------------------------------------


@dataclass(kw_only=True)
class FeaturesOutputConfig:
    dir: str = "runs/features"
    """Store URI (local dir or s3://bucket/prefix) of the feature set."""
    shard_size: int = 256
    """Clips per shard: the unit of commit and of resumption."""

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"output.shard_size must be >= 1, got {self.shard_size}")


@dataclass(kw_only=True)
class FeaturesConfig:
    student: str = "tiny-videollava"
    """Student whose frozen video encoder E_phi gives F_V (``vidalign models list``)."""
    student_weights: str = ""
    """Store URI (or dir) where `vidalign models pull` staged the student; empty: the registry's source."""
    pooling: str = "frame"
    """F_V tokens: ``frame`` (one per frame) or ``grid:G`` (G x G per frame); stage 2 must use the same."""
    device: str = "cpu"
    batch_size: int = 8
    """Clips per encoder forward."""
    data: DataConfig = field(default_factory=DataConfig)
    output: FeaturesOutputConfig = field(default_factory=FeaturesOutputConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _source(config: FeaturesConfig) -> dict[str, Any]:
    """What determines the features: a shard made from another source is recomputed."""
    return {
        "student": config.student,
        "student_weights": config.student_weights,
        "pooling": config.pooling,
        "data": to_dict(config.data),
        "shard_size": config.output.shard_size,
    }


# --- extraction -----------------------------------------------------------------


def extract_features(config: FeaturesConfig, *, dataset: ClipDataset | None = None) -> str:
    """Write F_V of every clip to ``config.output.dir``; returns the feature set's URI.

    Shards already committed from the same source are kept, so a rerun after a
    crash (or of a finished job) only does the missing work.
    """
    store = open_store(config.output.dir)
    dataset = dataset if dataset is not None else open_dataset(config.data)
    ids = list(dataset.ids)
    if len(set(ids)) != len(ids):
        raise InvalidInput("dataset: clip ids must be unique, features are keyed by them")
    source = _source(config)
    digest = config_digest(config)
    size = config.output.shard_size
    shards = [list(range(s, min(s + size, len(ids)))) for s in range(0, len(ids), size)]

    todo = []
    for k in range(len(shards)):
        manifest = read_manifest(store, shard_name(k))
        if manifest is not None and manifest.meta.get("source") == source:
            continue
        if manifest is not None:
            log.warning("features_shard_stale", shard=shard_name(k), uri=store.uri)
        todo.append(k)
    log.info(
        "features_start",
        student=config.student,
        clips=len(ids),
        shards=len(shards),
        todo=len(todo),
        output=store.uri,
    )

    encoder = None
    d_v = tokens = None
    with logging_redirect_tqdm(), tqdm(
        total=len(ids),
        initial=len(ids) - sum(len(shards[k]) for k in todo),
        desc="features",
        unit="clip",
        dynamic_ncols=True,
        disable=None,
    ) as bar:
        for k in todo:
            if encoder is None:
                weights = weights_component(config.student_weights, "model") if config.student_weights else None
                encoder = load_student(
                    config.student, device=config.device, pooling=config.pooling, path=weights
                )
                encoder.eval().requires_grad_(False)
            tic = time.perf_counter()
            out: dict[str, torch.Tensor] = {}
            indices = shards[k]
            for start in range(0, len(indices), config.batch_size):
                batch = dataset.clips(indices[start : start + config.batch_size])
                with torch.inference_mode():
                    features = encoder(encoder.preprocess(batch.video.to(config.device)))
                for clip_id, f_v in zip(batch.ids, features, strict=True):
                    out[clip_id] = f_v.float().cpu().contiguous()
                bar.update(len(batch.ids))
            first = next(iter(out.values()))
            tokens, d_v = first.shape
            commit_artifact(
                store,
                shard_name(k),
                {FEATURES_FILE: safetensors_save(out)},
                producer=PRODUCER,
                config_digest=digest,
                meta={"clip_ids": list(out), "source": source, "d_v": d_v, "tokens": tokens},
            )
            log.info(
                "features_shard",
                shard=shard_name(k),
                clips=len(out),
                shard_s=round(time.perf_counter() - tic, 3),
            )
    if d_v is None:  # nothing computed in this call: read the shape from a committed shard
        manifest = read_manifest(store, shard_name(0))
        assert manifest is not None
        d_v, tokens = manifest.meta["d_v"], manifest.meta["tokens"]
    index = {
        "clip_ids": ids,
        "shards": [shard_name(k) for k in range(len(shards))],
        "d_v": d_v,
        "tokens": tokens,
        "source": source,
    }
    commit_artifact(
        store,
        INDEX,
        {INDEX_FILE: json.dumps(index, indent=2).encode()},
        producer=PRODUCER,
        config_digest=digest,
        meta={"student": config.student, "clips": len(ids), "d_v": d_v, "tokens": tokens},
    )
    log.info("features_done", clips=len(ids), d_v=d_v, tokens=tokens, features=store.uri)
    return store.uri


# --- reading --------------------------------------------------------------------


@dataclass
class FeatureSet:
    """A committed feature set, in memory: clip id -> F_V (T, d_v) float32."""

    uri: str
    features: dict[str, torch.Tensor]
    d_v: int
    tokens: int
    source: dict[str, Any]

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        """F_V of ``ids``, stacked ``(B, T, d_v)``."""
        missing = [i for i in ids if i not in self.features]
        if missing:
            raise NotFound(
                f"features {self.uri}: no F_V for clips {missing[:3]} "
                f"({len(missing)} missing); extract features for this dataset first"
            )
        return torch.stack([self.features[i] for i in ids])


def load_features(uri: str) -> FeatureSet:
    """Read a complete feature set (every shard verified against its manifest)."""
    store = open_store(uri)
    if read_manifest(store, INDEX) is None:
        raise NotFound(
            f"features {store.uri}: no committed index; run `vidalign features extract` "
            "(an interrupted extraction resumes where it stopped)"
        )
    index = json.loads(read_artifact_file(store, INDEX, INDEX_FILE))
    features: dict[str, torch.Tensor] = {}
    for name in index["shards"]:
        features.update(safetensors_load(read_artifact_file(store, name, FEATURES_FILE)))
    missing = set(index["clip_ids"]) - set(features)
    if missing:
        raise InvalidInput(f"features {store.uri}: shards lack {len(missing)} clips of the index")
    return FeatureSet(
        uri=store.uri,
        features=features,
        d_v=int(index["d_v"]),
        tokens=int(index["tokens"]),
        source=index["source"],
    )


# --- command line (also `python -m vidalign_trainer.features`) ------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/features-tiny.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )


def run_from_args(args: argparse.Namespace) -> None:
    extract_features(load_config(FeaturesConfig, args.config, args.set))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vidalign features extract", description="Frozen encoder features F_V -> store."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        run_from_args(args)
    except (VidalignError, ConfigError) as err:
        print(f"vidalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
