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


ARMS = {  # motion accuracy, static accuracy
    "baseline": (0.3, 0.8), "vda": (0.5, 0.8), "ctrl-mismatch": (0.4, 0.6),
    "ctrl-random-teacher": (0.2, 0.8), "ctrl-no-teacher": (0.35, 0.8), "oracle-ceiling": (0.6, 0.7),
    "motionenhancer": (0.3, 1.0), "ctrl-sft-no-align": (0.4, 0.8),
}


def _arms(cats, names=tuple(ARMS)) -> dict:
    return {name: _summary(dict.fromkeys(cats, ARMS[name][0]), ARMS[name][1]) for name in names}


def test_report_headline_is_against_the_best_control():
    from vidalign_cli.demo import headline, headline_text, main_summary, results_table

    cats = MOTION_CATEGORIES[:2]
    evals = _arms(cats)
    h = headline(evals)
    assert h["vda"]["best_control"] == "ctrl-mismatch"  # the ceiling is no control
    assert h["vda"]["motion_vs_best_control"] == pytest.approx(10.0)
    assert h["vda"]["motion_vs_baseline"] == pytest.approx(20.0)
    assert h["vda"]["static_vs_baseline"] == pytest.approx(0.0)
    assert h["motionenhancer"]["motion_vs_control"] == pytest.approx(-10.0)
    assert h["motionenhancer"]["static_vs_baseline"] == pytest.approx(20.0)
    assert "+10.0 points" in headline_text(h) and "(mismatch)" in headline_text(h)
    assert h["oracle_ceiling"]["motion_vs_no_teacher"] == pytest.approx(25.0)
    assert h["oracle_ceiling"]["static_vs_baseline"] == pytest.approx(-10.0)
    assert "oracle ceiling minus stage 3 alone (no teacher): +25.0 points" in headline_text(h)

    table = results_table(evals).splitlines()
    assert table[0].startswith("| category | n | baseline | +VDA | mismatch |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows[cats[0]].split(" | ")[1:4] == ["10", "30.0", "50.0"]
    assert rows[f"{STATIC_CATEGORY} (control)"].split(" | ")[1] == "5"
    assert "Overall (motion, micro)" in rows and "Average (motion, macro)" in rows

    summary = main_summary([{"evals": evals}, {"evals": {**evals, "vda": _summary(dict.fromkeys(cats, 0.7), 0.8)}}])
    vda_row = next(line for line in summary.splitlines() if line.startswith("| +VDA |"))
    assert "60.0 ± 14.1" in vda_row and vda_row.endswith("| 2 |")


def test_seeds_summary_gives_every_gate_and_headline_per_seed():
    from vidalign_cli.demo import headline_over_seeds, seeds_summary
    from vidalign_cli.diagnostics import Diagnostic, Gate, diagnostics_over_seeds

    cats = MOTION_CATEGORIES[:2]
    base = _arms(cats, ("baseline", "vda", "ctrl-mismatch", "ctrl-no-teacher", "oracle-ceiling"))
    # Seed 1: the mismatch control falls below stage 3 alone, so the best control changes.
    other = {**base, "ctrl-mismatch": _summary(dict.fromkeys(cats, 0.2), 0.6)}
    gap = Gate(">=", 0.05)
    seed0 = [Diagnostic("gap", 0.06, gap, "w"), Diagnostic("reads", 0.9, Gate(">=", 0.85), "w"),
             Diagnostic("probe", 0.02, Gate(">", 0.05, unit="points", basis="2 se"), "w")]
    seed1 = [Diagnostic("gap", 0.02, gap, "w"),  # and no "reads"
             Diagnostic("probe", 0.06, Gate(">", 0.04, unit="points", basis="2 se"), "w")]
    runs = [{"evals": base, "diagnostics": [d.to_dict() for d in seed0]},
            {"evals": other, "diagnostics": [d.to_dict() for d in seed1]}]

    table = diagnostics_over_seeds({0: seed0, 1: seed1}).splitlines()
    assert table[0] == "| diagnostic | threshold | seed 0 | seed 1 | passed |"
    assert table[2] == "| gap | >= 5.0% | 6.0% PASS | 2.0% WARN | 1 of 2 |"
    assert table[3] == "| reads | >= 85.0% | 90.0% PASS | - | 1 of 2 |"
    # A bound computed from each seed's data is given with each value.
    assert table[4] == ("| probe | per seed | +2.0 points WARN (> +5.0 points (2 se)) | "
                        "+6.0 points PASS (> +4.0 points (2 se)) | 1 of 2 |")

    heads = {line.split(" | ")[0].lstrip("| "): line for line in
             headline_over_seeds(runs, [0, 1]).splitlines()[2:]}
    # seed 0: 50 - 40 (mismatch); seed 1: 50 - 35 (no teacher); mean 12.5, sd 3.5
    assert heads["+VDA minus its best control"] == (
        "| +VDA minus its best control | +10.0 (mismatch) | +15.0 (no teacher) | 12.5 ± 3.5 |")
    assert heads["oracle ceiling minus stage 3 alone (no teacher)"].endswith("| 25.0 ± 0.0 |")
    assert "+MotionEnhancer minus SFT without alignment" not in heads  # no such arm ran

    summary = seeds_summary(runs, [0, 1])
    assert summary.startswith("over seeds 0 1\n\ndiagnostics:\n\n| diagnostic |")
    assert "by letter (MotionBench's rule):" in summary and "| +VDA | 50.0 ± 0.0 |" in summary
    assert "likelihood" not in summary  # no run scored it
    with pytest.raises(ValueError, match="2 runs for 3 seeds"):
        seeds_summary(runs, [0, 1, 2])


# --- the diagnostics ------------------------------------------------------------------------


def test_gate_verdicts_and_formatting():
    import math

    from vidalign_cli.diagnostics import Gate

    gate = Gate(">=", 0.85)
    assert gate.passes(0.85) and gate.passes(0.9) and not gate.passes(0.84)
    assert not gate.passes(math.nan)  # a value that could not be measured never passes
    assert gate.text == ">= 85.0%" and gate.format(0.5) == "50.0%" and gate.format(math.nan) == "n/a"
    strict = Gate(">", 0.0, digits=3)
    assert not strict.passes(0.0) and strict.passes(1e-4) and strict.text == "> 0.000%"
    points = Gate(">", 0.031, unit="points", basis="2 se")
    assert points.format(-0.012) == "-1.2 points" and points.text == "> +3.1 points (2 se)"
    with pytest.raises(InvalidInput, match="op must be"):
        Gate("=>", 0.1)
    with pytest.raises(InvalidInput, match="unit must be"):
        Gate(">", 0.1, unit="pct")


def test_diagnostic_lines_table_and_summary():
    import math

    from vidalign_cli.diagnostics import Diagnostic, Gate, diagnostics_table, gates_summary

    ok = Diagnostic("reads the video", 0.9, Gate(">=", 0.85), "does not read it", {"n": 3})
    bad = Diagnostic("teacher gap", 0.001, Gate(">=", 0.05, digits=2), "the teacher ignores F_V")
    unmeasured = Diagnostic("no static questions", math.nan, Gate("<=", 0.5), "not measured")
    assert (ok.verdict, bad.verdict, unmeasured.verdict) == ("PASS", "WARN", "WARN")
    assert ok.line() == "PASS reads the video: 90.0% (threshold >= 85.0%)"
    assert bad.line() == "WARN teacher gap: 0.10% (threshold >= 5.00%): the teacher ignores F_V"
    record = bad.to_dict()
    assert record["verdict"] == "WARN" and record["value"] == 0.001
    assert record["threshold"] == {"op": ">=", "bound": 0.05, "text": ">= 5.00%", "unit": "%",
                                   "digits": 2, "basis": ""}
    again = Diagnostic.from_dict(record)  # what `demo --seeds` reads back from each run
    assert again.line() == bad.line() and again.detail == bad.detail
    assert math.isnan(Diagnostic.from_dict(unmeasured.to_dict()).value)
    assert unmeasured.to_dict()["value"] is None  # JSON has no NaN
    table = diagnostics_table([ok, bad]).splitlines()
    assert table[0] == "| diagnostic | value | threshold | verdict |"
    assert table[2:] == ["| reads the video | 90.0% | >= 85.0% | PASS |",
                         "| teacher gap | 0.10% | >= 5.00% | WARN |"]
    assert gates_summary([ok, bad, unmeasured]) == (
        "1 of 3 diagnostic gates passed; failed:\n\n- teacher gap: the teacher ignores F_V\n"
        "- no static questions: not measured\n")
    assert gates_summary([ok]) == "1 of 1 diagnostic gates passed.\n"


def _score_dict(motion: float, static: float) -> dict:
    """A ``score_dict``-shaped record: every motion category at ``motion``, the static at ``static``."""
    return _summary(dict.fromkeys(MOTION_CATEGORIES, motion), static)


def test_student_diagnostics_read_the_baseline_eval():
    from vidalign_cli.diagnostics import student_diagnostics

    summary = {**_score_dict(0.25, 0.3), "likelihood": _score_dict(0.3, 0.9),
               "substitution": {
                   "letter": {"accuracy": _score_dict(0.25, 0.3), "same_choice": _score_dict(1.0, 1.0)},
                   "likelihood": {"accuracy": _score_dict(0.25, 0.2),
                                  "same_choice": _score_dict(0.4, 0.6)}}}
    static, substitution = student_diagnostics(summary)
    assert static.value == pytest.approx(0.9) and static.verdict == "PASS"
    assert static.detail == {"static_letter": pytest.approx(0.3)}
    # 60% of the static answers unchanged with another clip's video: above 50%, a WARN.
    assert substitution.value == pytest.approx(0.6) and substitution.verdict == "WARN"
    assert substitution.detail["static_accuracy_with_other_video"] == pytest.approx(0.2)
    assert substitution.detail["static_same_choice_letter"] == pytest.approx(1.0)
    with pytest.raises(InvalidInput, match="without an option scorer"):
        student_diagnostics({**summary, "substitution": None})


def test_ceiling_diagnostic_against_two_standard_errors_of_the_difference_with_stage3_alone():
    import math

    from vidalign_cli.diagnostics import ceiling_diagnostic

    # Six motion categories of 10 questions each; stage 3 alone gets 3 of 10 in each. With the
    # ceiling at 5 of 10 the pooled accuracy is 0.4 in each category, so the standard error
    # of the difference of the two macro averages is sqrt(6 * 2 * 0.4 * 0.6 / 10) / 6.
    control = {"likelihood": _score_dict(0.3, 0.9)}
    se = math.sqrt(6 * 2 * 0.4 * 0.6 / 10) / 6
    assert se == pytest.approx(0.0894, abs=1e-4)
    found = ceiling_diagnostic({"likelihood": _score_dict(0.5, 0.9)}, control, 0.25)
    assert found.value == pytest.approx(0.2) and found.gate.bound == pytest.approx(2 * se)
    assert found.verdict == "PASS"  # 0.2 > 0.179
    assert found.detail["stage3_alone"] == pytest.approx(0.3)
    assert found.detail["ceiling_over_chance"] == pytest.approx(0.25)
    # 4 of 10: pooled 0.35, se = sqrt(6 * 2 * 0.35 * 0.65 / 10) / 6 = 0.0871; 0.1 < 0.174.
    below = ceiling_diagnostic({"likelihood": _score_dict(0.4, 0.9)}, control, 0.25)
    assert below.gate.bound == pytest.approx(2 * math.sqrt(6 * 2 * 0.35 * 0.65 / 10) / 6)
    assert below.verdict == "WARN" and "no teacher could show a gain" in below.line()
    # Far above chance but no better than stage 3 alone: the student's, not the supervision's.
    same = ceiling_diagnostic({"likelihood": _score_dict(0.3, 0.9)}, control, 0.25)
    assert same.value == pytest.approx(0.0) and same.verdict == "WARN"
    with pytest.raises(InvalidInput, match="without an option scorer"):
        ceiling_diagnostic(_score_dict(0.9, 0.9), control, 0.25)
    with pytest.raises(InvalidInput, match="chance"):
        ceiling_diagnostic({"likelihood": _score_dict(0.9, 0.9)}, control, 1.0)
    fewer = {"likelihood": _score_dict(0.3, 0.9)}
    next(iter(fewer["likelihood"]["categories"].values()))["n"] = 9
    with pytest.raises(InvalidInput, match="same questions"):
        ceiling_diagnostic({"likelihood": _score_dict(0.5, 0.9)}, fewer, 0.25)


def _probe_report(rows: dict[tuple[str, str], tuple[float, float]]):
    """A ProbeReport: (target, source) -> (accuracy, stderr); chance 5% majority, 6.25% uniform."""
    from vidalign.probe import ProbeReport, ProbeRow, ProbeScore

    def score(accuracy: float, stderr: float) -> ProbeScore:
        return ProbeScore(accuracy, stderr, 1.0, majority=0.05, uniform=0.0625, classes=16,
                          train_rows=100, test_rows=50)

    return ProbeReport({}, [ProbeRow(t, s, 64, score(*v), score(0.06, 0.01))
                            for (t, s), v in rows.items()])


def test_probe_diagnostics_headroom_llm_tokens_and_change():
    from vidalign_cli.demo import HEADERS
    from vidalign_cli.diagnostics import (
        PROBE_FV,
        PROBE_LLM,
        probe_change_diagnostic,
        probe_diagnostics,
        probe_table,
    )

    base = _probe_report({("position", PROBE_FV): (0.4, 0.01), ("direction", PROBE_FV): (0.085, 0.02),
                          ("position", PROBE_LLM): (0.4, 0.02)})
    headroom, llm = probe_diagnostics(base)
    # Headroom is F_V's direction (its position may be high: the LLM must read it).
    # Over chance = over the larger of majority (5%) and uniform (6.25%).
    assert headroom.value == pytest.approx(0.0225) and headroom.verdict == "PASS"
    assert "direction" in headroom.name and headroom.detail["chance"] == pytest.approx(0.0625)
    assert llm.value == pytest.approx(0.3375) and llm.verdict == "PASS"
    saturated = _probe_report({("direction", PROBE_FV): (0.3, 0.01), ("position", PROBE_LLM): (0.1, 0.01)})
    assert [d.verdict for d in probe_diagnostics(saturated)] == ["WARN", "WARN"]

    reports = {"baseline": base,
               "vda": _probe_report({("position", PROBE_FV): (0.45, 0.03), ("direction", PROBE_FV): (0.25, 0.02)}),
               "ctrl-mismatch": _probe_report({("position", PROBE_FV): (0.38, 0.04),
                                               ("direction", PROBE_FV): (0.2, 0.02)})}
    change = probe_change_diagnostic(reports, "vda", "ctrl-mismatch", HEADERS)
    # 7 points against 2 se of the difference: 2 * hypot(3, 4) = 10 points.
    assert change.value == pytest.approx(0.07) and change.gate.bound == pytest.approx(0.10)
    assert change.verdict == "WARN" and "mismatch" in change.name
    table = probe_table(reports, HEADERS).splitlines()
    assert table[0] == f"| run | {PROBE_FV} position | change | {PROBE_FV} direction | change |"
    assert table[2] == "| baseline | 40.0 ± 1.0 | +0.0 | 8.5 ± 2.0 | +0.0 |"
    assert table[3] == "| +VDA | 45.0 ± 3.0 | +5.0 | 25.0 ± 2.0 | +16.5 |"
    assert table[-1] == "| chance (majority / uniform) | 5.0 / 6.2 |  | 5.0 / 6.2 |  |"
    with pytest.raises(InvalidInput, match="no direction row"):
        probe_diagnostics(_probe_report({("position", PROBE_FV): (0.1, 0.01)}))


def test_teacher_gap_diagnostics_and_their_tables():
    from vidalign.gap import Gap
    from vidalign.motionenhancer.diagnostics import CaptionGap, CaptionGapAt
    from vidalign_cli.diagnostics import (
        ORACLE_SOURCE,
        animatediff_gap_diagnostic,
        cogvideox_gap_diagnostics,
        cogvideox_gap_text,
        feature_gap_diagnostics,
        feature_gap_text,
    )

    gaps = {"other_clip": [Gap(500, 1.0, 1.1), Gap(750, 2.0, 2.0)],
            "first_frame": [Gap(500, 1.0, 1.0), Gap(750, 2.0, 2.0)],
            "reversed": [Gap(500, 1.0, 1.01), Gap(750, 2.0, 2.02)]}
    other, reversed_ = feature_gap_diagnostics(gaps)
    assert other.value == pytest.approx(0.05) and other.verdict == "PASS"  # (10% + 0%) / 2
    assert reversed_.value == pytest.approx(0.01) and reversed_.verdict == "WARN"
    assert "order of F_V" in reversed_.warning
    assert reversed_.detail["mean_relative"]["first_frame"] == 0.0
    assert reversed_.detail["timesteps"] == [500, 750]
    text = feature_gap_text(gaps).splitlines()
    assert text[2].split() == ["timestep", "own", "F_V", "other_clip", "first_frame", "reversed"]
    assert text[3].split() == ["500", "1.00000", "+10.000%", "+0.000%", "+1.000%"]
    # The oracle's gate: the same numbers, named for its features, with its own warning.
    oracle, _ = feature_gap_diagnostics(gaps, ORACLE_SOURCE)
    assert oracle.value == other.value and "oracle features" in oracle.name
    assert "no encoder can teach" in oracle.warning and "oracle features" not in other.name
    assert feature_gap_text(gaps, ORACLE_SOURCE).splitlines()[1].startswith(
        "feature gap of the VDA teacher (oracle features")

    # Only the alignment timesteps count; none there: not measured, a WARN.
    caption = [Gap(100, 1.0, 2.0), Gap(500, 1.0, 1.02), Gap(900, 1.0, 1.0)]
    animatediff = animatediff_gap_diagnostic(caption, [500, 1000])
    assert animatediff.value == pytest.approx(0.01) and animatediff.verdict == "PASS"
    assert animatediff.name.endswith("(t in [500, 1000))")
    assert animatediff_gap_diagnostic(caption[:1], [500, 1000]).verdict == "WARN"

    cog = CaptionGap((CaptionGapAt(300, 1.0, 1.02, 1.0), CaptionGapAt(700, 2.0, 2.02, 1.99)),
                     clips=4, seeds=(0, 1))
    other_caption, swapped = cogvideox_gap_diagnostics(cog)
    assert other_caption.value == pytest.approx(0.015) and other_caption.verdict == "PASS"
    assert swapped.value == pytest.approx(-0.0025) and swapped.verdict == "WARN"
    assert swapped.gate.text == "> 0.000%" and "caption" in swapped.warning
    assert cogvideox_gap_text(cog).splitlines()[3].split() == [
        "300", "1.00000", "1.02000", "1.00000", "+2.000%", "+0.000%"]


def test_every_metric_gets_a_table_and_headline():
    from vidalign_cli.demo import DemoConfig, accuracy_tables, headline

    cats = MOTION_CATEGORIES[:2]
    evals = {}
    for name, motion in (("baseline", 0.3), ("vda", 0.5), ("ctrl-mismatch", 0.4)):
        summary = _summary(dict.fromkeys(cats, motion), 0.8)
        evals[name] = {**summary, "named": summary, "likelihood": _summary(dict.fromkeys(cats, motion / 2), 0.9)}
    assert headline(evals, "likelihood")["vda"]["motion_vs_best_control"] == pytest.approx(5.0)
    tables = accuracy_tables(evals)
    assert tables.index("by letter") < tables.index("by the option text named") < tables.index(
        "by option likelihood")
    assert "+5.0 points of motion average" in tables.split("by option likelihood")[1]
    # An eval without likelihood (older results) gets no likelihood table.
    del evals["vda"]["likelihood"]
    assert "by option likelihood" not in accuracy_tables(evals)
    with pytest.raises(ValueError, match="ran no stage 2"):
        DemoConfig(probe_arms=["vda", "ctrl-no-teacher"])
    with pytest.raises(ValueError, match="workers: expected >= 1, got 0"):
        DemoConfig(workers=0)


def test_side_by_side_keeps_order_runs_one_thread_workers_and_raises():
    import math

    import torch

    from vidalign_cli.demo import arm_pool, side_by_side

    calls = [(math.sqrt, (4.0,)), (torch.get_num_threads, ()), (math.sqrt, (9.0,))]
    with arm_pool(1) as pool:
        assert pool is None  # one worker: in this process, on its threads
        assert side_by_side(pool, calls) == [2.0, torch.get_num_threads(), 3.0]
    with arm_pool(2) as pool:
        assert side_by_side(pool, calls) == [2.0, 1, 3.0]  # a worker computes on one thread
        with pytest.raises(ValueError, match="math domain error"):
            side_by_side(pool, [(math.sqrt, (1.0,)), (math.sqrt, (-1.0,))])
        assert side_by_side(pool, [(math.sqrt, (16.0,))]) == [4.0]  # the pool survives a failure


def test_demo_command_with_seeds_writes_the_summary(tmp_path, monkeypatch, capsys):
    from vidalign_cli import demo
    from vidalign_cli.diagnostics import Diagnostic, Gate
    from vidalign_cli.main import main

    ran = []

    def fake_run_demo(out, config):  # the arms' numbers, not a run: the command's wiring
        ran.append((out, config.seed, config.stage2_steps))
        gap = Diagnostic("gap", 0.06 - 0.03 * config.seed, Gate(">=", 0.05), "w")
        return {"evals": _arms(MOTION_CATEGORIES[:2]), "diagnostics": [gap.to_dict()]}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--seeds", "0", "1", "--out", str(tmp_path), "--set", "stage2_steps=3"]) == 0
    assert ran == [(tmp_path / "seed-0", 0, 3), (tmp_path / "seed-1", 1, 3)]
    summary = (tmp_path / "summary.md").read_text()
    assert "| gap | >= 5.0% | 6.0% PASS | 3.0% WARN | 1 of 2 |" in summary
    assert "| +VDA minus its best control | +10.0 (mismatch) | +10.0 (mismatch) | 10.0 ± 0.0 |" in summary
    assert summary in capsys.readouterr().out


def test_vda_arms_take_the_demo_projection_conditioning_and_student_view(tmp_path):
    import json

    from vidalign.errors import FailedPrecondition
    from vidalign_cli.demo import DemoConfig, student_view_size, vda_configs

    student = tmp_path / "videollm"
    (student / "model").mkdir(parents=True)
    (student / "model" / "config.json").write_text(json.dumps({"vision_config": {"image_size": 64}}))
    for projection in ("mlp", "linear"):
        config = DemoConfig(projection=projection) if projection == "linear" else DemoConfig()
        stages = vda_configs(tmp_path / "vda", config, tmp_path / "train",
                             teacher_weights=tmp_path / "t", student_weights=student)
        adapter = stages["stage1"].adapter
        assert (adapter.projection, adapter.conditioning) == (projection, "spatial")
        assert stages["stage1"].train.steps == config.stage1_steps
        # The student sees clips at its own size (64), the teachers at theirs (config.size, 32).
        assert stages["stage2"].data.size == stages["stage3"].data.size == 64 != config.size
    assert student_view_size(DemoConfig(student_size=48), student) == 48  # set: no config read
    with pytest.raises(FailedPrecondition, match="set student_size"):
        student_view_size(DemoConfig(), tmp_path / "no-student")
    with pytest.raises(ValueError, match="student_size: expected >= 0"):
        DemoConfig(student_size=-1)
