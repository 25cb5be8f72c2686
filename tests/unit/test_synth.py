"""SynthMotion: deterministic clips whose pixels, captions and questions agree with ground truth."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from vidalign.data.benchmarks import load_motionbench
from vidalign.data.frames import decode_frames
from vidalign.data.synth import (
    CATEGORY_CODES,
    COLORS,
    DIRECTIONS,
    LETTERS,
    META_FILE,
    MOTION_CATEGORIES,
    STATIC_CATEGORY,
    SynthClip,
    answer_from_truth,
    generate,
    read_sidecar,
    write_dataset,
)
from vidalign.errors import InvalidInput

MOTION_WORDS = {
    "move", "moves", "moving", "motion", "slide", "slides", "spin", "spins", "spinning",
    "rotate", "rotates", "grow", "grows", "shrink", "shrinks", "pan", "pans", "camera",
    "still", "stays", "back", "forth", "reverse", "reversing", "direction", "steadily",
    "first", "then", "horizontally", "vertically", *DIRECTIONS,
}
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), None: (0, 0)}


@pytest.fixture(scope="module")
def clips() -> list[SynthClip]:
    return generate(160, seed=11)


def _wrapped(delta: np.ndarray, size: int) -> np.ndarray:
    """Shortest signed displacement on a ring of ``size`` pixels."""
    return (delta + size / 2) % size - size / 2


def _world_steps(clip: SynthClip, role: str) -> np.ndarray:
    """Per-frame displacement of an object relative to the scene, (F-1, 2) as (row, col)."""
    obj = next(o for o in clip.truth["objects"] if o["role"] == role)
    track = np.array(obj["track"])
    camera = clip.truth["camera"]
    pan = np.array(_STEP[camera["direction"]]) * camera["speed"]
    # screen = world - camera, so world steps are screen steps plus the camera's.
    return _wrapped(np.diff(track, axis=0), clip.truth["size"]) + pan


def test_clip_i_is_the_same_bytes_whatever_n():
    few, many = generate(3, seed=5), generate(7, seed=5)
    for a, b in zip(few, many[:3], strict=True):
        assert a.clip_id == b.clip_id
        assert a.video.tobytes() == b.video.tobytes()
        assert (a.caption, a.static_caption, a.questions) == (b.caption, b.static_caption, b.questions)
        assert json.dumps(a.truth) == json.dumps(b.truth)
    other = generate(3, seed=6)
    assert [c.video.tobytes() for c in few] != [c.video.tobytes() for c in other]
    assert [c.clip_id for c in few] == ["synth-5-00000", "synth-5-00001", "synth-5-00002"]


def test_shape_dtype_and_size_options():
    (clip,) = generate(1)
    assert clip.video.dtype == np.uint8 and clip.video.shape == (16, 64, 64, 3)
    (small,) = generate(1, frames=10, size=48)
    assert small.video.shape == (10, 48, 48, 3)
    for q in small.questions:
        assert answer_from_truth(small, q) == q.answer


def test_every_question_is_answerable_from_its_own_ground_truth(clips):
    for clip in clips:
        categories = Counter(q.category for q in clip.questions)
        assert categories == {**dict.fromkeys(MOTION_CATEGORIES, 1), STATIC_CATEGORY: 3}
        for q in clip.questions:
            assert len(q.options) == 4 and len(set(q.options)) == 4, q
            assert answer_from_truth(clip, q) == q.answer, q


def test_answer_from_truth_rejects_a_second_true_option(clips):
    clip = clips[0]
    q = next(q for q in clip.questions if q.kind == "direction")
    right = q.options[LETTERS.index(q.answer)]
    doubled = tuple(right if k == (LETTERS.index(q.answer) + 1) % 4 else o for k, o in enumerate(q.options))
    with pytest.raises(InvalidInput, match="2 options match"):
        answer_from_truth(clip, replace(q, options=doubled))


def test_static_caption_has_no_motion_words(clips):
    for clip in clips:
        words = set(clip.static_caption.replace(",", "").split())
        assert not MOTION_WORDS & words, clip.static_caption
        for obj in clip.truth["objects"]:
            assert f"{obj['color']} {obj['shape']}" in clip.static_caption
            assert f"{obj['color']} {obj['shape']}" in clip.caption
        assert clip.caption.lower().startswith(clip.static_caption.lower())


def test_answer_letters_are_balanced_in_every_category(clips):
    by_category: dict[str, Counter] = {}
    for clip in clips:
        for q in clip.questions:
            by_category.setdefault(q.category, Counter())[q.answer] += 1
    for category, counts in by_category.items():
        total = sum(counts.values())
        shares = {letter: counts[letter] / total for letter in LETTERS}
        assert all(0.15 <= s <= 0.35 for s in shares.values()), (category, shares)


def test_pixels_are_where_the_ground_truth_says(clips):
    """Each sprite's colour mask is centred on its track (torus-aware), when nothing overlaps it."""
    checked = 0
    for clip in clips[:30]:
        size = clip.truth["size"]
        objects = clip.truth["objects"]
        angles = 2 * np.pi * np.arange(size) / size
        for i, obj in enumerate(objects):
            mask = np.all(clip.video == COLORS[obj["color"]], axis=-1)
            for t, (row, col) in enumerate(obj["track"]):
                near = [
                    o for o in objects if o is not obj
                    and np.hypot(*_wrapped(np.subtract(o["track"][t], (row, col)), size))
                    < 1.7 * (o["radius"] + obj["radius"])
                ]
                if near or not mask[t].any():
                    continue
                rows, cols = np.nonzero(mask[t])
                centre = [
                    (np.angle(np.exp(1j * angles[idx]).mean()) % (2 * np.pi)) * size / (2 * np.pi)
                    for idx in (rows, cols)
                ]
                assert np.all(np.abs(_wrapped(np.subtract(centre, (row, col)), size)) < 1.0), (
                    clip.clip_id, i, t, centre, (row, col),
                )
                checked += 1
    assert checked > 500


def test_actor_slides_in_the_stated_direction_and_only_then(clips):
    for clip in clips:
        actor = clip.truth["objects"][0]
        steps = _world_steps(clip, "actor")
        for segment in actor["program"]:
            moved = steps[segment["start"] : segment["end"]]
            if segment["action"] == "slide":
                expected = np.array(_STEP[segment["direction"]]) * segment["speed"]
                np.testing.assert_allclose(moved, np.tile(expected, (len(moved), 1)), atol=1e-2)
            else:
                np.testing.assert_allclose(moved, 0, atol=1e-2)


def test_repeater_reverses_exactly_the_stated_number_of_times(clips):
    seen = set()
    for clip in clips:
        repeater = clip.truth["objects"][1]
        axis = 1 if repeater["axis"] == "horizontal" else 0
        steps = _world_steps(clip, "repeater")
        signs = np.sign(steps[:, axis][np.abs(steps[:, axis]) > 1e-3])
        assert int((signs[1:] != signs[:-1]).sum()) == repeater["reversals"], clip.clip_id
        np.testing.assert_allclose(steps[:, 1 - axis], 0, atol=1e-2)
        seen.add(repeater["reversals"])
    assert seen == {1, 2, 3, 4}


def test_camera_pan_shifts_the_background(clips):
    panned = [c for c in clips if c.truth["camera"]["direction"] and c.truth["background"]["texture"] != "plain"]
    assert len(panned) > 20
    for clip in panned[:20]:
        camera = clip.truth["camera"]
        d_row, d_col = (np.array(_STEP[camera["direction"]]) * camera["speed"]).astype(int)
        video = clip.video.astype(int)
        grey = (video[..., 0] == video[..., 1]) & (video[..., 1] == video[..., 2])
        for t in range(len(video) - 1):
            # Panning right moves the view right: the scene shifts left on screen.
            expected = np.roll(video[t], (-d_row, -d_col), axis=(0, 1))
            both = grey[t + 1] & np.roll(grey[t], (-d_row, -d_col), axis=(0, 1))
            assert np.array_equal(video[t + 1][both], expected[both]), (clip.clip_id, t)
            assert not np.array_equal(video[t + 1][both], video[t][both])


def test_one_frame_does_not_tell_the_direction_but_two_do(clips):
    """Nearest-centroid on the actor's position in one frame is at chance; its step is exact."""
    size = clips[0].truth["size"]
    directions, first, steps = [], [], []
    for clip in clips:
        actor = clip.truth["objects"][0]
        (slide,) = [s for s in actor["program"] if s["action"] == "slide"]
        directions.append(slide["direction"])
        first.append(actor["track"][slide["start"]])
        steps.append(_world_steps(clip, "actor")[slide["start"]])
    directions, first, steps = np.array(directions), np.array(first), np.array(steps)
    half = len(clips) // 2
    angles = np.exp(2j * np.pi * first / size)  # positions on the torus as unit vectors
    centroids = {d: angles[:half][directions[:half] == d].mean(axis=0) for d in DIRECTIONS}
    guess = [
        min(DIRECTIONS, key=lambda d, a=a: np.abs(a - centroids[d]).sum()) for a in angles[half:]
    ]
    one_frame = np.mean(np.array(guess) == directions[half:])
    step_guess = [min(DIRECTIONS, key=lambda d, s=s: np.abs(s - _STEP[d]).sum()) for s in steps]
    assert one_frame < 0.4
    assert np.mean(np.array(step_guess) == directions) == 1.0


def test_written_dataset_is_motionbench_and_round_trips(tmp_path):
    clips = generate(3, seed=2, frames=12, size=32)
    meta = write_dataset(clips, tmp_path, fps=8)
    assert meta == tmp_path / META_FILE
    lines = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(lines) == 3 * 7
    assert {line["key"] for line in lines} == {
        f"{c.clip_id}-{code}" for c in clips for code in CATEGORY_CODES.values()
    }
    assert lines[0]["video_info"] == {"duration": 1.5, "fps": 8, "resolution": "32x32"}

    loaded = load_motionbench(tmp_path)
    assert loaded.missing == [] and len(loaded) == 27
    by_uid = {item.uid: item for item in loaded}
    for clip in clips:
        for q in clip.questions:
            item = by_uid[q.uid]
            assert (item.question, tuple(item.options), item.answer, item.category) == (
                q.stem, q.options, q.answer, q.category,
            )
            assert item.extra["raw_question"] == q.text
    frames = decode_frames(by_uid[clips[0].questions[0].uid].video_path, num_frames=12)
    assert frames.shape == (12, 32, 32, 3)
    assert np.abs(frames.astype(int) - clips[0].video).mean() < 6

    records = read_sidecar(tmp_path)
    assert [r.clip_id for r in records] == [c.clip_id for c in clips]
    for record, clip in zip(records, clips, strict=True):
        assert (record.caption, record.static_caption, record.questions) == (
            clip.caption, clip.static_caption, clip.questions,
        )
        assert record.video_path.is_file()
        assert all(answer_from_truth(record, q) == q.answer for q in record.questions)


def test_bad_arguments_are_named():
    with pytest.raises(InvalidInput, match="frames"):
        generate(1, frames=4)
    with pytest.raises(InvalidInput, match="size"):
        generate(1, size=50 + 1)
    with pytest.raises(InvalidInput, match="size"):
        generate(1, size=16)
    with pytest.raises(InvalidInput, match="n:"):
        generate(-1)
