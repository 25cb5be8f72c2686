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
set without it is incomplete, and ``load_features`` refuses it. Planning,
resumption and commits are ``vidalign.shards``'s; ``output.rank`` and
``output.world_size`` split the shards among processes.

Data: any ``data`` section (``vidalign_trainer.common``): toy or SynthMotion
clips in memory, or records, shards and QA sets decoded by worker processes. A
clip that cannot be read gets no F_V (the index lists only the clips that
have one) and a line in ``<output.dir>/skipped.jsonl``; stage 1 then trains on
the clips with features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from vidalign.config import config_digest, to_dict
from vidalign.errors import InvalidInput, NotFound
from vidalign.hub import weights_component
from vidalign.log import get_logger
from vidalign.shards import Shard, ShardingConfig, ShardOutput, read_index, run_sharded
from vidalign.store import Manifest, open_store, read_artifact_file
from vidalign.students import load_student
from vidalign_trainer.common import ClipData, DataConfig, Dist, open_dataset

log = get_logger("vidalign.features")

FEATURES_FILE = "features.safetensors"
PRODUCER = "vidalign features extract"

# --- config ---------------------------------------------------------------------


@dataclass(kw_only=True)
class FeaturesOutputConfig(ShardingConfig):
    dir: str = "runs/features"
    """Store URI (local dir or s3://bucket/prefix) of the feature set."""
    shard_size: int = 256  # documented (and rank, world_size declared) by ShardingConfig

    _invalid = (
        ValueError,
        "output.shard_size must be >= 1, got {shard_size}",
        "output.rank must be in [0, world_size={world_size}), got {rank}",
    )


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


def extract_features(config: FeaturesConfig, *, dataset: ClipData | None = None) -> str:
    """Write F_V of every clip to ``config.output.dir``; returns the feature set's URI.

    Shards already committed from the same source are kept, so a rerun after a
    crash (or of a finished job) only does the missing work. A clip that cannot
    be read gets no F_V and a line in ``<output.dir>/skipped.jsonl``.
    """
    store = open_store(config.output.dir)
    dataset = dataset if dataset is not None else open_dataset(config.data)
    ids = list(dataset.ids)
    if not ids:
        raise InvalidInput("dataset: no clips to extract features from")
    ranks = Dist(rank=config.output.rank, world_size=config.output.world_size)
    skips = dataset.skip_log(store, ranks)
    encoder = None

    def run_shard(shard: Shard, advance: Callable[[int], None]) -> ShardOutput:
        nonlocal encoder
        if encoder is None:  # loaded on the first shard to compute: a finished set needs none
            weights = weights_component(config.student_weights, "model") if config.student_weights else None
            encoder = load_student(config.student, device=config.device, pooling=config.pooling, path=weights)
            encoder.eval().requires_grad_(False)
        out: dict[str, torch.Tensor] = {}
        plan = [list(range(lo, min(lo + config.batch_size, shard.stop)))
                for lo in range(shard.start, shard.stop, config.batch_size)]
        feed = dataset.feed(range(len(ids)), {"student": config.data.view}, plan, skips=skips,
                            substitute=False)
        try:
            for batch, fed in zip(plan, feed, strict=True):
                if fed.ids:
                    with torch.inference_mode():
                        features = encoder(encoder.preprocess(fed.views["student"].to(config.device)))
                    for clip_id, f_v in zip(fed.ids, features, strict=True):
                        out[clip_id] = f_v.float().cpu().contiguous()
                advance(len(batch))
        finally:
            feed.close()
        skipped = [ids[i] for i in range(shard.start, shard.stop) if ids[i] not in out]
        shape = dict(zip(("tokens", "d_v"), next(iter(out.values())).shape, strict=True)) if out else {}
        return ShardOutput({FEATURES_FILE: safetensors_save(out)}, {**shape, "skipped": skipped})

    def index(shards: list[Shard], manifests: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any]]:
        shaped = [m for m in manifests if "d_v" in m.meta]
        if not shaped:
            raise InvalidInput(f"features: no clip of {config.data.path or config.data.kind} could be read; "
                               f"see {store.uri}/skipped.jsonl")
        d_v, tokens = shaped[0].meta["d_v"], shaped[0].meta["tokens"]
        skipped = {i for m in manifests for i in m.meta.get("skipped", [])}
        return (
            {"clip_ids": [i for i in ids if i not in skipped], "d_v": d_v, "tokens": tokens},
            {"student": config.student, "d_v": d_v, "tokens": tokens, "skipped": len(skipped)},
        )

    run = run_sharded(
        store, ids, config.output.shard_size, run_shard, source=_source(config),
        producer=PRODUCER, config_digest=config_digest(config), index=index,
        rank=config.output.rank, world_size=config.output.world_size, name="features",
    )
    return run.uri


# --- reading --------------------------------------------------------------------


@dataclass
class FeatureSet:
    """A committed feature set, in memory: clip id -> F_V (T, d_v) float32."""

    uri: str
    features: dict[str, torch.Tensor]
    d_v: int
    tokens: int
    source: dict[str, Any]

    def ids(self) -> set[str]:
        return set(self.features)

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
    index = read_index(store, "features", PRODUCER)
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
