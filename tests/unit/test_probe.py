"""Linear probes (vidalign.probe, `vidalign probe`): targets, the ridge probe, the split, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vidalign.errors import InvalidInput
from vidalign.probe import (
    DIRECTION_CLASSES,
    FEATURES,
    ProbeRows,
    cell_index,
    clustered_stderr,
    direction_labels,
    fit_ridge,
    noise_like,
    position_labels,
    probe_accuracy,
    split_by_clip,
    step_frames,
    target_rows,
)
from vidalign_cli.main import PROBE_FEATURES, main

STILL, LEFT, RIGHT, UP, DOWN = range(len(DIRECTION_CLASSES))
Tensor = torch.Tensor


def planted(clips: int = 96, steps: int = 8, grid: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-step features ``(clips, steps, 64)`` whose first ``grid**2`` dimensions are the
    one-hot cell plus N(0, 0.1) noise (the rest pure noise), and the cells ``(clips, steps)``."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(grid * grid, (clips, steps), generator=g)
    features = torch.randn(clips, steps, 64, generator=g)
    features[..., : grid * grid] = 0.1 * features[..., : grid * grid] + torch.nn.functional.one_hot(
        cells, grid * grid
    )
    return features, cells


def rows_of(features: Tensor, labels: Tensor, classes: int, identities: int = 3) -> ProbeRows:
    """One row per (clip, step), clip = group, identity drawn per clip (as a clip's colour)."""
    clips, steps = labels.shape
    identity = torch.randint(identities, (clips,), generator=torch.Generator().manual_seed(1))
    return ProbeRows(
        x=features.reshape(clips * steps, -1),
        labels=labels.reshape(-1),
        groups=torch.arange(clips).repeat_interleave(steps),
        identity=identity.repeat_interleave(steps),
        classes=classes,
    )


def error_line(stderr: str) -> str:
    """The command's one error line (stderr also carries the JSON progress log)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("vidalign: error: ")]
    return line


def chance_bound(p: float, n: int) -> float:
    """How far from ``p`` an accuracy on ``n`` held-out rows may be when the probe knows nothing.

    When the held-out labels are i.i.d. uniform over K classes and independent of
    everything the probe saw (its features and its training labels), each
    prediction is a fixed function of the training rows and of the row's own
    features, so every row is a hit with probability exactly 1/K, independently
    of the others: hits ~ Binomial(n, p = 1/K), and the accuracy has mean p and
    standard deviation sqrt(p (1 - p) / n). Four standard deviations bound a
    chance-level probe with a false failure rate of about 6e-5 (two-sided normal
    tail), and the draws are seeded, so the test is deterministic anyway.
    """
    return 4 * math.sqrt(p * (1 - p) / n)


# --- the probe -------------------------------------------------------------------------------


def test_a_planted_position_signal_is_recovered_and_its_noise_control_is_at_chance():
    features, cells = planted()
    test = torch.arange(96).repeat_interleave(8) >= 64  # 64 clips fit, 32 score
    score = probe_accuracy(rows_of(features, cells, 16), test, seed=0)
    assert score.accuracy > 0.97, score
    assert score.uniform == 1 / 16 and score.test_rows == 32 * 8 and score.train_rows == 64 * 8

    noise = probe_accuracy(rows_of(noise_like(features, seed=0), cells, 16), test, seed=0)
    assert abs(noise.accuracy - 1 / 16) <= chance_bound(1 / 16, noise.test_rows), noise


def test_pure_noise_stays_at_chance():
    g = torch.Generator().manual_seed(5)
    clips, steps, classes = 120, 8, 16
    labels = torch.randint(classes, (clips, steps), generator=g)  # i.i.d. uniform, as derived
    features = torch.randn(clips, steps, 256, generator=g)  # more dims than rows: the dual form
    test = torch.arange(clips).repeat_interleave(steps) >= 60
    score = probe_accuracy(rows_of(features, labels, classes), test, seed=3)
    assert abs(score.accuracy - 1 / classes) <= chance_bound(1 / classes, score.test_rows), score


def test_majority_is_what_the_identity_alone_predicts():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(40, 4, 8, generator=g)
    identity = torch.arange(40) % 2  # per clip
    labels = torch.where(identity == 0, 2, 5)[:, None].expand(40, 4)  # the class follows identity
    rows = ProbeRows(
        x=features.reshape(160, 8),
        labels=labels.reshape(-1),
        groups=torch.arange(40).repeat_interleave(4),
        identity=identity.repeat_interleave(4),
        classes=6,
    )
    score = probe_accuracy(rows, rows.groups >= 30)
    assert score.majority == 1.0 and score.accuracy == 1.0


def test_noise_like_keeps_the_shape_and_each_dimensions_scale():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 3, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 0.0]) + 5
    noise = noise_like(features, seed=1)
    assert noise.shape == features.shape and noise.dtype == features.dtype
    flat = noise.reshape(-1, 4)
    torch.testing.assert_close(flat.std(0), features.reshape(-1, 4).std(0), rtol=0.1, atol=1e-6)
    sd = features.reshape(-1, 4).std(0)
    assert ((flat.mean(0) - 5).abs() <= 4 * sd / math.sqrt(len(flat)) + 1e-6).all()
    assert torch.equal(noise, noise_like(features, seed=1))  # deterministic for a seed


def test_ridge_primal_and_dual_forms_agree_with_the_closed_form():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(3, (20,), generator=g)
    for dims in (5, 50):  # primal (D <= N) and dual (D > N)
        x = torch.randn(20, dims, generator=g, dtype=torch.float64)
        (probe,) = fit_ridge(x, labels, 3, [0.5])
        z = (x - x.mean(0)) / x.std(0, unbiased=False)
        y = torch.nn.functional.one_hot(labels, 3).double()
        y = y - y.mean(0)
        expected = torch.linalg.solve(z.T @ z + 0.5 * 20 * torch.eye(dims, dtype=z.dtype), z.T @ y)
        torch.testing.assert_close(probe.weight, expected)


def test_the_probe_is_deterministic_for_a_seed():
    features, cells = planted(seed=4)
    features = features + 3 * torch.randn(
        features.shape, generator=torch.Generator().manual_seed(9)
    )
    rows = rows_of(features, cells, 16)
    test = rows.groups >= 64
    assert probe_accuracy(rows, test, seed=7) == probe_accuracy(rows, test, seed=7)


def test_clustered_stderr():
    hits = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    # One row per cluster: sqrt(a (1 - a) / (C - 1)), the sample standard error.
    a, c = 5 / 8, 8
    assert clustered_stderr(hits, torch.arange(8)) == pytest.approx(
        math.sqrt(a * (1 - a) / (c - 1))
    )
    # Clusters that are all hits or all misses: the effective sample is the clusters.
    clustered = clustered_stderr(
        torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 0, 1, 1, 1])
    )
    assert clustered == pytest.approx(0.5)
    assert clustered_stderr(hits, torch.zeros(8, dtype=torch.long)) == 0.0


# --- the split -------------------------------------------------------------------------------


def test_the_split_never_puts_rows_of_one_clip_on_both_sides():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(40, (1000,), generator=g)  # 40 clips, rows in any order
    for seed in range(5):
        kept, held = split_by_clip(groups, 0.25, seed)
        assert torch.equal(kept, ~held)
        assert not set(groups[kept].tolist()) & set(groups[held].tolist())
        assert len(set(groups[held].tolist())) == 10
    assert not torch.equal(split_by_clip(groups, 0.25, 0)[1], split_by_clip(groups, 0.25, 1)[1])
    with pytest.raises(InvalidInput, match="2 clips"):
        split_by_clip(torch.zeros(5, dtype=torch.long), 0.25, 0)


def test_a_test_set_that_shares_a_clip_with_training_is_refused():
    features, cells = planted(clips=10)
    rows = rows_of(features, cells, 16)
    test = torch.zeros(len(rows.labels), dtype=torch.bool)
    test[-4:] = True  # half of the last clip's rows
    with pytest.raises(InvalidInput, match="both sides"):
        probe_accuracy(rows, test)


# --- targets ---------------------------------------------------------------------------------


def test_position_cells_on_a_hand_built_track():
    track = [[0.0, 0.0], [15.9, 16.0], [63.99, 63.99], [40.0, 8.0]]
    assert position_labels(track, [0, 1, 2, 3], size=64, grid=4) == [0, 1, 15, 2 * 4 + 0]
    assert cell_index(63.99, 0.0, size=64, grid=8) == 56


def test_directions_on_a_hand_built_track():
    # 64-px frame: "still" below 0.5 px per frame, the dominant axis otherwise.
    track = [
        [10.0, 10.0],  # 0
        [10.0, 12.0],
        [10.0, 14.0],  # 2: moved right 4 px in 2 frames
        [10.0, 14.2],
        [10.0, 14.4],  # 4: 0.4 px in 2 frames: still
        [7.0, 13.0],
        [4.0, 12.0],  # 6: up 6, left 2: up
        [6.0, 10.0],
        [8.0, 8.0],  # 8: down 4, left 4: a tie counts as horizontal (left)
        [8.0, 3.0],
        [8.0, 62.0],  # 10: left 10 px, through the left edge: left out
        [9.0, 62.0],
        [12.0, 62.0],  # 12: down 4
    ]
    frames = [0, 2, 4, 6, 8, 10, 12]
    assert direction_labels(track, frames, size=64) == [RIGHT, STILL, UP, LEFT, None, DOWN]
    # The still threshold scales with the frame: 0.4 px in 2 frames moves at 16 px.
    assert direction_labels(track, [2, 4], size=16) == [RIGHT]


def test_target_rows_leave_out_edge_crossings_and_keep_identity():
    from vidalign.data.synth import COLORS

    truth = {
        "size": 64,
        "objects": [
            {"color": "blue", "track": [[10.0, 10.0], [10.0, 14.0], [10.0, 18.0]]},
            {"color": "red", "track": [[30.0, 62.0], [30.0, 2.0], [30.0, 6.0]]},
        ],
    }
    features = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # 2 clips, 3 steps
    rows = target_rows(features, [truth, truth], [0, 1, 2], "direction", grid=4)
    # Per clip: blue right, right; red crosses the edge, then right.
    assert rows.labels.tolist() == [RIGHT] * 6
    assert rows.groups.tolist() == [0, 0, 0, 1, 1, 1]
    blue, red = list(COLORS).index("blue"), list(COLORS).index("red")
    assert rows.identity.tolist() == [blue, blue, red] * 2
    assert torch.equal(rows.x[2], torch.cat([features[0, 1], features[0, 2]]))

    rows = target_rows(features, [truth, truth], [0, 1, 2], "position", grid=4)
    assert rows.classes == 16 and len(rows.labels) == 2 * 2 * 3
    assert rows.labels[:3].tolist() == [0, 0, 1]  # blue: col 10, 14, 18 of 64
    with pytest.raises(InvalidInput, match="expected"):
        target_rows(features[:1], [truth, truth], [0, 1, 2], "position", grid=4)


def test_step_frames_follow_the_students_sampling():
    assert step_frames(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert step_frames(16, 8, frames_per_step=2) == [0, 4, 9, 13]  # Qwen2.5-VL's temporal patches


# --- the command -----------------------------------------------------------------------------


def test_probe_features_choices_match_the_library():
    assert set(PROBE_FEATURES) == set(FEATURES)


def test_vidalign_probe_on_the_random_init_tiny_student(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--clips", "12", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["student"] == "tiny-videollava" and report["grid"] == 4
    assert report["clips"] == {"train": 12, "held_out": 6, "seed": 0, "frames": 16, "size": 64}
    results = {(r["target"], r["source"]): r for r in report["results"]}
    sources = ("F_V frame", "F_V grid:4", "LLM tokens grid:4")
    assert set(results) == {(t, s) for t in ("position", "direction") for s in sources}
    for (target, _), r in results.items():
        assert r["uniform"] == pytest.approx(1 / 16 if target == "position" else 1 / 5)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["noise_accuracy"] <= 1 and 0 <= r["majority"] <= 1
        assert r["train_rows"] > 0 and r["test_rows"] > 0
    assert results[("position", "F_V grid:4")]["dims"] == 16 * 32  # 4 x 4 tokens of d_v = 32
    printed = capsys.readouterr().out
    assert "LLM tokens grid:4" in printed and "noise" in printed

    # The same student through a stage-2 encoder artifact holding its own weights: the same
    # F_V numbers (deterministic), from the artifact or the stage-2 output.dir above it.
    from safetensors.torch import save_file

    from vidalign.store import commit_artifact, open_store
    from vidalign.students import load_student

    weights = tmp_path / "encoder.safetensors"
    save_file(load_student("tiny-videollava").state_dict(), weights)
    commit_artifact(
        open_store(str(tmp_path / "stage2")),
        "encoder",
        {"encoder.safetensors": weights},
        producer="test",
        meta={"student": "tiny-videollava"},
    )
    again = tmp_path / "again"
    assert (
        main(
            [
                "probe",
                "--clips",
                "12",
                "6",
                "--features",
                "fv",
                "--encoder",
                str(tmp_path / "stage2"),
                "--out",
                str(again),
            ]
        )
        == 0
    )
    fv = {
        (r["target"], r["source"]): r
        for r in json.loads((again / "probe.json").read_text())["results"]
    }
    assert fv == {k: v for k, v in results.items() if k[1].startswith("F_V")}

    capsys.readouterr()
    assert (
        main(["probe", "--student", "tiny-qwen2.5-vl", "--encoder", str(tmp_path / "stage2")]) == 2
    )
    assert "trained for student 'tiny-videollava'" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--student", "no-such-student"], "is not registered"),
        (["--grid", "1"], "grid: expected an integer >= 2"),
        (["--clips", "1", "4"], "clips (training): expected an integer >= 2"),
        (["--pool", "0"], "pool: expected an integer >= 1"),
        (["--pool", "9", "--features", "llm"], "pool: expected 1..4"),
        (["--weights", "/no/such/dir"], "--weights /no/such/dir: no config.json"),
        (["--encoder", "/no/such/run"], "--encoder /no/such/run: no encoder.safetensors"),
    ],
)
def test_vidalign_probe_errors_are_one_line(argv, message, capsys):
    assert main(["probe", "--clips", "4", "2", *argv]) == 2
    assert message in error_line(capsys.readouterr().err)
