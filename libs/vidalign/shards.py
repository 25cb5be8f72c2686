"""Sharded, resumable jobs over a store: plan, run, commit, index.

A sharded job (``vidalign features extract``, ``vidalign priors extract``)
maps every clip of a dataset to some files, in shards, and leaves this layout
at a store URI::

    shard-00000/...             the shard's files (whatever ``run_shard`` made)
    shard-00000/MANIFEST.json   meta: clip_ids, source, plus the job's own meta
    shard-00001/...
    index/index.json            shards, source, plus the job's own index fields

Each shard is an artifact (``commit_artifact``: files first, manifest last),
so a killed job leaves whole shards only. A shard is *done* when its manifest
records the same ``source`` (what determines the result: model, parameters,
data) and the same clip ids as the plan; a rerun skips done shards and redoes
the rest (``resume=False`` redoes every shard). The index is committed last,
and only once every shard is done, so a reader that requires it never sees a
partial set.

Ranks: with ``world_size`` R, rank r runs the shards ``k`` with ``k % R == r``
(the plan is the same on every rank, so together they cover every clip once).
Whichever rank finds every shard done after its own work commits the index;
ranks that finish earlier return ``complete=False``. Rerunning any rank once
the others are done completes the index.

    run = run_sharded(store, ids, 64, run_shard, source=..., producer="my job",
                      index=lambda shards, manifests: ({"extra": 1}, {"meta": 2}))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vidalign.errors import InvalidInput, NotFound
from vidalign.log import get_logger
from vidalign.store import Manifest, Store, commit_artifact, read_manifest
from vidalign.store.artifacts import ArtifactCorrupted, read_artifact_file

log = get_logger("vidalign.shards")

INDEX = "index"
INDEX_FILE = "index.json"
IDS_KEY = "clip_ids"
"""Shard manifest meta key listing the shard's clip ids (in plan order)."""


@dataclass(kw_only=True)
class ShardingConfig:
    """How a sharded job splits its clips: the base of its config (or of its output section)."""

    shard_size: int = 64
    """Clips per shard: the unit of commit and of resumption."""
    rank: int = 0
    """This process's share of the shards: every ``world_size``-th shard from ``rank``."""
    world_size: int = 1
    """Processes splitting the shards; whichever finishes last commits the index."""

    _invalid: ClassVar[tuple[type[ValueError], str, str]] = (
        InvalidInput,
        "shard_size: expected >= 1, got {shard_size}",
        "rank: expected 0 <= rank < world_size={world_size}, got {rank}",
    )
    # The error class and the messages for a bad shard_size and a bad rank (formatted with
    # the fields). A section of a config file overrides them to name its dotted keys the
    # way config validation does (docs/conventions.md, Config).

    def __post_init__(self) -> None:
        error, bad_shard_size, bad_rank = self._invalid
        fields = {"shard_size": self.shard_size, "rank": self.rank, "world_size": self.world_size}
        if self.shard_size < 1:
            raise error(bad_shard_size.format(**fields))
        if not 0 <= self.rank < self.world_size:
            raise error(bad_rank.format(**fields))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: the items at positions ``start <= i < stop`` of the job's id list."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def items(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(num_items: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` items (the last may be shorter) over ``num_items``."""
    if shard_size < 1:
        raise InvalidInput(f"shard_size: expected >= 1, got {shard_size}")
    if num_items < 0:
        raise InvalidInput(f"num_items: expected >= 0, got {num_items}")
    return [
        Shard(index=k, start=start, stop=min(start + shard_size, num_items))
        for k, start in enumerate(range(0, num_items, shard_size))
    ]


def rank_shards(shards: Sequence[Shard], rank: int = 0, world_size: int = 1) -> list[Shard]:
    """The shards rank ``rank`` of ``world_size`` runs: every ``world_size``-th, from ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidInput(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
    return [s for s in shards if s.index % world_size == rank]


@dataclass
class ShardOutput:
    """What ``run_shard`` returns: the shard's files and extra manifest meta."""

    files: Mapping[str, bytes | str | Path]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ShardedRun:
    """The outcome of ``run_sharded`` on this rank."""

    uri: str
    shards: list[Shard]
    """Every shard of the plan (all ranks)."""
    ran: list[int]
    """Indices of the shards this call computed and committed."""
    skipped: list[int]
    """Indices of this rank's shards found done and kept."""
    complete: bool
    """Every shard done and the index committed (False: other ranks still have work)."""


def _canonical(source: Mapping[str, Any]) -> dict[str, Any]:
    # As it reads back from a manifest: tuples become lists, odd values strings.
    return json.loads(json.dumps(dict(source), default=str))


def _done(manifest: Manifest | None, source: dict[str, Any], ids: list[str]) -> bool:
    return manifest is not None and manifest.meta.get("source") == source and manifest.meta.get(IDS_KEY) == ids


def run_sharded(
    store: Store,
    ids: Sequence[str],
    shard_size: int,
    run_shard: Callable[[Shard, Callable[[int], None]], ShardOutput],
    *,
    source: Mapping[str, Any],
    producer: str,
    index: Callable[[list[Shard], list[Manifest]], tuple[Mapping[str, Any], Mapping[str, Any]]],
    config_digest: str = "",
    rank: int = 0,
    world_size: int = 1,
    resume: bool = True,
    name: str = "shards",
    unit: str = "clip",
) -> ShardedRun:
    """Run and commit this rank's shards of ``ids``, then the index once all are done.

    ``run_shard(shard, advance)`` computes one shard (its clips are
    ``ids[shard.start:shard.stop]``) and may call ``advance(n)`` after each n
    clips for the progress bar; it returns the files to commit and extra
    manifest meta. ``index(shards, manifests)`` (every shard and its committed
    manifest, in order) returns ``(fields, meta)``: fields joined to
    ``shards`` and ``source`` in ``index.json``, and the index manifest's meta.
    ``name`` prefixes the log events (``<name>_start``, ``<name>_shard``, ...)
    and labels the progress bar.
    """
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise InvalidInput(f"{name}: clip ids must be unique, shards are keyed by them")
    source = _canonical(source)
    shards = plan_shards(len(ids), shard_size)
    mine = rank_shards(shards, rank, world_size)

    todo, skipped = [], []
    for shard in mine:
        manifest = read_manifest(store, shard.name) if resume else None
        if _done(manifest, source, ids[shard.start : shard.stop]):
            skipped.append(shard)
            continue
        if manifest is not None:
            log.warning(f"{name}_shard_stale", shard=shard.name, uri=store.uri)
        todo.append(shard)
    log.info(
        f"{name}_start", clips=len(ids), shards=len(shards), rank=rank, world_size=world_size,
        todo=len(todo), output=store.uri,
    )

    total = sum(len(s) for s in mine)
    with logging_redirect_tqdm(), tqdm(
        total=total,
        initial=total - sum(len(s) for s in todo),
        desc=name if world_size == 1 else f"{name} [rank {rank}/{world_size}]",
        unit=unit,
        dynamic_ncols=True,
        disable=None,
    ) as bar:
        for shard in todo:
            tic = time.perf_counter()
            advanced = 0

            def advance(n: int = 1) -> None:
                nonlocal advanced
                advanced += n
                bar.update(n)

            output = run_shard(shard, advance)
            if advanced < len(shard):
                bar.update(len(shard) - advanced)
            commit_artifact(
                store,
                shard.name,
                output.files,
                producer=producer,
                config_digest=config_digest,
                meta={**output.meta, IDS_KEY: ids[shard.start : shard.stop], "source": source},
            )
            log.info(f"{name}_shard", shard=shard.name, clips=len(shard),
                     shard_s=round(time.perf_counter() - tic, 3))

    ran = [s.index for s in todo]
    manifests = [read_manifest(store, s.name) for s in shards]
    if not all(_done(m, source, ids[s.start : s.stop]) for s, m in zip(shards, manifests, strict=True)):
        waiting = [s.name for s, m in zip(shards, manifests, strict=True)
                   if not _done(m, source, ids[s.start : s.stop])]
        log.info(f"{name}_waiting", rank=rank, shards_left=len(waiting), first=waiting[0])
        return ShardedRun(uri=store.uri, shards=shards, ran=ran, skipped=[s.index for s in skipped],
                          complete=False)

    fields, meta = index(shards, manifests)  # type: ignore[arg-type]
    body = json.dumps(
        {**fields, "shards": [s.name for s in shards], "source": source}, indent=2, default=str
    ).encode()
    if not _index_is(store, body):
        commit_artifact(store, INDEX, {INDEX_FILE: body}, producer=producer,
                        config_digest=config_digest, meta={"clips": len(ids), **meta})
    log.info(f"{name}_done", clips=len(ids), shards=len(shards), output=store.uri)
    return ShardedRun(uri=store.uri, shards=shards, ran=ran, skipped=[s.index for s in skipped],
                      complete=True)


def _index_is(store: Store, body: bytes) -> bool:
    """Whether the committed index already holds exactly ``body`` (a finished set's rerun)."""
    if read_manifest(store, INDEX) is None:
        return False
    try:
        return read_artifact_file(store, INDEX, INDEX_FILE) == body
    except (ArtifactCorrupted, InvalidInput):
        return False


def read_index(store: Store, what: str, command: str) -> dict[str, Any]:
    """The committed ``index.json`` of a sharded set; NotFound (naming ``command``) without one."""
    if read_manifest(store, INDEX) is None:
        raise NotFound(
            f"{what} {store.uri}: no committed index; run `{command}` "
            "(an interrupted extraction resumes where it stopped)"
        )
    return json.loads(read_artifact_file(store, INDEX, INDEX_FILE))


__all__ = [
    "IDS_KEY",
    "INDEX",
    "INDEX_FILE",
    "Shard",
    "ShardOutput",
    "ShardedRun",
    "plan_shards",
    "rank_shards",
    "read_index",
    "run_sharded",
    "shard_name",
]
