"""vidalign.shards: the plan covers every item once on any number of ranks; a killed
run resumes from its committed shards to the same store an uninterrupted run leaves."""

from __future__ import annotations

import hashlib
import json

import pytest

from vidalign.errors import InvalidInput, NotFound
from vidalign.shards import (
    INDEX,
    INDEX_FILE,
    ShardOutput,
    plan_shards,
    rank_shards,
    read_index,
    run_sharded,
    shard_name,
)
from vidalign.store import list_artifacts, open_store, read_artifact_file, read_manifest

IDS = [f"clip-{i:02d}" for i in range(11)]
SOURCE = {"model": "m", "steps": 5, "pair": (1, 2)}


@pytest.mark.parametrize("num_items", [0, 1, 7, 11, 64])
@pytest.mark.parametrize("shard_size", [1, 3, 8, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_item_in_exactly_one_shard_of_one_rank(num_items, shard_size, world_size):
    shards = plan_shards(num_items, shard_size)
    assert [s.name for s in shards] == [shard_name(k) for k in range(len(shards))]
    assert all(1 <= len(s) <= shard_size for s in shards)
    per_rank = [rank_shards(shards, r, world_size) for r in range(world_size)]
    items = sorted(i for mine in per_rank for s in mine for i in s.items)
    assert items == list(range(num_items))  # each item once, none lost
    counts = [sum(len(s) for s in mine) for mine in per_rank]
    if len(shards) >= world_size:  # round robin: no rank gets two shards more than another
        assert max(len(m) for m in per_rank) - min(len(m) for m in per_rank) <= 1
    assert sum(counts) == num_items


def test_plan_refuses_bad_arguments():
    with pytest.raises(InvalidInput, match="shard_size"):
        plan_shards(4, 0)
    with pytest.raises(InvalidInput, match="rank 2 of world_size 2"):
        rank_shards(plan_shards(4, 1), 2, 2)


class Job:
    """A shard function that records the clips it computed and can die on one call."""

    def __init__(self, fail_on_shard: int | None = None) -> None:
        self.fail_on_shard, self.computed = fail_on_shard, []

    def __call__(self, shard, advance):
        if shard.index == self.fail_on_shard:
            raise RuntimeError("killed")
        files = {}
        for i in shard.items:
            files[f"{IDS[i]}.bin"] = hashlib.sha256(IDS[i].encode()).digest()
            self.computed.append(IDS[i])
            advance(1)
        return ShardOutput(files, {"first": IDS[shard.start]})


def index(shards, manifests):
    firsts = [m.meta["first"] for m in manifests]
    return {"ids": IDS, "firsts": firsts}, {"firsts": len(firsts)}


def run(uri, job, **kwargs):
    options = dict(source=SOURCE, producer="test", index=index)
    options.update(kwargs)
    return run_sharded(open_store(uri), IDS, 3, job, **options)


def contents(uri) -> dict[str, bytes]:
    """Every committed file of the store (manifests excluded: they hold creation times)."""
    store = open_store(uri)
    return {
        f"{name}/{rel}": read_artifact_file(store, name, rel)
        for name in list_artifacts(store)
        for rel in read_manifest(store, name).files
    }


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    clean = str(tmp_path / "clean")
    full = run(clean, Job())
    assert full.complete and full.ran == [0, 1, 2, 3] and full.skipped == []

    uri = str(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        run(uri, Job(fail_on_shard=2))
    store = open_store(uri)
    assert list_artifacts(store) == ["shard-00000", "shard-00001"]  # whole shards, no index
    with pytest.raises(NotFound, match="no committed index"):
        read_index(store, "things", "make things")
    created = read_manifest(store, "shard-00001").created

    resumed = Job()
    result = run(uri, resumed)
    assert result.complete and result.skipped == [0, 1] and result.ran == [2, 3]
    assert resumed.computed == IDS[6:]  # only the clips of the shards that were lost
    assert read_manifest(store, "shard-00001").created == created
    assert contents(uri) == contents(clean)
    body = json.loads(read_artifact_file(store, INDEX, INDEX_FILE))
    assert body["shards"] == [shard_name(k) for k in range(4)]
    assert body["firsts"] == ["clip-00", "clip-03", "clip-06", "clip-09"]
    assert body["source"] == {"model": "m", "steps": 5, "pair": [1, 2]}
    assert read_manifest(store, shard_name(3)).meta["clip_ids"] == IDS[9:]
    assert read_manifest(store, INDEX).meta == {"clips": 11, "firsts": 4}

    index_created = read_manifest(store, INDEX).created
    again = Job()
    assert run(uri, again).ran == [] and again.computed == []  # finished: nothing to do
    assert read_manifest(store, INDEX).created == index_created


def test_other_source_or_clips_redo_the_shard(tmp_path):
    uri = str(tmp_path / "s")
    run(uri, Job())
    other = Job()
    assert run(uri, other, source={**SOURCE, "steps": 4}).ran == [0, 1, 2, 3]
    assert other.computed == IDS

    store = open_store(uri)
    manifest = read_manifest(store, shard_name(1))
    from vidalign.store import commit_artifact

    commit_artifact(store, shard_name(1), {"x": b"x"}, producer="test",
                    meta={**manifest.meta, "clip_ids": ["someone-else"]})
    redo = Job()
    assert run(uri, redo, source={**SOURCE, "steps": 4}).ran == [1]
    assert redo.computed == IDS[3:6]
    everything = Job()
    assert run(uri, everything, source={**SOURCE, "steps": 4}, resume=False).ran == [0, 1, 2, 3]


def test_ranks_split_the_work_and_the_last_commits_the_index(tmp_path):
    clean = str(tmp_path / "clean")
    run(clean, Job())

    uri = str(tmp_path / "ranks")
    jobs = [Job(), Job(), Job()]
    first = run(uri, jobs[0], rank=0, world_size=3)
    assert first.ran == [0, 3] and not first.complete
    assert read_manifest(open_store(uri), INDEX) is None
    assert run(uri, jobs[2], rank=2, world_size=3).ran == [2] and read_manifest(open_store(uri), INDEX) is None
    last = run(uri, jobs[1], rank=1, world_size=3)
    assert last.ran == [1] and last.complete
    assert sorted(c for j in jobs for c in j.computed) == IDS
    assert contents(uri) == contents(clean)


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(InvalidInput, match="unique"):
        run_sharded(open_store(str(tmp_path)), ["a", "a"], 1, Job(), source={}, producer="t", index=index)
