"""The video data layer: records, decoding at views, bad data skipped, shard sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidalign.data.frames import decode_frames
from vidalign.data.shardset import open_shards, read_member, write_shards
from vidalign.data.videoset import (
    BadVideo,
    SkipLog,
    VideoItems,
    View,
    decode_views,
    fit_view,
    load_batches,
    read_records,
)
from vidalign.errors import InvalidInput
from vidalign.store import open_store
from vidalign.video import sample_frames, uniform_indices

from ..support.videos import make_video_set

REASONS = {  # what each broken kind is reported as
    "truncated": ("not a readable video", "cut short", "flagged corrupt"),
    "empty": ("not a readable video", "empty"),
    "damaged": ("damaged",),
    "short": ("too short",),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_video_set(tmp_path_factory.mktemp("videos"))


def subset_file(videos, path, extra_lines=()):
    lines = [json.dumps({"uid": f.name, "video": str(f.path), "caption": f.caption,
                         "static_caption": f"A {f.color} {f.shape}."}) for f in videos.files]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


# --- decoding -------------------------------------------------------------------------


def test_every_valid_clip_decodes_once_at_each_view(videos):
    views = {"student": View(8, 32), "teacher": View(5, 24, 40)}
    for f in videos.valid:
        native = View(8, f.height, f.width)
        out = decode_views(f.path, {**views, "native": native})
        assert out["student"].shape == (8, 32, 32, 3) and out["student"].dtype == torch.uint8
        assert out["teacher"].shape == (5, 24, 40, 3)
        # The frames decode_frames picks, exactly (no scaling at the native size) ...
        frames = torch.from_numpy(decode_frames(f.path, num_frames=8))
        assert torch.equal(out["native"], frames)
        # ... and at other sizes scaled by swscale (area / bilinear) instead of torch's
        # antialiased bilinear: the two resamplers differ by a few levels on these noisy
        # clips (measured mean 1.0-5.7 of 255); another frame or a shifted crop differs by
        # far more on a moving shape.
        reference = fit_view(frames, views["student"]).float()
        assert (out["student"].float() - reference).abs().mean() <= 8


@pytest.mark.parametrize("as_bytes", [False, True])
def test_each_broken_file_is_a_bad_video_with_its_reason(videos, as_bytes):
    for f in videos.broken:
        source = f.path.read_bytes() if as_bytes else f.path
        with pytest.raises(BadVideo) as err:
            decode_views(source, {"student": View(8, 32)}, name=f.name)
        assert any(word in str(err.value) for word in REASONS[f.broken]), (f.name, str(err.value))


def test_fit_view_covers_then_crops_the_centre():
    frames = torch.zeros(2, 90, 160, 3, dtype=torch.uint8)
    frames[:, :, 35:125] = 200  # a centre band as wide as the frames are high
    out = fit_view(frames, View(2, 45))
    assert out.shape == (2, 45, 45, 3)
    # The dark sides were cropped: the band fills the square (the outermost columns blend
    # with the sides through the antialiasing filter).
    assert (out[:, :, 1:-1] == 200).all() and (out[:, :, [0, -1]] >= 100).all()
    same = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(fit_view(same, View(3, 16)), same)


def test_square_views_resize_exactly_like_sample_frames():
    video = torch.randint(0, 255, (1, 16, 32, 32, 3), dtype=torch.uint8)
    picked = video[0, uniform_indices(16, 8)]
    assert torch.equal(fit_view(picked, View(8, 20)), sample_frames(video, 8, 20)[0])


# --- records --------------------------------------------------------------------------


def test_malformed_records_are_skipped_with_their_line(videos, tmp_path):
    path = subset_file(videos, tmp_path / "subset.jsonl", [
        "{not json", json.dumps({"uid": "x"}), json.dumps({"uid": "y", "video": "y.mp4", "qa": [{}]})
    ])
    loaded = read_records("records", str(path))
    assert [r.id for r in loaded.records] == [f.name for f in videos.files]
    n = len(videos.files)
    assert [s.line for s in loaded.skipped] == [f"{path}:{n + k}" for k in (1, 2, 3)]
    assert "not valid JSON" in loaded.skipped[0].reason
    assert "video" in loaded.skipped[1].reason and "qa[0]" in loaded.skipped[2].reason


def test_records_resolve_relative_videos_and_refuse_bad_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "a", "video": "clips/a.mp4"}) + "\n")
    assert read_records("records", str(tmp_path / "a.jsonl"), video_dir="s3://b/v").records[0].video \
        == "s3://b/v/clips/a.mp4"
    (tmp_path / "latin1.jsonl").write_bytes('{"id": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InvalidInput, match=r"latin1\.jsonl: not UTF-8"):
        read_records("records", str(tmp_path / "latin1.jsonl"))
    (tmp_path / "dup.jsonl").write_text(json.dumps({"id": "a", "video": "a"}) + "\n"
                                        + json.dumps({"id": "a", "video": "b"}) + "\n")
    with pytest.raises(InvalidInput, match="already used at"):
        read_records("records", str(tmp_path / "dup.jsonl"))


def test_qa_sets_become_records_with_their_questions(videos):
    bench = read_records("motionbench", str(videos.motionbench_meta))
    assert len(bench) == len(videos.files)
    qa = bench.records[0].qa[0]
    assert qa.answer in "ABCD" and qa.target.endswith(f"({qa.answer})") and "A." in qa.prompt
    preference = read_records("motionvid", str(videos.motionvid_json))
    assert all(r.qa and r.qa[0].target for r in preference.records)


# --- items, workers, skips --------------------------------------------------------------


def test_a_bad_item_gives_way_to_the_next_and_workers_do_not_change_batches(videos):
    records = read_records("records", str(subset_file(videos, videos.root / "s.jsonl"))).records
    views = {"student": View(6, 16)}
    dataset = VideoItems(records, list(range(len(records))), views)
    plan = [[0, 1], [2, 3], [len(records) - 1, 4]]
    serial = [b for b in load_batches(dataset, plan, workers=0)]
    parallel = [b for b in load_batches(dataset, plan, workers=2)]
    for a, b in zip(serial, parallel, strict=True):
        assert [x.index for x in a] == [x.index for x in b]
        assert all(torch.equal(x.views["student"], y.views["student"]) for x, y in zip(a, b, strict=True))
    broken = {f.name for f in videos.broken}
    for batch in serial:
        for item in batch:
            assert records[item.record].id not in broken
            assert {s.id for s in item.skips} <= broken
    strict = VideoItems(records, list(range(len(records))), views, substitute=False)
    first_bad = next(i for i, r in enumerate(records) if r.id in broken)
    assert strict[first_bad].views is None and strict[first_bad].skips[0].id == records[first_bad].id


def test_skip_log_writes_each_skip_once_and_stops_past_the_fraction(videos, tmp_path):
    records = read_records("records", str(subset_file(videos, tmp_path / "s.jsonl"))).records
    store = open_store(str(tmp_path / "run"))
    dataset = VideoItems(records, list(range(len(records))), {"student": View(6, 16)})
    log = SkipLog(store, max_fraction=0.7, total=len(records))
    for _ in range(2):  # a second epoch meets the same bad clips: they count once
        for i in range(len(records)):
            log.add([dataset[i]], records)
    assert log.bad == {f.name for f in videos.broken} and len(log.read) == len(records)
    lines = [json.loads(x) for x in store.get_bytes("skipped.jsonl").decode().splitlines()]
    assert {x["id"] for x in lines} == {f.name for f in videos.broken}
    assert all(x["file"] and x["line"] and x["reason"] for x in lines)
    again = SkipLog(store, max_fraction=0.7, total=len(records))  # a resumed run keeps them
    assert len(again.entries) == len(lines)
    strict = SkipLog(None, max_fraction=0.01, total=len(records))
    with pytest.raises(InvalidInput, match=r"max_skip_fraction"):
        for i in range(len(records)):
            strict.add([dataset[i]], records)


# --- shard sets --------------------------------------------------------------------------


def test_shards_hold_the_files_bytes_and_webdataset_reads_them(videos, tmp_path):
    import webdataset as wds

    subset = subset_file(videos, tmp_path / "subset.jsonl")
    out = tmp_path / "shards"
    meta = write_shards([("records", str(subset))], str(out), clips_per_shard=4, progress=False)
    assert meta["clips"] == len(videos.files) and meta["shards"] == -(-len(videos.files) // 4)
    loaded = open_shards(str(out))
    by_name = {f.name: f for f in videos.files}
    for record in loaded.records:
        assert read_member(str(out), record) == by_name[record.id].path.read_bytes()
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == [r.id for r in loaded.records[:4]]
    # A rerun keeps the shards it finds complete.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    write_shards([("records", str(subset))], str(out), clips_per_shard=4, progress=False)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}


def test_a_damaged_shard_member_is_a_bad_video(videos, tmp_path):
    out = tmp_path / "shards"
    write_shards([("records", str(subset_file(videos, tmp_path / "s.jsonl")))], str(out), progress=False)
    loaded = open_shards(str(out))
    record = loaded.records[0]
    shard = out / record.blob.shard
    data = bytearray(shard.read_bytes())
    data[record.blob.offset + record.blob.length // 2] ^= 0xFF
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    items = VideoItems(loaded.records, [0], {"student": View(4, 16)}, store_uri=loaded.store)
    with pytest.raises(BadVideo, match="sha256"):
        items.read(record)


def test_views_of_clips_in_memory_repeat_frames_when_few():
    pixels = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    from vidalign.data.videoset import view_pixels

    out = view_pixels(pixels, {"v": View(8, 8)})["v"]
    assert torch.equal(out[0], torch.from_numpy(pixels[0])) and out.shape[0] == 8
