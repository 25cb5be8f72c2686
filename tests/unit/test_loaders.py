"""Benchmark loaders read the official layouts, point at the bad line, and report missing videos."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from vidalign.data.benchmarks import (
    MissingVideosWarning,
    QAItem,
    load_benchmark,
    load_favor,
    load_motionbench,
    load_motionvid_qa,
    load_openvid,
    load_seedbench_video,
    load_videochatgpt_qa,
    load_videomme,
)
from vidalign.data.frames import decode_frames, probe
from vidalign.data.toy import write_mp4
from vidalign.errors import InvalidInput, NotFound

FIXTURES = Path(__file__).parents[1] / "fixtures" / "benchmarks"
MALFORMED = FIXTURES / "malformed"


def _clip(frames: int = 16, size: int = 16, fps: int = 8) -> np.ndarray:
    """Frame k is a flat grey of level 10 + 15 k, so a decoded frame tells its index."""
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        video[k] = 10 + 15 * k
    return video


def _index(frame: np.ndarray) -> int:
    return round((float(frame.mean()) - 10) / 15)


def make_videos(paths, frames: int = 16) -> None:
    video = _clip(frames)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(video, path, fps=8)


@pytest.fixture
def fixtures(tmp_path) -> Path:
    """A private copy of the fixtures, so tests can add videos next to them."""
    shutil.copytree(FIXTURES, tmp_path / "benchmarks")
    return tmp_path / "benchmarks"


def _load_quietly(loader, *args, **kwargs):
    with pytest.warns(MissingVideosWarning):
        return loader(*args, **kwargs)


def test_motionbench_reads_options_withheld_answers_and_line_numbers(fixtures):
    bench = _load_quietly(load_motionbench, fixtures / "motionbench")
    items = {i.uid: i for i in bench}
    assert list(items) == ["101", "102", "201", "301", "401"]
    first = items["101"]
    assert first.question == "What does the person do with the cup?"
    assert first.options == ["lifts it", "spins it", "drops it", "pushes it"]
    assert (first.answer, first.correct_option, first.category, first.line) == (
        "B", "spins it", "Motion Recognition", 1,
    )
    # An option running over two lines stays one option.
    assert items["201"].options[2] == "zooms in,\nthen holds still"
    assert items["201"].line == 3  # line 2 is blank
    # Test-split answers are withheld: kept, flagged, not scorable.
    assert items["301"].answer is None and not items["301"].scorable
    assert bench.unanswerable == ["301"]
    assert items["401"].line == 5
    assert first.prompt == (
        "What does the person do with the cup?\nA. lifts it\nB. spins it\nC. drops it\n"
        "D. pushes it\nAnswer with the option's letter from the given choices directly."
    )
    root = fixtures / "motionbench"
    assert bench.missing == [root / f"videos/mb-00{k}.mp4" for k in range(1, 5)]


def test_missing_videos_are_reported_once_and_not_when_present(fixtures):
    root = fixtures / "motionbench"
    make_videos([root / "videos/mb-001.mp4", root / "videos/mb-002.mp4", root / "videos/mb-003.mp4"])
    with pytest.warns(MissingVideosWarning, match=r"1 of 4 videos are missing: .*mb-004\.mp4"):
        bench = load_motionbench(root)
    assert len(bench) == 5 and bench.missing == [root / "videos/mb-004.mp4"]
    make_videos([root / "videos/mb-004.mp4"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_motionbench(root).missing == []


def test_favor_keeps_option_text_answers(fixtures):
    bench = _load_quietly(load_favor, fixtures / "favor" / "video_perspective.json")
    assert [i.uid for i in bench] == ["fv-001-0", "fv-001-1", "fv-002-0"]
    first = bench.items[0]
    assert first.answer == "He walks" and first.correct_option == "He walks"
    assert [i.category for i in bench] == ["AS", "CM", "HAC"]
    assert [i.line for i in bench] == [2, 2, 19]
    assert first.video_path == fixtures / "favor" / "fv-001.mp4"
    assert first.prompt.endswith(
        "What does the man do after standing up?\nYou can only response with the answer among "
        "['He walks', 'He walks forward', 'He sits', 'He jumps', 'He waves']"
    )


def test_msvd_joins_questions_and_answers_and_finds_the_extension(fixtures):
    root = fixtures / "msvd"
    make_videos([root / "videos/-4wsuPCjDBc_5_15.avi", root / "videos/0lh_UWF9ZP4_62_69.mp4"])
    bench = load_benchmark("msrvtt-qa", root, video_dir=root / "videos")
    assert [(i.uid, i.answer, i.category, i.line) for i in bench] == [
        ("0", "sing", "what", 2), ("1", "man", "who", 3), ("2", "onion", "what", 4),
    ]
    assert bench.items[0].video_path.name == "-4wsuPCjDBc_5_15.avi"
    assert bench.items[2].video_path.name == "0lh_UWF9ZP4_62_69.mp4"
    assert bench.items[0].options is None and bench.items[0].benchmark == "msrvtt-qa"
    assert bench.items[1].prompt == "who is singing?"
    assert bench.missing == []


def test_videomme_reads_flat_rows_and_the_official_nested_json(fixtures):
    flat = _load_quietly(load_videomme, fixtures / "videomme" / "videomme.jsonl")
    assert [(i.uid, i.answer, i.category, i.line) for i in flat] == [
        ("001-1", "C", "Counting Problem", 1), ("001-2", "B", "Action Recognition", 2),
    ]
    assert flat.items[0].options == ["One.", "Two.", "Three.", "Four."]
    assert flat.items[0].video_path.name == "fFjv93ACGo8.mp4"
    assert flat.items[0].extra["duration"] == "short"
    assert flat.items[0].prompt.endswith("How many people appear?\nA. One.\nB. Two.\nC. Three.\nD. Four.\nThe best answer is:")
    nested = _load_quietly(load_videomme, fixtures / "videomme" / "output_test_template.json")
    assert [(i.uid, i.answer, i.line) for i in nested] == [("002-1", "C", 2), ("002-3", "B", 2)]
    assert nested.items[1].options == ["4.", "9.", "5.", "13."]
    assert nested.items[0].extra["domain"] == "Knowledge"


def test_seedbench_loads_video_dimensions_with_segments_in_seconds(fixtures):
    path = fixtures / "seedbench" / "SEED-Bench.json"
    roots = {10: fixtures / "ssv2", 11: fixtures / "epic", 12: fixtures / "breakfast"}
    bench = _load_quietly(load_seedbench_video, path, roots)
    assert [(i.uid, i.category, i.answer, i.segment) for i in bench] == [
        ("v1738", "Action Recognition", "B", None),
        ("v1962", "Action Prediction", "B", (0.5, 1.5)),
        ("v4397", "Procedure Understanding", "C", (0.2, 1.8)),  # frames 3-27 at 15 fps
    ]
    assert [i.line for i in bench] == [15, 27, 40]
    assert bench.items[2].video_path == fixtures / "breakfast" / "P06/cam01/P06_cereals.mp4"
    assert bench.items[0].options[1] == "throwing something in the air and catching it"


def test_motionvid_preference_records(fixtures):
    root = fixtures / "motionvid"
    make_videos([root / "clips/mv-001.mp4", root / "clips/mv-002.mp4"])
    records = load_motionvid_qa(root / "motionvid_dpo.json")
    assert [(r.uid, r.line) for r in records] == [("motionvid-0", 2), ("mv-2", 3)]
    assert records.items[1].chosen == "It turns left at the junction."
    assert records.items[1].rejected == "It drives straight on."
    assert records.missing == []


def test_openvid_csv_in_any_column_order(fixtures):
    rows = _load_quietly(load_openvid, fixtures / "openvid" / "OpenVid-1M.csv")
    kite, onion, waves = rows.items
    assert kite.caption == "A red kite rises over a beach,\nthen drifts to the left."
    assert (kite.line, onion.line, waves.line) == (2, 4, 5)
    assert (kite.aesthetic_score, kite.motion_score, kite.temporal_consistency_score) == (5.12, 3.4, 0.987)
    assert (kite.camera_motion, kite.frames, kite.fps, kite.seconds) == ("pan_left", 120, 24.0, 5.0)
    assert onion.motion_score is None and waves.camera_motion is None
    assert waves.frames == 48 and isinstance(waves.frames, int)


@pytest.mark.parametrize(
    ("loader", "name", "where", "message"),
    [
        (load_motionbench, "motionbench_bad_json.jsonl", ":2:", "not valid JSON"),
        (load_motionbench, "motionbench_bad_answer.jsonl", ":2: qa[0]", "answer: expected one of"),
        (load_motionbench, "motionbench_no_options.jsonl", ":1: qa[0]", "option lines"),
        (load_motionbench, "motionbench_missing_qa.jsonl", ":3:", "missing field 'qa'"),
        (load_motionbench, "motionbench_duplicate_uid.jsonl", ":2: qa[0]", "already appears on line 1"),
        (load_favor, "favor_answer_not_an_option.json", ":8: video 'fv-002', questions[0]", "not one of the options"),
        (load_favor, "favor_trailing_comma.json", ":4:", "not valid JSON"),
        (load_videochatgpt_qa, "msvd_unanswered", "test_q.json:3:", "has no answer"),
        (load_videomme, "videomme_bad_option.jsonl", ":2: options[2]", "expected 'C. ...'"),
        (load_seedbench_video, "seedbench_bad_segment.json", ":4:", "segment: expected [start, end]"),
        (load_motionvid_qa, "motionvid_missing_chosen.json", ":3:", "missing field 'chosen'"),
        (load_openvid, "openvid_bad_number.csv", ":3:", "aesthetic score: expected a number, got 'high'"),
    ],
)
def test_malformed_records_name_file_and_line(loader, name, where, message):
    path = MALFORMED / name
    with pytest.raises(InvalidInput) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVideosWarning)
        loader(path)
    text = str(caught.value)
    assert name in text and where in text and message in text, text


def test_unknown_benchmark_and_missing_file():
    with pytest.raises(InvalidInput, match="motionbench"):
        load_benchmark("mvbench", FIXTURES)
    with pytest.raises(NotFound, match=r"nowhere\.json"):
        load_favor(FIXTURES / "nowhere.json")


def test_qa_item_needs_no_loader():
    item = QAItem("u1", Path("v.mp4"), "Q?", ["x", "y"], "B", "Camera Motion", "f", 1, benchmark="motionbench")
    assert item.correct_option == "y"
    assert item.prompt.startswith("Q?\nA. x\nB. y\n")


def test_uniform_and_fps_sampling_pick_the_right_frames(tmp_path):
    path = tmp_path / "ramp.mp4"
    write_mp4(_clip(16), path, fps=8)
    info = probe(path)
    assert (info.frames, info.fps, info.duration, info.width) == (16, 8.0, 2.0, 16)

    frames = decode_frames(path, num_frames=4)
    assert frames.dtype == np.uint8 and frames.shape == (4, 16, 16, 3)
    assert [_index(f) for f in frames] == [0, 5, 10, 15]
    assert [_index(f) for f in decode_frames(path, fps=2)] == [0, 4, 8, 12]
    # A segment: seconds 1.0 to 1.5 are frames 8 to 12.
    assert [_index(f) for f in decode_frames(path, num_frames=3, start=1.0, end=1.5)] == [8, 10, 12]
    assert [_index(f) for f in decode_frames(path, fps=4, start=1.0, end=1.5)] == [8, 10, 12]
    # More frames than the video has: frames repeat, in order.
    assert [_index(f) for f in decode_frames(path, num_frames=20)][:4] == [0, 1, 2, 2]


def test_frame_sampling_errors(tmp_path):
    path = tmp_path / "ramp.mp4"
    write_mp4(_clip(8), path, fps=8)
    with pytest.raises(InvalidInput, match="exactly one"):
        decode_frames(path, num_frames=4, fps=2)
    with pytest.raises(InvalidInput, match="exactly one"):
        decode_frames(path)
    with pytest.raises(InvalidInput, match="holds no frame"):
        decode_frames(path, num_frames=2, start=5.0, end=6.0)
    with pytest.raises(NotFound, match=r"gone\.mp4"):
        decode_frames(tmp_path / "gone.mp4", num_frames=2)
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(InvalidInput, match="not a readable video"):
        decode_frames(tmp_path / "text.mp4", num_frames=2)
