"""Toy moving-square clips: deterministic, honest captions, real motion, mp4 round trip."""

import itertools

import av
import numpy as np
import pytest

from vidalign.data.toy import DIRECTIONS, SQUARE_COLORS, moving_squares, read_video, write_mp4
from vidalign.errors import InvalidInput, NotFound

MOTION_WORDS = {"move", "moves", "moving", "motion", *DIRECTIONS}


def _top_left(mask: np.ndarray) -> tuple[int, int]:
    """Top-left corner of a square that may wrap around the edges.

    The first occupied row is the one whose (cyclic) predecessor is empty; the
    same for columns. A square narrower than the frame has exactly one.
    """
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    (row,) = np.flatnonzero(rows & ~np.roll(rows, 1))
    (col,) = np.flatnonzero(cols & ~np.roll(cols, 1))
    return int(row), int(col)


def _wrapped(delta: int, size: int) -> int:
    """Shortest signed displacement on a ring of ``size`` pixels."""
    return (delta + size // 2) % size - size // 2


def test_same_arguments_give_identical_bytes():
    a, b = moving_squares(6, seed=3), moving_squares(6, seed=3)
    assert [c.video.tobytes() for c in a] == [c.video.tobytes() for c in b]
    assert [(c.clip_id, c.caption) for c in a] == [(c.clip_id, c.caption) for c in b]
    other = moving_squares(6, seed=4)
    assert [c.video.tobytes() for c in a] != [c.video.tobytes() for c in other]


def test_clip_i_does_not_depend_on_n():
    few, many = moving_squares(5, seed=1), moving_squares(50, seed=1)
    for a, b in zip(few, many[:5], strict=True):
        assert a.clip_id == b.clip_id
        assert a.caption == b.caption
        assert np.array_equal(a.video, b.video)
    assert [c.clip_id for c in few] == [f"toy-1-{i:05d}" for i in range(5)]


def test_shape_dtype_and_labels():
    clips = moving_squares(40, frames=10, size=24)
    for clip in clips:
        assert clip.video.dtype == np.uint8
        assert clip.video.shape == (10, 24, 24, 3)
        assert clip.direction in DIRECTIONS
        assert clip.color in SQUARE_COLORS
    assert {c.direction for c in clips} == set(DIRECTIONS)


def test_static_caption_has_no_motion_words():
    for clip in moving_squares(40):
        assert not MOTION_WORDS & set(clip.static_caption.split())
        assert clip.color in clip.static_caption
        assert clip.caption == f"{clip.static_caption} moves {clip.direction}"


def test_square_moves_in_the_stated_direction():
    axis_sign = {"up": (0, -1), "down": (0, 1), "left": (1, -1), "right": (1, 1)}
    wrapped_somewhere = False
    for clip in moving_squares(40, frames=12, size=32):
        mask = np.all(clip.video == SQUARE_COLORS[clip.color], axis=-1)
        corners = [_top_left(m) for m in mask]
        axis, sign = axis_sign[clip.direction]
        for before, after in itertools.pairwise(corners):
            step = [_wrapped(after[k] - before[k], 32) for k in (0, 1)]
            assert step[1 - axis] == 0, clip.clip_id
            assert np.sign(step[axis]) == sign, clip.clip_id
        # A frame where the square touches two opposite edges shows it split by the wrap.
        split_rows = mask[:, 0].any(axis=1) & mask[:, -1].any(axis=1)
        split_cols = mask[:, :, 0].any(axis=1) & mask[:, :, -1].any(axis=1)
        wrapped_somewhere |= bool((split_rows | split_cols).any())
    assert wrapped_somewhere, "no clip crossed an edge; the wrap-around is untested"


@pytest.mark.parametrize(("encoder", "stream_codec"), [("libx264", "h264"), ("mpeg4", "mpeg4")])
def test_mp4_round_trip(tmp_path, monkeypatch, encoder, stream_codec):
    if encoder not in av.codecs_available:
        pytest.skip(f"{encoder} is not in this PyAV build")
    # write_mp4 prefers libx264; offering only mpeg4 exercises the fallback.
    monkeypatch.setattr(av, "codecs_available", {encoder})
    (clip,) = moving_squares(1, frames=16, size=32, seed=2)
    path = tmp_path / "clip.mp4"
    write_mp4(clip, path, fps=8)
    decoded = read_video(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == clip.video.shape
    diff = np.abs(decoded.astype(np.int16) - clip.video.astype(np.int16))
    assert diff.mean() < 4.0
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == stream_codec


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(InvalidInput, match="frames"):
        moving_squares(2, frames=1)
    with pytest.raises(InvalidInput, match="size"):
        moving_squares(2, size=4)
    odd = np.zeros((4, 15, 16, 3), dtype=np.uint8)
    with pytest.raises(InvalidInput, match="even H"):
        write_mp4(odd, tmp_path / "odd.mp4")
    with pytest.raises(InvalidInput, match="uint8"):
        write_mp4(odd.astype(np.float32), tmp_path / "float.mp4")
    with pytest.raises(NotFound, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")
