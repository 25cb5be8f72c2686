"""Shard sets: clips packed as encoded bytes into WebDataset tar shards on a store.

``vidalign data shard`` writes, under its ``--out`` (a directory or store URI)::

    shard-000000.tar     WebDataset layout: <key>.<ext> (the video file's bytes,
    shard-000000.json    untouched) and <key>.json (its record); the shard's records
    ...                  with each video's byte range and sha256 (written after the tar)
    index/               artifact: index.jsonl (every record with its byte range),
                         MANIFEST.json (sha256 of each file, sources, counts)

Why WebDataset tars (docs/design.md, "Data"): the format is plain POSIX tar
that ``tar``, ``webdataset.WebDataset`` and any object store handle, so a
shard set is usable outside vidalign; and because each member is stored
contiguously, a clip is one ranged GET (``Store.read_range``) at the offset the
index records. Trainers therefore read shards *map-style*: their step plan picks
clips, workers fetch and decode them, and a resumed run at step k reads exactly
what an uninterrupted one did, at any number of ranks or workers, with no
stream position to save. Each read is checked against the member's sha256.

Writing is resumable: a shard whose ``.json`` is present and lists the same
clips is kept, so a data Job killed halfway continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from vidalign.data.videoset import Blob, Records, Skip, VideoRecord, read_records
from vidalign.errors import InvalidInput, NotFound, VidalignError
from vidalign.log import get_logger
from vidalign.store import commit_artifact, open_store, read_artifact_file, read_manifest

log = get_logger(__name__)

INDEX = "index"
INDEX_FILE = "index.jsonl"
FORMAT = 1


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def _video_bytes(record: VideoRecord) -> bytes:
    if "://" in record.video:
        from vidalign.store import split_uri

        store, key = split_uri(record.video)
        return store.get_bytes(key)
    path = Path(record.video)
    if not path.is_file():
        raise NotFound(f"{record.video} does not exist")
    return path.read_bytes()


def _extension(record: VideoRecord) -> str:
    suffix = Path(record.video.rsplit("/", 1)[-1]).suffix.lstrip(".").lower()
    return suffix if suffix.isalnum() else "mp4"


def _write_tar(path: Path, records: Sequence[VideoRecord], first: int) -> tuple[list[dict], list[Skip]]:
    """One shard; returns its records (with byte ranges) and the clips it could not read."""
    import webdataset as wds

    packed, skipped, keys = [], [], []
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0.0, user="vidalign", group="vidalign")
        for j, record in enumerate(records):
            try:
                data = _video_bytes(record)
            except (OSError, VidalignError) as err:
                skipped.append(Skip(record.id, record.video, record.origin, f"unreadable: {err}"))
                continue
            key = f"clip{first + j:09d}"
            ext = _extension(record)
            writer.write({"__key__": key, ext: data,
                          "json": json.dumps(record.to_json()).encode()})
            keys.append((key, ext, record, hashlib.sha256(data).hexdigest()))
        writer.close()
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for key, ext, record, digest in keys:
        member = members[f"{key}.{ext}"]
        blob = {"offset": member.offset_data, "length": member.size, "sha256": digest}
        packed.append({**record.to_json(), "origin": record.origin, "blob": blob})
    return packed, skipped


def merge_records(records: Sequence[VideoRecord]) -> list[VideoRecord]:
    """One record per clip id: the same clip named by several sources (MotionBench questions and
    MotionVid-QA answers about one video) keeps every question and the first caption."""
    merged: dict[str, VideoRecord] = {}
    for record in records:
        prev = merged.get(record.id)
        if prev is None:
            merged[record.id] = record
            continue
        if (prev.video, prev.segment) != (record.video, record.segment):
            raise InvalidInput(
                f"{record.origin}: clip id {record.id!r} already names {prev.video} at {prev.origin}"
            )
        merged[record.id] = replace(
            prev, caption=prev.caption or record.caption,
            static_caption=prev.static_caption or record.static_caption, qa=prev.qa + record.qa,
        )
    return list(merged.values())


def write_shards(
    sources: Sequence[tuple[str, str]], out: str, *, clips_per_shard: int = 256,
    video_dir: str = "", progress: bool = True,
) -> dict:
    """Pack the records of ``sources`` ((kind, location) pairs) into a shard set at ``out``.

    Returns the index's meta (clips, shards, skipped). Records of one clip id from
    several sources are merged (:func:`merge_records`).
    """
    if clips_per_shard < 1:
        raise InvalidInput(f"--clips-per-shard: expected >= 1, got {clips_per_shard}")
    if not sources:
        raise InvalidInput("data shard: give at least one --source KIND:LOCATION")
    records: list[VideoRecord] = []
    skipped: list[Skip] = []
    for kind, location in sources:
        loaded = read_records(kind, location, video_dir=video_dir)
        records += loaded.records
        skipped += loaded.skipped
    records = merge_records(records)

    store = open_store(out)
    index: list[dict] = []
    groups = [records[i:i + clips_per_shard] for i in range(0, len(records), clips_per_shard)]
    with tempfile.TemporaryDirectory(prefix="vidalign-shard-") as tmp, \
            tqdm(total=len(records), desc="shards", unit="clip", disable=not progress) as bar:
        for k, group in enumerate(groups):
            name = shard_name(k)
            sidecar = name.replace(".tar", ".json")
            done = _finished(store, name, sidecar, group)
            if done is None:
                local = Path(tmp) / name
                packed, bad = _write_tar(local, group, k * clips_per_shard)
                store.put_file(name, local)
                done = {"shard": name, "size": local.stat().st_size,
                        "records": packed, "skipped": [s.__dict__ for s in bad],
                        "ids": [r.id for r in group]}
                store.put_bytes(sidecar, json.dumps(done).encode())
                local.unlink()
                log.info("shard_written", shard=f"{store.uri}/{name}", clips=len(packed),
                         skipped=len(bad), bytes=done["size"])
            for entry in done["records"]:
                index.append({**entry, "blob": {**entry["blob"], "shard": name}})
            skipped += [Skip(**s) for s in done["skipped"]]
            bar.update(len(group))
    meta = {"format": FORMAT, "clips": len(index), "shards": len(groups),
            "sources": [f"{k}:{loc}" for k, loc in sources], "clips_per_shard": clips_per_shard,
            "skipped": [s.__dict__ for s in skipped]}
    commit_artifact(
        store, INDEX,
        {INDEX_FILE: "".join(json.dumps(e) + "\n" for e in index).encode()},
        producer="vidalign data shard", meta=meta,
    )
    return meta


def _finished(store, name: str, sidecar: str, group: Sequence[VideoRecord]) -> dict | None:
    """The sidecar of a shard already written for exactly these clips, else None."""
    if not (store.exists(sidecar) and store.exists(name)):
        return None
    try:
        done = json.loads(store.get_bytes(sidecar))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if done.get("ids") != [r.id for r in group] or store.size(name) != done.get("size"):
        return None
    return done


def open_shards(location: str) -> Records:
    """The records of a shard set, each with the byte range of its video."""
    store = open_store(location)
    if read_manifest(store, INDEX) is None:
        raise NotFound(
            f"data.path: {location} holds no shard set (no {INDEX}/MANIFEST.json); "
            "write one with `vidalign data shard`"
        )
    name = f"{location.rstrip('/')}/{INDEX}/{INDEX_FILE}"
    text = read_artifact_file(store, INDEX, INDEX_FILE).decode()
    records, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        origin = f"{name}:{number}"
        try:
            raw = json.loads(line)
            blob = Blob(**raw.pop("blob"))
            record = VideoRecord.from_json(raw, raw.get("origin") or origin)
        except (json.JSONDecodeError, TypeError, KeyError, InvalidInput) as err:
            skipped.append(Skip("", name, origin, f"malformed index entry ({err})"))
            continue
        records.append(VideoRecord(**{**record.__dict__, "blob": blob}))
    return Records(records, skipped, name, store=location)


def read_member(location: str, record: VideoRecord) -> bytes:
    """A shard member's bytes (for tools and tests; trainers read through ``VideoItems``)."""
    if record.blob is None:
        raise InvalidInput(f"{record.id}: not a shard-set record")
    data = open_store(location).read_range(record.blob.shard, record.blob.offset, record.blob.length)
    if hashlib.sha256(data).hexdigest() != record.blob.sha256:
        raise InvalidInput(f"{record.id}: {record.blob.shard} member damaged (sha256 differs)")
    return data


__all__ = ["INDEX", "open_shards", "read_member", "shard_name", "write_shards"]
