"""The demo's building blocks: SynthMotion training sets, motion-word swaps, charts, the report."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vidalign.data.benchmarks import load_benchmark
from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY, generate, write_dataset
from vidalign.data.synthset import load_synth_set
from vidalign.errors import InvalidInput
from vidalign.eval.answers import parse_motionbench_answer
from vidalign.gap import swap_motion_words
from vidalign.plots import line_chart, moving_average


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(generate(5, seed=7, frames=8, size=64), root)
    return root


def test_synth_set_trains_on_exactly_the_evaluated_prompts(synth_dir):
    data = load_synth_set(synth_dir, frames=8, size=32)
    assert data.videos.shape == (5, 8, 32, 32, 3) and str(data.videos.dtype) == "torch.uint8"
    items = load_benchmark("motionbench", synth_dir).items
    # One training example per evaluated question, with its prompt, letter and clip.
    assert sorted((q.prompt, q.answer) for q in data.qa) == sorted((i.prompt, i.answer) for i in items)
    assert all(q.answer in "ABCD" for q in data.qa)
    # The taught reply names the option and scores as its letter under MotionBench's rule.
    for q in data.qa:
        assert parse_motionbench_answer(q.target) == q.answer
        assert q.target.endswith(f"({q.answer})") and f"{q.answer}. {q.target[:-4]}" in q.prompt
    by_clip = {}
    for item in items:
        by_clip.setdefault(item.video_path.name, set()).add(item.prompt)
    for q in data.qa:
        assert q.prompt in by_clip[f"{data.ids[q.clip]}.mp4"]
    assert {q.category for q in data.qa} == {*MOTION_CATEGORIES, STATIC_CATEGORY}


def test_synth_set_takes_the_first_clips(synth_dir):
    data = load_synth_set(synth_dir, num_clips=2, frames=4, size=16)
    assert len(data) == 2 and data.videos.shape[:2] == (2, 4)
    assert {q.clip for q in data.qa} == {0, 1}
    with pytest.raises(InvalidInput, match="num_clips"):
        load_synth_set(synth_dir, num_clips=-1)


def test_swap_motion_words():
    caption = ("A red cross on a plain gray background. The red cross first slides left, then grows "
               "larger. The blue ring moves back and forth vertically. The camera pans up.")
    assert swap_motion_words(caption) == (
        "A red cross on a plain gray background. The red cross first slides right, then shrinks. "
        "The blue ring moves back and forth horizontally. The camera pans down."
    )
    # One pass: a swapped word is not swapped back.
    assert swap_motion_words("left right") == "right left"
    # Whole words only.
    assert swap_motion_words("upright, moves up") == "upright, moves down"
    with pytest.raises(InvalidInput, match="no direction"):
        swap_motion_words("a red square on a gray background")


def test_every_synth_caption_has_a_wrong_motion_twin():
    for clip in generate(20, seed=3, frames=8, size=32):
        wrong = swap_motion_words(clip.caption)
        assert wrong != clip.caption and wrong.startswith(clip.caption[:20])


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(InvalidInput):
        moving_average([1.0], 0)


def test_line_chart_draws_one_panel_per_series():
    image = line_chart({"a": [3.0, 2.0, 1.0], "b": [1.0], "empty": []}, "losses", columns=2)
    assert image.size == (2 * 420, 220 + 28)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).size == image.size
    # The curve is drawn: some pixels of the first panel's plot area are blue.
    pixels = image.crop((64, 58, 404, 220)).getdata()
    assert any(b > 150 and r < 100 for r, g, b in pixels)
    with pytest.raises(InvalidInput, match="no series"):
        line_chart({"empty": []}, "nothing")


def _summary(motion: dict[str, float], static: float) -> dict:
    categories = {c: {"n": 10, "correct": round(10 * a), "accuracy": a} for c, a in motion.items()}
    categories[STATIC_CATEGORY] = {"n": 5, "correct": round(5 * static), "accuracy": static}
    average = sum(motion.values()) / len(motion)
    return {"n": 10 * len(motion), "overall": average, "average": average, "categories": categories}


def test_report_headline_is_against_the_best_control():
    from vidalign_cli.demo import headline, headline_text, main_summary, results_table

    cats = MOTION_CATEGORIES[:2]
    evals = {
        "baseline": _summary(dict.fromkeys(cats, 0.3), 0.8),
        "vda": _summary(dict.fromkeys(cats, 0.5), 0.8),
        "ctrl-mismatch": _summary(dict.fromkeys(cats, 0.4), 0.6),
        "ctrl-random-teacher": _summary(dict.fromkeys(cats, 0.2), 0.8),
        "ctrl-no-teacher": _summary(dict.fromkeys(cats, 0.35), 0.8),
        "motionenhancer": _summary(dict.fromkeys(cats, 0.3), 1.0),
        "ctrl-sft-no-align": _summary(dict.fromkeys(cats, 0.4), 0.8),
    }
    h = headline(evals)
    assert h["vda"]["best_control"] == "ctrl-mismatch"
    assert h["vda"]["motion_vs_best_control"] == pytest.approx(10.0)
    assert h["vda"]["motion_vs_baseline"] == pytest.approx(20.0)
    assert h["vda"]["static_vs_baseline"] == pytest.approx(0.0)
    assert h["motionenhancer"]["motion_vs_control"] == pytest.approx(-10.0)
    assert h["motionenhancer"]["static_vs_baseline"] == pytest.approx(20.0)
    assert "+10.0 points" in headline_text(h) and "(mismatch)" in headline_text(h)

    table = results_table(evals).splitlines()
    assert table[0].startswith("| category | n | baseline | +VDA | mismatch |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows[cats[0]].split(" | ")[1:4] == ["10", "30.0", "50.0"]
    assert rows[f"{STATIC_CATEGORY} (control)"].split(" | ")[1] == "5"
    assert "Overall (motion, micro)" in rows and "Average (motion, macro)" in rows

    summary = main_summary([{"evals": evals}, {"evals": {**evals, "vda": _summary(dict.fromkeys(cats, 0.7), 0.8)}}])
    vda_row = next(line for line in summary.splitlines() if line.startswith("| +VDA |"))
    assert "60.0 ± 14.1" in vda_row and vda_row.endswith("| 2 |")
