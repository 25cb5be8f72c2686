"""The real-video fixture set: valid clips decode as described, broken ones are caught.

Broken files are held to ``strict_check`` (decoder ``err_detect=explode``,
``frame.is_corrupt``, packet corruption flags, header frame count and
container duration), not to FFmpeg's defaults, which conceal some of them.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest

from tests.support.videos import BROKEN_KINDS, DECODER_OPTIONS, make_video_set, strict_check


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    return make_video_set(tmp_path_factory.mktemp("videos"), seed=0)


def _decode_all(source) -> list[np.ndarray]:
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = dict(DECODER_OPTIONS)
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def test_the_set_covers_codecs_sizes_rates_and_every_broken_kind(video_set):
    valid = video_set.valid
    assert {f.codec for f in valid} >= {"mpeg4"}
    assert len({f.size for f in valid}) >= 3
    assert len({f.fps for f in valid}) >= 3
    assert all(1 <= f.seconds <= 3 for f in valid)
    assert {f.broken for f in video_set.broken} == set(BROKEN_KINDS)
    names = sorted(p.name for p in video_set.video_dir.iterdir())
    assert names == sorted(f.name for f in video_set.files)
    assert video_set.of_kind("empty")[0].path.stat().st_size == 0


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_every_valid_clip_decodes_with_its_frame_count_size_and_motion(video_set, source):
    for clip in video_set.valid:
        src = str(clip.path) if source == "path" else io.BytesIO(clip.path.read_bytes())
        frames = _decode_all(src)
        assert len(frames) == clip.frames, clip.name
        assert frames[0].shape == (clip.height, clip.width, 3), clip.name
        moved = np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean()
        assert moved > 5, f"{clip.name}: first and last frame barely differ ({moved:.1f})"
        report = strict_check(clip.path)
        assert report.problem is None, (clip.name, report)
        assert (report.frames, report.width, report.height) == (clip.frames, clip.width, clip.height)


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_every_broken_file_is_caught_by_the_strict_check(video_set, source):
    for bad in video_set.broken:
        src = bad.path if source == "path" else bad.path.read_bytes()
        report = strict_check(src, min_frames=4)
        assert report.problem is not None, (bad.name, bad.broken, report)


def test_each_kind_fails_the_way_the_module_documents(video_set):
    for bad in video_set.of_kind("empty"):
        assert not strict_check(bad.path).opened
    for bad in video_set.of_kind("truncated"):
        report = strict_check(bad.path)
        if bad.container == "mp4" and not bad.faststart:  # moov atom at the end: gone
            assert not report.opened, report
        elif bad.container == "mp4":  # moov first: the cut packet is flagged, decoding raises
            assert report.opened and report.corrupt_packets == 1, report
            assert report.packets < report.header_frames == bad.frames, report
        elif bad.container == "webm":  # decodes cleanly; only the duration shows the cut
            assert report.error is None and report.corrupt_frames == 0, report
            assert 0 < report.frames < bad.frames
            assert "span" in report.problem
        else:
            assert report.opened and report.problem, report
    for bad in video_set.of_kind("damaged"):
        report = strict_check(bad.path)
        assert report.opened and report.packets == bad.frames, report
        assert report.error and "InvalidDataError" in report.error, (bad.name, report)
    (short,) = video_set.of_kind("short")
    assert strict_check(short.path).problem is None
    assert strict_check(short.path, min_frames=4).problem == "3 frames, fewer than 4"


def test_damage_is_never_silent_and_explode_always_raises(video_set):
    """FFmpeg's defaults may conceal the damage (frames come back flagged ``is_corrupt``);
    with the recommended decoder options every damaged file raises."""
    for bad in video_set.of_kind("damaged"):
        flagged = raised = False
        try:
            with av.open(str(bad.path)) as container:
                flagged = any(f.is_corrupt for f in container.decode(video=0))
        except av.error.InvalidDataError:
            raised = True
        assert flagged or raised, bad.name
        with pytest.raises(av.error.InvalidDataError):
            _decode_all(str(bad.path))


def test_annotations_list_every_file_and_load(video_set):
    import warnings

    from vidalign.data.benchmarks.motionbench import load_motionbench
    from vidalign.data.benchmarks.motionvid import load_motionvid_qa
    from vidalign.data.benchmarks.openvid import load_openvid

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing video would warn
        openvid = load_openvid(video_set.openvid_csv, video_set.video_dir)
        bench = load_motionbench(video_set.root)
        pref = load_motionvid_qa(video_set.motionvid_json)
    every = {f.path for f in video_set.files}
    assert {item.video_path for item in openvid.items} == every
    assert {item.video_path for item in bench.items} == every
    assert {item.video_path for item in pref.items} == every
    by_path = {f.path: f for f in video_set.files}
    for item in openvid.items:
        clip = by_path[item.video_path]
        assert item.caption == clip.caption and item.frames == clip.frames and item.fps == clip.fps
    for item in bench.items:
        clip = by_path[item.video_path]
        if item.uid.endswith("-direction"):
            assert item.options["ABCD".index(item.answer)] == clip.direction


def test_same_seed_same_bytes_other_seed_other_content(tmp_path):
    a = make_video_set(tmp_path / "a", seed=3)
    b = make_video_set(tmp_path / "b", seed=3)
    c = make_video_set(tmp_path / "c", seed=4)
    for fa, fb in zip(a.files, b.files, strict=True):
        assert fa.path.read_bytes() == fb.path.read_bytes(), fa.name
    for name in ("OpenVid-1M.csv", "video_info.meta.jsonl", "motionvid_qa.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    assert a.valid[0].path.read_bytes() != c.valid[0].path.read_bytes()
    json.loads(a.motionvid_json.read_text())
