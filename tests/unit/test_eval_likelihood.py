"""Option-likelihood scoring, the video-substitution check and the answer distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.support.numerics import TINY_VLM_TERMS, assert_fp32_close
from tests.unit.test_loaders import FIXTURES, make_videos
from vidalign.data.benchmarks import LETTERS, QAItem, load_benchmark, load_motionbench
from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY, generate, write_dataset
from vidalign.errors import InvalidInput
from vidalign.eval import (
    BASELINES,
    answer_distribution,
    check_option_scores,
    choose_option,
    chosen_option,
    comparison_table,
    derangement,
    evaluate,
    result_dict,
    score_outputs,
    videollm_option_scorer,
    write_result,
)

STUDENTS = ["tiny-videollava", "tiny-llava-next-video", "tiny-qwen2.5-vl", "tiny-internvl3"]
ORACLE = BASELINES["oracle"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[QAItem]:
    """4 SynthMotion clips, 9 questions each (6 motion, 3 static)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(generate(4, seed=3, frames=8, size=32), root)
    return load_motionbench(root).items


@pytest.fixture(scope="module")
def videollava():
    """The random-init tiny Video-LLaVA student (loaded once: most of a test's time)."""
    from vidalign.students.videollm import load_videollm

    return load_videollm("tiny-videollava")


def always_a(items, videos):
    return ["A"] * len(items)


def _index(item: QAItem) -> int:
    return LETTERS.index(item.answer)


# -- the argmax and its tie rule --------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "best"),
    [
        ([-3.0, -1.0, -2.0], 1),
        ([-1.0, -1.0, -2.0], 0),  # tie: the first option
        ([-2.0, -1.0, -1.0, -1.0], 1),  # tie: the lowest index among the best
        ([-math.inf, -math.inf], 0),  # everything ruled out: still the first option
        ([-math.inf, -5.0], 1),
        ([0.0], 0),
    ],
)
def test_choose_option_is_the_argmax_and_ties_go_to_the_first(scores, best):
    assert choose_option(scores) == best


def test_option_scores_are_checked(synth):
    item = synth[0]
    assert check_option_scores(item, [-1, -2.5, np.float32(-3), -math.inf]) == (
        -1.0, -2.5, -3.0, -math.inf,
    )
    assert check_option_scores(item, np.array([-1.0, -2.0, -3.0, -4.0])) == (-1.0, -2.0, -3.0, -4.0)
    for bad, match in (
        ([-1.0, -2.0], "2 scores for .* which has 4 options"),
        ([-1.0, math.nan, -1.0, -1.0], "expected finite or -inf"),
        ([-1.0, math.inf, -1.0, -1.0], "expected finite or -inf"),
        (["a", -1.0, -1.0, -1.0], "is str"),
        ("abcd", "not a sequence"),
    ):
        with pytest.raises(InvalidInput, match=match):
            check_option_scores(item, bad)
    with pytest.raises(InvalidInput, match="empty"):
        choose_option([])


# -- likelihood accuracy with known option scores ----------------------------------------------


def known_scores(items, videos):
    """Question j: the right option best (j % 3 == 0), a wrong one best (1), or a tie (2)."""
    out = []
    for item in items:
        j, right = int(item.uid.rsplit("-", 1)[-1]), _index(item)
        if j % 3 == 0:
            out.append([-1.0 if k == right else -2.0 for k in range(len(item.options))])
        elif j % 3 == 1:
            wrong = (right + 1) % len(item.options)
            out.append([-1.0 if k == wrong else -2.0 for k in range(len(item.options))])
        else:
            out.append([-0.5] * len(item.options))
    return out


def test_likelihood_accuracy_is_exact_with_known_scores(synth):
    result = evaluate(synth, always_a, option_scorer=known_scores, batch_size=5, frames=4,
                      progress=False)
    expected: dict[str, list[int]] = {}
    for item in synth:
        j = int(item.uid.rsplit("-", 1)[-1])
        right = j % 3 == 0 or (j % 3 == 2 and item.answer == "A")  # a tie picks A
        expected.setdefault(item.category, [0, 0])
        expected[item.category][0] += 1
        expected[item.category][1] += right
    lk = result.likelihood
    assert {c: (s.n, s.correct) for c, s in lk.categories.items()} == {
        c: tuple(v) for c, v in expected.items()
    }
    motion = [v for c, v in expected.items() if c != STATIC_CATEGORY]
    assert lk.overall == pytest.approx(sum(v[1] for v in motion) / sum(v[0] for v in motion))
    assert lk.average == pytest.approx(sum(v[1] / v[0] for v in motion) / len(motion))
    for p, item in zip(result.predictions, synth, strict=True):
        j = int(item.uid.rsplit("-", 1)[-1])
        assert len(p.option_scores) == len(item.options)
        assert p.likelihood_choice == (
            item.answer if j % 3 == 0 else LETTERS[(_index(item) + 1) % 4] if j % 3 == 1 else "A"
        )
        assert (p.choice, p.answer_letter) == ("A", item.answer)
    # The letter rule is untouched by the option scorer.
    assert result.score == evaluate(synth, always_a, frames=4, progress=False).score
    assert "mean" not in result.likelihood_method  # a plain function: no method of its own


def test_unanswered_questions_count_as_wrong_by_likelihood_too(synth):
    scores = {i.uid: [0.0 if k == _index(i) else -1.0 for k in range(4)] for i in synth[:9]}
    result = score_outputs(synth, {}, option_scores=scores)
    assert result.likelihood.n == result.score.n
    assert result.likelihood.overall == pytest.approx(6 / 24)  # the first clip's 6 motion questions
    assert [p.likelihood_choice for p in result.predictions[9:]] == [""] * 27
    with pytest.raises(InvalidInput, match="not among the items"):
        score_outputs(synth, {}, option_scores={"nope": [0.0] * 4})


def test_the_option_scorer_contract_is_checked(synth):
    with pytest.raises(InvalidInput, match="option scorer: expected a list of 2 score lists"):
        evaluate(synth[:2], always_a, option_scorer=lambda items, v: [[0.0] * 4], frames=4,
                 progress=False)
    with pytest.raises(InvalidInput, match="3 scores for"):
        evaluate(synth[:2], always_a, option_scorer=lambda items, v: [[0.0] * 3 for _ in items],
                 frames=4, progress=False)


def test_open_ended_benchmarks_refuse_likelihood_and_substitution(tmp_path):
    msvd_dir = tmp_path / "msvd"
    make_videos([msvd_dir / "-4wsuPCjDBc_5_15.avi", msvd_dir / "0lh_UWF9ZP4_62_69.mp4"])
    msvd = load_benchmark("msvd-qa", FIXTURES / "msvd", video_dir=msvd_dir)
    with pytest.raises(InvalidInput, match="open-ended"):
        evaluate(msvd.items, ORACLE, option_scorer=known_scores, progress=False)
    with pytest.raises(InvalidInput, match="open-ended"):
        evaluate(msvd.items, ORACLE, substitute=True, progress=False)
    plain = evaluate(msvd.items, ORACLE, progress=False)
    summary = result_dict(plain)
    assert (summary["likelihood"], summary["substitution"], summary["answer_distribution"]) == (
        None, None, None,
    )


# -- the derangement ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 48, 200])
def test_derangement_has_no_fixed_points_and_is_deterministic(n):
    for seed in range(20):
        pi = derangement(n, seed)
        assert sorted(pi) == list(range(n))
        assert all(pi[i] != i for i in range(n))
        assert derangement(n, seed) == pi
    assert derangement(2, 0) == [1, 0]
    if n >= 5:
        assert len({tuple(derangement(n, s)) for s in range(20)}) > 1  # the seed matters


def test_derangement_needs_two_clips():
    for n in (0, 1):
        with pytest.raises(InvalidInput, match="at least 2 clips"):
            derangement(n, 0)
    with pytest.raises(InvalidInput, match="substitute_seed"):
        derangement(3, 1.5)


# -- the video-substitution check --------------------------------------------------------------


def pixel_answerer(items, videos):
    """Answers from the video alone: the option at (sum of the pixels) mod the option count."""
    return [LETTERS[int(v.astype(np.int64).sum()) % len(i.options)] for i, v in zip(items, videos, strict=True)]


def pixel_scores(items, videos):
    return [[1.0 if k == int(v.astype(np.int64).sum()) % len(i.options) else 0.0
             for k in range(len(i.options))] for i, v in zip(items, videos, strict=True)]


def test_a_model_that_ignores_the_video_keeps_every_choice(synth):
    result = evaluate(synth, ORACLE, option_scorer=known_scores, substitute=True,
                      substitute_seed=7, frames=4, progress=False)
    sub = result.substitution
    assert sub.letter_same.overall == 1.0 and sub.likelihood_same.overall == 1.0
    assert all(s.accuracy == 1.0 for s in sub.letter_same.categories.values())
    assert sub.letter_same.n == result.score.n  # every answered motion question compared
    # ... and its accuracy does not move: the video never mattered.
    assert sub.letter == result.score and sub.likelihood == result.likelihood
    clips = sorted({str(i.video_path) for i in synth})
    assert sorted(sub.videos) == clips and sorted(sub.videos.values()) == clips
    assert all(own != other for own, other in sub.videos.items())
    again = evaluate(synth, ORACLE, substitute=True, substitute_seed=7, frames=4, progress=False)
    assert again.substitution.videos == sub.videos  # deterministic


def test_a_model_that_reads_the_video_changes_its_choices(synth):
    result = evaluate(synth, pixel_answerer, option_scorer=pixel_scores, substitute=True,
                      frames=4, progress=False)
    sub = result.substitution
    # Each clip's questions all get one letter from its pixels; another clip's pixels give
    # another letter unless the two sums agree mod 4 (same-choice rates of 0 or 1 per clip).
    assert sub.letter_same.overall < 1.0 and sub.likelihood_same.overall < 1.0
    pairs: dict[object, set[tuple[str, str]]] = {}
    for item, p, q in zip(synth, result.predictions, sub.predictions, strict=True):
        pairs.setdefault(item.video_path, set()).add((p.choice, q.choice))
        assert p.choice == p.likelihood_choice and q.choice == q.likelihood_choice
    assert all(len(v) == 1 for v in pairs.values())  # one letter per clip, each time
    unchanged = {path: a == b for path, ((a, b),) in pairs.items()}
    assert not all(unchanged.values())
    motion = [i for i in synth if i.category != STATIC_CATEGORY]
    expected = sum(unchanged[i.video_path] for i in motion) / len(motion)
    assert sub.letter_same.overall == pytest.approx(expected)
    assert sub.likelihood_same.overall == pytest.approx(expected)


def test_substitution_needs_two_clips(synth):
    one_clip = [i for i in synth if i.video_path == synth[0].video_path]
    with pytest.raises(InvalidInput, match="at least 2 clips"):
        evaluate(one_clip, ORACLE, substitute=True, frames=4, progress=False)


# -- answer rules and distributions ------------------------------------------------------------


def test_chosen_option_reads_the_benchmark_rule(tmp_path):
    favor_dir = tmp_path / "favor"
    make_videos([favor_dir / "fv-001.mp4", favor_dir / "fv-002.mp4"])
    favor = load_benchmark("favor", FIXTURES / "favor/video_perspective.json", video_dir=favor_dir)
    walks, camera = favor.items[0], favor.items[1]
    assert chosen_option(walks, "He walks") == "A"
    assert chosen_option(walks, "He walks forward") == "B"  # "He walks" is inside: not A
    assert chosen_option(camera, "Pans left, or Tilts up") == ""  # two options named
    assert chosen_option(camera, "nothing") == ""
    with pytest.warns(UserWarning, match="missing"):  # no videos needed here
        mb = load_motionbench(FIXTURES / "motionbench", video_dir=tmp_path)
    question = mb.items[0]
    assert [chosen_option(question, s) for s in ("(B)", "The answer is B", "Z", "")] == [
        "B", "", "", "",
    ]


def test_answer_distribution_counts_letters_per_category():
    dist = answer_distribution(
        [("Camera Motion", "D"), ("Camera Motion", "D"), ("Camera Motion", ""),
         (STATIC_CATEGORY, "A")], "ABCD",
    )
    assert dist["letters"] == ["A", "B", "C", "D", "none"]
    assert dist["all"]["counts"] == {"A": 1, "B": 0, "C": 0, "D": 2, "none": 1}
    assert dist["categories"]["Camera Motion"]["fractions"]["D"] == pytest.approx(2 / 3)
    assert list(dist["categories"]) == ["Camera Motion", STATIC_CATEGORY]
    with pytest.raises(InvalidInput, match="not one of"):
        answer_distribution([("Camera Motion", "E")], "ABCD")


def test_results_show_both_rules_the_check_and_the_distribution(synth, tmp_path):
    result = evaluate(synth, always_a, option_scorer=known_scores, substitute=True,
                      batch_size=4, frames=4, progress=False)
    paths = write_result(result, tmp_path, name="synth", model="always-a")
    summary = json.loads(paths["json"].read_text())
    assert summary == result_dict(result, model="always-a")
    assert summary["overall"] == result.score.overall  # the letter rule's keys are unchanged
    assert summary["likelihood"]["overall"] == result.likelihood.overall
    assert set(summary["likelihood"]["categories"]) == set(summary["categories"])
    sub = summary["substitution"]
    assert sub["letter"]["same_choice"]["overall"] == 1.0  # "A" whatever the video
    assert sub["likelihood"]["same_choice"]["overall"] == 1.0  # known_scores ignore it too
    assert sub["clips"] == 4 and sub["seed"] == 0
    dist = summary["answer_distribution"]
    assert dist["letter"]["all"]["counts"]["A"] == len(synth) == dist["letter"]["all"]["n"]
    assert dist["truth"]["all"]["n"] == len(synth)
    assert dist["likelihood"]["all"]["n"] == len(synth)
    md = paths["markdown"].read_text()
    assert md.splitlines()[2].startswith("| always-a |")  # the run's row comes first, as before
    assert ("| category | n | letter | likelihood | letter, other video | likelihood, other video"
            " | same choice, letter | same choice, likelihood |") in md
    row = next(line for line in md.splitlines() if line.startswith("| Overall |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == [str(result.score.n), f"{100 * result.score.overall:.2f}",
                          f"{100 * result.likelihood.overall:.2f}"]
    assert f"| {STATIC_CATEGORY} (control) | 12 |" in md
    assert "| all questions | 36 | A 100 · B 0 · C 0 · D 0 |" in md
    substituted = [json.loads(line) for line in paths["substituted"].read_text().splitlines()]
    assert [p["uid"] for p in substituted] == [i.uid for i in synth]


def test_the_likelihood_column_says_when_it_was_not_run(synth):
    table = comparison_table(evaluate(synth, ORACLE, frames=4, progress=False))
    assert table.splitlines()[0] == "| category | n | letter | likelihood |"
    assert table.splitlines()[2] == f"| {MOTION_CATEGORIES[0]} | 4 | 100.00 | - |"


# -- the VideoLLM option scorer ----------------------------------------------------------------


@pytest.mark.parametrize("name", STUDENTS)
def test_videollm_option_scores_are_the_option_tokens_log_probability(name, synth, videollava):
    """Per family: the summed score is the log-probability of the option's tokens, computed
    here from the teacher-forced logits; batching (padding) does not change the scores."""
    from vidalign.students.videollm import IGNORE_INDEX, load_videollm

    llm = videollava if name == "tiny-videollava" else load_videollm(name)
    items = synth[:2]
    videos = [np.asarray(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(k)))
              for k in range(2)]
    total = videollm_option_scorer(llm, normalize="sum", max_rows=8)(items, videos)
    one_by_one = videollm_option_scorer(llm, normalize="sum", max_rows=1)(items, videos)
    mean = videollm_option_scorer(llm)(items, videos)
    item, option = items[1], items[1].options[2]
    video = torch.from_numpy(videos[1][None])
    inputs = llm.build_inputs(video, [item.prompt], [option])
    labels = inputs.pop("labels")[0]
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(**inputs).logits[0].float(), -1)
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(-1)[: len(option)]  # one char a token
    assert llm.tokenizer.decode(labels[positions]) == option
    expected = logp[positions - 1, labels[positions]]
    terms = TINY_VLM_TERMS + len(option)
    assert_fp32_close(torch.tensor(total[1][2]), expected.sum(), terms=terms,
                      magnitude=float(expected.abs().max()), what=f"{name} option log-prob")
    assert_fp32_close(torch.tensor(mean[1][2]), expected.mean(), terms=terms,
                      magnitude=float(expected.abs().max()), what=f"{name} mean log-prob")
    assert_fp32_close(torch.tensor(total), torch.tensor(one_by_one), terms=terms,
                      magnitude=max(abs(x) for row in total for x in row), what=f"{name} batched")


def test_the_random_init_student_gets_one_likelihood_prediction_per_question(synth, videollava):
    from vidalign.students.answerer import videollm_answerer

    llm = videollava
    scorer = videollm_option_scorer(llm)
    items = synth[:18]  # two clips
    result = evaluate(items, videollm_answerer(llm, max_new_tokens=2), option_scorer=scorer,
                      substitute=True, batch_size=9, frames=8, progress=False)
    assert len(result.predictions) == len(items)
    for p in result.predictions:
        assert p.likelihood_choice in "ABCD" and p.likelihood_choice
        assert len(p.option_scores) == 4 and all(s < 0 for s in p.option_scores)
    assert result.likelihood.n == result.score.n == 12
    assert "mean log-probability per token" in result.likelihood_method
    assert result.substitution.likelihood_same.n == 12
    summary = result_dict(result)
    assert summary["likelihood"]["method"] == result.likelihood_method


def test_the_videollm_option_scorer_refuses_bad_settings(videollava):
    llm = videollava
    for kwargs, match in (
        ({"normalize": "max"}, "normalize"),
        ({"max_rows": 0}, "max_rows"),
        ({"continuation": "{letter}"}, "does not contain"),
        ({"continuation": "{nope}"}, "not a template"),
    ):
        with pytest.raises(InvalidInput, match=match):
            videollm_option_scorer(llm, **kwargs)
    lettered = videollm_option_scorer(llm, continuation="{option} ({letter})")
    assert "'{option} ({letter})'" in lettered.method


def test_unreadable_clips_are_left_out_of_the_substitution(tmp_path):
    write_dataset(generate(4, seed=3, frames=8, size=32), tmp_path)
    items = load_motionbench(tmp_path).items
    broken = items[0].video_path
    broken.write_bytes(broken.read_bytes()[:200])  # cut short: exists, cannot be decoded
    result = evaluate(items, ORACLE, option_scorer=known_scores, substitute=True, frames=4,
                      progress=False)
    assert [u["uid"] for u in result.unreadable] == [i.uid for i in items if i.video_path == broken]
    assert all(u["file"] == str(broken) and u["reason"] for u in result.unreadable)
    videos = result.substitution.videos
    assert len(videos) == 3 and str(broken) not in videos and str(broken) not in videos.values()
    lost = [p for p in result.predictions if p.uid in {u["uid"] for u in result.unreadable}]
    assert all(p.choice == "" and p.likelihood_choice == "" and p.correct is False for p in lost)
    assert result.substitution.letter_same.n == result.score.n - 6  # only questions asked twice
