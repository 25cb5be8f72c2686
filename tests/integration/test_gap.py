"""The conditioning gap compares paired draws: the same noise, only the text differs."""

import pytest

from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput
from vidalign.gap import conditioning_gap, wrong_motion
from vidalign.teacher.client import LocalTeacher


def test_wrong_motion():
    assert wrong_motion("a red square moves left", "left") == "a red square moves right"
    with pytest.raises(InvalidInput, match="does not state the direction"):
        wrong_motion("a red square", "left")


def test_gap_is_paired(monkeypatch):
    teacher = LocalTeacher("tiny-animatediff")
    clips = moving_squares(4, frames=8, size=32, seed=3)
    gaps = conditioning_gap(teacher, clips, timesteps=[200, 800], draws=2)
    assert [g.timestep for g in gaps] == [200, 800]
    assert all(g.true_loss > 0 and g.wrong_loss > 0 for g in gaps)
    # With the "wrong" caption equal to the true one the gap is exactly zero:
    # the two losses differ only through the text.
    monkeypatch.setattr("vidalign.gap.wrong_motion", lambda caption, direction: caption)
    same = conditioning_gap(teacher, clips, timesteps=[200], draws=2)
    assert same[0].relative == 0.0
