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


# --- the feature gap ------------------------------------------------------------------


def test_perturb_features_spoils_time_or_clip_only():
    import torch

    from vidalign.gap import perturb_features

    n, t, k, d = 3, 4, 2, 5
    feats = torch.randn(n, t * k, d, generator=torch.Generator().manual_seed(0))
    frames = feats.reshape(n, t, k, d)
    other = perturb_features(feats, "other_clip", k)
    assert torch.equal(other[0], feats[1]) and torch.equal(other[-1], feats[0])
    first = perturb_features(feats, "first_frame", k).reshape(n, t, k, d)
    assert all(torch.equal(first[:, i], frames[:, 0]) for i in range(t))
    rev = perturb_features(feats, "reversed", k).reshape(n, t, k, d)
    assert torch.equal(rev, frames.flip(1))
    shuffled = perturb_features(feats, "shuffled", k, seed=7).reshape(n, t, k, d)
    # A permutation of whole frames (each frame's k tokens move together), none in place.
    moved = [next(j for j in range(t) if torch.equal(shuffled[:, i], frames[:, j])) for i in range(t)]
    assert sorted(moved) == list(range(t)) and all(i != j for i, j in enumerate(moved))
    assert torch.equal(shuffled.reshape(n, t * k, d), perturb_features(feats, "shuffled", k, seed=7))
    with pytest.raises(InvalidInput, match="not a whole number of frames of 3 tokens"):
        perturb_features(feats, "reversed", 3)
    with pytest.raises(InvalidInput, match="perturbation: expected one of"):
        perturb_features(feats, "sideways", k)
    with pytest.raises(InvalidInput, match="needs at least 2 clips"):
        perturb_features(feats[:1], "other_clip", k)


def test_feature_gap_is_paired(tmp_path, monkeypatch):
    import torch

    from vidalign.gap import FEATURE_PERTURBATIONS, feature_gap, mean_relative
    from vidalign.students import load_student
    from vidalign.vda import Adapter, load_teacher

    model = load_teacher("tiny-animatediff")
    d_v = load_student("tiny-videollava").d_v
    adapter = Adapter.create(d_v=d_v, cond_dim=model.cond_dim, teacher_family=model.family)
    path = tmp_path / "adapter.safetensors"
    adapter_id = adapter.save(path)
    teacher = LocalTeacher("tiny-animatediff", adapters=[path])
    clips = moving_squares(3, frames=8, size=32, seed=3)
    pixels = torch.stack([torch.from_numpy(c.video) for c in clips])
    # 4 frames of 2 tokens; large features, so that any path from them to the loss shows.
    features = 3 * torch.randn(3, 8, d_v, generator=torch.Generator().manual_seed(1))
    ids = [c.clip_id for c in clips]
    kwargs = dict(adapter_id=adapter_id, frame_tokens=2, pixels=pixels,
                  captions=["a square"] * 3, timesteps=[600, 900], draws=2)
    gaps = feature_gap(teacher, ids, features, **kwargs)
    assert set(gaps) == set(FEATURE_PERTURBATIONS)
    for how, per_t in gaps.items():
        assert [g.timestep for g in per_t] == [600, 900], how
        assert all(g.true_loss > 0 and g.wrong_loss > 0 for g in per_t), how
    # Another clip's features change what the teacher is conditioned on: the loss moves.
    assert all(g.wrong_loss != g.true_loss for g in gaps["other_clip"])
    # A "perturbation" that leaves the features as they are gives exactly no gap: the
    # pair shares ids, seed, draws and timesteps, and differs only in the features.
    monkeypatch.setattr("vidalign.gap.perturb_features", lambda f, how, k, seed=0: f.clone())
    same = feature_gap(teacher, ids, features, **kwargs)
    assert all(mean_relative(per_t) == 0.0 for per_t in same.values())
    with pytest.raises(InvalidInput, match="as pixels or as latents"):
        feature_gap(teacher, ids, features, adapter_id=adapter_id, frame_tokens=2)
