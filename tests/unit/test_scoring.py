"""Answer rules, judges (one against a chat-completions server on loopback), scores and reports."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.support.chat_server import ChatServer
from tests.unit.test_loaders import FIXTURES, make_videos
from vidalign.data.benchmarks import QAItem, load_benchmark, load_motionbench
from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY, generate, write_dataset
from vidalign.errors import InvalidInput, NotFound, Unavailable
from vidalign.eval import (
    BASELINES,
    ExactMatchJudge,
    LLMJudge,
    OpenEndedRecord,
    Verdict,
    evaluate,
    favor_judge,
    is_correct,
    judge_all,
    markdown_table,
    parse_motionbench_answer,
    parse_verdict,
    parse_videomme_answer,
    read_outputs,
    result_dict,
    score,
    score_outputs,
    write_result,
)
from vidalign.eval.judges import JUDGE_SYSTEM_PROMPT

KEY = "sk-test-0123456789"


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("B", "B"),
        ("The answer is C", "T"),  # the official rule reads the first character
        ("b", "b"),  # case-sensitive: not "B"
        ("B and C", "B"),
        ("", ""),
        ("   \n\t ", ""),
        ("  (C) because it pans", "C"),
        ("A) the left hand", "A"),
        ("Answer: (D)", "D"),
        ("\n\tB\n", "B"),
        ("x(", ""),
    ],
)
def test_motionbench_answer_rule(output, letter):
    assert parse_motionbench_answer(output) == letter


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("C", "C"),
        ("The best answer is: D.", "D"),
        ("The answer is (B)", "B"),
        ("The correct option is B", "B"),
        ("Best option: C", "B"),  # the reference's missing commas leave "Best" in place
        ("I cannot tell from these frames what happens next.", ""),
        ("", ""),
    ],
)
def test_videomme_answer_rule(output, letter):
    assert parse_videomme_answer(output) == letter


def test_favor_substring_judge_with_its_exclusion():
    options = ["He walks", "He walks forward", "He sits", "He jumps", "He waves"]
    assert favor_judge("he walks.", "He walks", options)
    assert favor_judge("The answer: HE WALKS", "He walks", options)
    assert not favor_judge("He walks forward", "He walks", options)  # a longer option also appears
    assert not favor_judge("He sits", "He walks", options)
    assert favor_judge("He walks forward", "He walks forward", options)
    assert not favor_judge("", "He walks", options)


def test_is_correct_dispatches_on_the_benchmark():
    def item(benchmark, answer, options=("x", "y", "z", "w")):
        return QAItem("u", Path("v.mp4"), "Q?", list(options), answer, "c", "f", 1, benchmark=benchmark)

    assert is_correct(item("motionbench", "B"), "(B) y")
    assert not is_correct(item("motionbench", "B"), "b")
    assert is_correct(item("videomme", "C"), "The best answer is C")
    assert is_correct(item("favor", "y"), "I think y")
    with pytest.raises(InvalidInput, match="withholds"):
        is_correct(item("motionbench", None), "A")
    with pytest.raises(InvalidInput, match="open-ended"):
        is_correct(item("msvd-qa", "sing", options=()), "sing")


def test_scores_by_hand():
    outcomes = [
        ("Motion Recognition", True), ("Motion Recognition", True), ("Motion Recognition", False),
        ("Camera Motion", True),
        ("Action Order", False), ("Action Order", False),
        (STATIC_CATEGORY, True), (STATIC_CATEGORY, False),
        ("Repetition Count", None),  # withheld answer
    ]
    s = score(outcomes)
    assert list(s.categories) == ["Motion Recognition", "Action Order", "Camera Motion", STATIC_CATEGORY]
    assert (s.categories["Motion Recognition"].n, s.categories["Motion Recognition"].correct) == (3, 2)
    assert s.n == 6 and s.unscorable == 1 and s.controls == (STATIC_CATEGORY,)
    assert s.overall == pytest.approx(3 / 6)  # micro over the six motion questions
    assert s.average == pytest.approx((2 / 3 + 0 + 1) / 3)  # macro over three categories
    assert s.categories[STATIC_CATEGORY].accuracy == 0.5
    assert score([]).overall == 0.0


def test_exact_match_judge_normalises():
    judge = ExactMatchJudge()
    assert judge.judge("what is she slicing?", "onion", "An onion.").pred == "yes"
    assert judge.judge("q", "onion", "The  ONION!").score == 5.0
    assert judge.judge("q", "onion", "onions") == Verdict("no", 0.0)


@pytest.mark.parametrize(
    ("reply", "pred", "value"),
    [
        ("{'pred': 'yes', 'score': 4.8}", "yes", 4.8),
        ("Sure! Here it is: {'pred': 'no', 'score': 1} Hope it helps {x}", "no", 1.0),
        ('{"pred": "Yes", "score": "3"}', "yes", 3.0),
        ("```python\n{'pred': 'no',\n 'score': 0.0}\n```", "no", 0.0),
    ],
)
def test_verdicts_parse_robustly(reply, pred, value):
    verdict = parse_verdict(reply)
    assert (verdict.pred, verdict.score) == (pred, value)


@pytest.mark.parametrize("reply", ["yes", "{'pred': 'maybe', 'score': 3}", "{'pred': 'yes'}", "{'pred': 'yes', 'score': 9}", "{not python}"])
def test_malformed_verdicts_are_rejected(reply):
    with pytest.raises(InvalidInput):
        parse_verdict(reply)


def _judge_by_equality(body: dict) -> str:
    user = body["messages"][1]["content"]
    answer = re.search(r"Correct Answer: (.*)\n", user).group(1)
    prediction = re.search(r"Predicted Answer: (.*)\n", user).group(1)
    return "{'pred': 'yes', 'score': 4.5}" if answer in prediction else "{'pred': 'no', 'score': 1.0}"


@pytest.fixture
def chat():
    server = ChatServer(_judge_by_equality)
    yield server
    server.close()


def _judge(chat, **kwargs) -> tuple[LLMJudge, list[float]]:
    sleeps: list[float] = []
    judge = LLMJudge(chat.url, "judge-model", KEY, timeout=5, backoff=0.5, sleep=sleeps.append, **kwargs)
    return judge, sleeps


def test_llm_judge_retries_a_malformed_reply_then_succeeds(chat, capsys):
    chat.script = [(200, "It matches, I think."), (200, "{'pred': 'yes', 'score': 4.8}")]
    judge, sleeps = _judge(chat)
    verdict = judge.judge("what is a man doing?", "sing", "singing")
    assert (verdict.pred, verdict.score) == ("yes", 4.8)
    assert len(chat.requests) == 2 and sleeps == [0.5]
    request = chat.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "judge-model"
    system, user = request["body"]["messages"]
    assert system == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    assert "Question: what is a man doing?\nCorrect Answer: sing\nPredicted Answer: singing\n" in user["content"]
    assert "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}." in user["content"]
    # The key is in the header only: not in the judge's repr, not in any log line.
    assert KEY not in repr(judge)
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def test_llm_judge_retries_server_errors_but_not_refusals(chat):
    chat.script = [(503, ""), (429, ""), (200, "{'pred': 'no', 'score': 0.5}")]
    judge, sleeps = _judge(chat)
    assert judge.judge("q", "a", "b").pred == "no"
    assert sleeps == [0.5, 1.0] and len(chat.requests) == 3

    chat.script = [(401, "")]
    with pytest.raises(InvalidInput, match="HTTP 401") as refused:
        judge.judge("q", "a", "b")
    assert KEY not in str(refused.value) and len(chat.requests) == 4

    chat.script = [(200, "no dict")] * 3
    judge, _ = _judge(chat, max_attempts=3)
    with pytest.raises(Unavailable, match="after 3 attempts"):
        judge.judge("q", "a", "b")
    assert len(chat.requests) == 7


def test_llm_judge_unreachable_is_unavailable():
    judge = LLMJudge("http://127.0.0.1:9/v1", "m", KEY, timeout=1, max_attempts=2, sleep=lambda s: None)
    with pytest.raises(Unavailable, match="cannot reach"):
        judge.judge("q", "a", "b")


def test_llm_judge_from_env(monkeypatch):
    monkeypatch.setenv("VIDALIGN_JUDGE_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("VIDALIGN_JUDGE_MODEL", "gpt-4o")
    monkeypatch.setenv("VIDALIGN_JUDGE_API_KEY", KEY)
    judge = LLMJudge.from_env(max_attempts=2)
    assert (judge.base_url, judge.model, judge.api_key, judge.max_attempts) == (
        "http://127.0.0.1:1/v1", "gpt-4o", KEY, 2,
    )
    monkeypatch.delenv("VIDALIGN_JUDGE_API_KEY")
    with pytest.raises(InvalidInput, match="VIDALIGN_JUDGE_API_KEY"):
        LLMJudge.from_env()


def test_judging_is_restartable_and_never_resends_done_items(chat, tmp_path):
    records = [
        OpenEndedRecord("0", "what is a man doing?", "sing", "he is singing"),
        OpenEndedRecord("1", "who is singing?", "man", "a child"),
        OpenEndedRecord("q/2", "what is she slicing?", "onion", "an onion"),
    ]
    judge, _ = _judge(chat)
    out = tmp_path / "judged"
    judge_all(records[:2], judge, out)  # a run that stopped after two items
    assert len(chat.requests) == 2 and len(list(out.glob("*.json"))) == 2
    result = judge_all(records, judge, out)
    assert len(chat.requests) == 3  # only the third was sent
    assert (result.n, result.yes) == (3, 2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.score == pytest.approx((4.5 + 1.0 + 4.5) / 3)
    judge_all(records, judge, out)
    assert len(chat.requests) == 3  # nothing left to judge
    changed = [*records[:2], OpenEndedRecord("q/2", "what is she slicing?", "onion", "a carrot")]
    assert judge_all(changed, judge, out).verdicts["q/2"].pred == "no"
    assert len(chat.requests) == 4  # a changed prediction is judged again
    stored = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert {s["id"] for s in stored} == {"0", "1", "q/2"}


# --- evaluate -------------------------------------------------------------------------


oracle = BASELINES["oracle"]


def always_a(items, videos):
    return ["A"] * len(items)


@pytest.fixture
def motionbench(tmp_path):
    root = tmp_path / "motionbench"
    root.mkdir()
    (root / "video_info.meta.jsonl").write_text((FIXTURES / "motionbench/video_info.meta.jsonl").read_text())
    make_videos([root / f"videos/mb-00{k}.mp4" for k in (1, 2, 3)])  # mb-004 stays missing
    with pytest.warns(UserWarning, match="mb-004"):
        return load_motionbench(root)


def test_evaluate_refuses_missing_videos_unless_told(motionbench):
    with pytest.raises(NotFound, match=r"1 of 5 motionbench questions name missing videos \(first: .*mb-004"):
        evaluate(motionbench.items, oracle, progress=False)


def test_evaluate_with_oracle_and_constant_answerers(motionbench):
    seen = []

    def checking_oracle(items, videos):
        assert len(items) <= 2
        for item, video in zip(items, videos, strict=True):
            assert video.dtype == np.uint8 and video.shape == (6, 16, 16, 3)
            assert item.prompt.endswith("Answer with the option's letter from the given choices directly.")
        seen.extend(i.uid for i in items)
        return oracle(items, videos)

    best = evaluate(motionbench.items, checking_oracle, batch_size=2, frames=6, skip_missing=True, progress=False)
    assert seen == ["101", "102", "201", "301"]  # 401's video is missing: not asked
    assert best.missing == ("401",)
    s = best.score
    assert {c: (v.n, v.correct) for c, v in s.categories.items()} == {
        "Motion Recognition": (2, 2), "Action Order": (1, 0), "Camera Motion": (1, 1),
    }
    assert s.overall == pytest.approx(3 / 4)  # the missing video's question counts as wrong
    assert s.average == pytest.approx((1 + 0 + 1) / 3)
    assert s.unscorable == 1  # 301 is "NA"

    worst = evaluate(motionbench.items, always_a, skip_missing=True, progress=False).score
    assert worst.overall == pytest.approx(1 / 4)  # only 102 is A
    assert worst.average == pytest.approx((1 / 2 + 0 + 0) / 3)

    table = markdown_table({"oracle": s, "always A": worst})
    assert table.splitlines() == [
        "| run | MR | AO | CM | Overall | Average |",
        "|---|---|---|---|---|---|",
        "| oracle | 100.00 | 0.00 | 100.00 | 75.00 | 66.67 |",
        "| always A | 50.00 | 0.00 | 0.00 | 25.00 | 16.67 |",
    ]


def test_evaluate_favor_and_msvd(tmp_path):
    favor_dir = tmp_path / "favor"
    make_videos([favor_dir / "fv-001.mp4", favor_dir / "fv-002.mp4"])
    favor = load_benchmark("favor", FIXTURES / "favor/video_perspective.json", video_dir=favor_dir)
    assert evaluate(favor.items, oracle, progress=False).score.overall == 1.0
    assert evaluate(favor.items, always_a, progress=False).score.overall == 0.0
    # The first option is right once: "Pans left" is wrong, "Left hand" is wrong, "He walks" right.
    first = evaluate(favor.items, BASELINES["first-option"], progress=False).score
    assert (first.n, first.overall) == (3, pytest.approx(1 / 3))
    longer = evaluate(favor.items, lambda items, v: ["He walks forward" for _ in items], progress=False)
    assert longer.score.overall == 0.0

    msvd_dir = tmp_path / "msvd"
    make_videos([msvd_dir / "-4wsuPCjDBc_5_15.avi", msvd_dir / "0lh_UWF9ZP4_62_69.mp4"])
    msvd = load_benchmark("msvd-qa", FIXTURES / "msvd", video_dir=msvd_dir)
    exact = evaluate(msvd.items, oracle, progress=False)
    assert (exact.open_ended.accuracy, exact.open_ended.score) == (1.0, 5.0)
    assert exact.score.overall == 1.0
    wrong = evaluate(msvd.items, always_a, progress=False)
    assert (wrong.open_ended.accuracy, wrong.score.overall) == (0.0, 0.0)


def test_evaluate_msvd_with_the_llm_judge(chat, tmp_path):
    msvd_dir = tmp_path / "msvd"
    make_videos([msvd_dir / "-4wsuPCjDBc_5_15.avi", msvd_dir / "0lh_UWF9ZP4_62_69.mp4"])
    msvd = load_benchmark("msvd-qa", FIXTURES / "msvd", video_dir=msvd_dir)
    judge, _ = _judge(chat)
    outputs = {"0": "the man sings", "1": "a dog", "2": "an onion"}
    result = evaluate(
        msvd.items, lambda items, v: [outputs[i.uid] for i in items],
        judge=judge, judge_dir=tmp_path / "judged", progress=False,
    )
    # The server says yes when the answer is in the prediction: "sing", not "man", "onion".
    assert [result.open_ended.verdicts[u].pred for u in "012"] == ["yes", "no", "yes"]
    assert result.score.overall == pytest.approx(2 / 3)
    assert len(chat.requests) == 3
    again = score_outputs(msvd.items, outputs, judge=judge, judge_dir=tmp_path / "judged")
    assert len(chat.requests) == 3 and again.open_ended == result.open_ended


def test_evaluate_synthmotion_end_to_end(tmp_path):
    clips = generate(4, seed=3, frames=8, size=32)
    write_dataset(clips, tmp_path)
    items = load_motionbench(tmp_path).items
    best = evaluate(items, oracle, batch_size=5, frames=8, progress=False).score
    assert best.overall == 1.0 and best.categories[STATIC_CATEGORY].accuracy == 1.0
    assert list(best.categories) == [*MOTION_CATEGORIES, STATIC_CATEGORY]
    motion = [q for c in clips for q in c.questions if q.category != STATIC_CATEGORY]
    worst = evaluate(items, always_a, frames=8, progress=False).score
    assert worst.n == len(motion) == 24
    assert worst.overall == pytest.approx(sum(q.answer == "A" for q in motion) / len(motion))


def test_results_are_written_as_json_markdown_and_predictions(motionbench, tmp_path):
    result = evaluate(motionbench.items, oracle, skip_missing=True, progress=False)
    summary = result_dict(result, model="oracle")
    assert summary["categories"]["Motion Recognition"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert (summary["n"], summary["unscorable"], summary["missing_videos"]) == (4, 1, 1)
    paths = write_result(result, tmp_path / "out", name="mb-dev", model="oracle")
    assert json.loads(paths["json"].read_text()) == summary
    assert paths["markdown"].read_text().splitlines()[2].startswith("| oracle | 100.00 |")
    lines = [json.loads(line) for line in paths["predictions"].read_text().splitlines()]
    assert [(p["uid"], p["correct"]) for p in lines] == [
        ("101", True), ("102", True), ("201", True), ("301", None), ("401", False),
    ]
    # Saved outputs score again to the same numbers.
    rescored = score_outputs(motionbench.items, read_outputs(paths["predictions"]))
    assert rescored.score == result.score


def test_read_outputs_names_the_bad_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 3, "pred": "sing"}\n\n{"uid": "4"}\n')
    with pytest.raises(InvalidInput, match=r"preds\.jsonl:3: expected"):
        read_outputs(path)
    path.write_text('{"id": 3, "pred": "sing"}\n{"uid": "4", "output": "B"}\n')
    assert read_outputs(path) == {"3": "sing", "4": "B"}


def test_answerer_contract_is_checked(motionbench):
    with pytest.raises(InvalidInput, match="expected a list of"):
        evaluate(motionbench.items, lambda items, v: ["A"], skip_missing=True, progress=False)
    with pytest.raises(InvalidInput, match="not str"):
        evaluate(motionbench.items, lambda items, v: [None] * len(items), skip_missing=True, progress=False)
