"""Judges for open-ended QA (MSVD-QA, MSRVTT-QA): is a free-text answer right?

Two judges behind one interface, ``judge(question, answer, prediction) -> Verdict``:

- :class:`ExactMatchJudge`, the offline default: a normalised string match.
  Stricter than an LLM (no synonyms), so its numbers are not comparable with
  published ones; it exists so that the pipeline runs with no network.
- :class:`LLMJudge`: any OpenAI-compatible chat-completions endpoint, with the
  prompt of VDA's table 5 (which follows Video-ChatGPT), the judge behind the
  MSVD/MSRVTT numbers in the papers.

:func:`judge_all` writes one result file per item, so an interrupted run
resumes where it stopped and items already judged are never re-sent.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from vidalign.errors import InvalidInput
from vidalign.llm import ChatClient
from vidalign.log import get_logger

log = get_logger("vidalign.eval.judges")

ENV_PREFIX = "VIDALIGN_JUDGE"
"""The judge reads VIDALIGN_JUDGE_BASE_URL, VIDALIGN_JUDGE_MODEL, VIDALIGN_JUDGE_API_KEY."""

# VDA (docs/papers.md), appendix A, table 5, word for word.
# The PDF's text runs "Correct Answer: ..." and "Predicted Answer: ..." onto
# one line; they are separate lines here, as in Video-ChatGPT, which the table
# cites.
JUDGE_SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative "
    "outputs for question-answer pairs.\n"
    "Your task is to compare the predicted answer with the correct answer and determine if "
    "they match meaningfully. Here's how you can accomplish the task:\n"
    "##INSTRUCTIONS:\n"
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n"
    "Provide your evaluation only as an integer value between 1 and 5, with 5 indicating the "
    "highest quality.\n"
    "Please generate the response in the form of a Python dictionary string with keys 'pred' "
    "and 'score', where value of 'pred' is a string of 'yes' or 'no' and value of 'score' is "
    "in FLOAT, not STRING.\n"
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary "
    "string.\n"
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


@dataclass(frozen=True)
class Verdict:
    pred: str
    """"yes" or "no"."""
    score: float
    """0 to 5."""


class Judge(Protocol):
    def judge(self, question: str, answer: str, prediction: str) -> Verdict: ...


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


@dataclass(frozen=True)
class ExactMatchJudge:
    """"yes" with score 5 when the normalised prediction equals the normalised answer."""

    def judge(self, question: str, answer: str, prediction: str) -> Verdict:
        same = normalise(prediction) == normalise(answer)
        return Verdict("yes" if same else "no", 5.0 if same else 0.0)


def parse_verdict(reply: str) -> Verdict:
    """The judge's dict, from the first ``{...}`` in ``reply``; InvalidInput when there is none."""
    match = re.search(r"\{.*?\}", reply, re.S)
    if match is None:
        raise InvalidInput(f"judge reply has no {{...}}: {reply[:200]!r}")
    try:
        value = ast.literal_eval(match.group(0))
    except (ValueError, SyntaxError):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            raise InvalidInput(f"judge reply is not a dict: {match.group(0)[:200]!r}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"judge reply is not a dict: {match.group(0)[:200]!r}")
    pred = str(value.get("pred", "")).strip().lower()
    try:
        score = float(value.get("score"))
    except (TypeError, ValueError):
        raise InvalidInput(f"judge reply has no numeric 'score': {value!r}") from None
    if pred not in ("yes", "no") or not 0 <= score <= 5:
        raise InvalidInput(f"judge reply: expected pred yes/no and score 0-5, got {value!r}")
    return Verdict(pred, score)


@dataclass
class LLMJudge(ChatClient):
    """VDA's table-5 judge on a chat-completions endpoint (see ``vidalign.llm.ChatClient``)."""

    @classmethod
    def from_env(cls, **overrides) -> LLMJudge:
        """Endpoint, model and key from ``VIDALIGN_JUDGE_{BASE_URL,MODEL,API_KEY}``."""
        try:
            values = cls.env_values(ENV_PREFIX)
        except InvalidInput as err:
            raise InvalidInput(f"LLM judge: {err}") from None
        return cls(**values, **overrides)

    def judge(self, question: str, answer: str, prediction: str) -> Verdict:
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_USER_PROMPT.format(
                question=question, answer=answer, prediction=prediction
            )},
        ]
        return self.ask(messages, parse_verdict, "LLM judge")


@dataclass(frozen=True)
class OpenEndedRecord:
    """One prediction to judge: Video-ChatGPT's predictions line {id, question, answer, pred}."""

    uid: str
    question: str
    answer: str
    pred: str


@dataclass(frozen=True)
class OpenEndedScore:
    n: int
    yes: int
    accuracy: float
    """yes / n."""
    score: float
    """Mean judge score, 0 to 5."""
    verdicts: dict[str, Verdict]


def result_file(out_dir: Path, uid: str) -> Path:
    """A file name per uid that is safe on any filesystem and never shared by two uids."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", uid)[:80]
    digest = hashlib.sha1(uid.encode()).hexdigest()[:8]
    return out_dir / f"{safe}-{digest}.json"


def judge_all(
    records: Iterable[OpenEndedRecord],
    judge: Judge,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> OpenEndedScore:
    """Judge every record; with ``out_dir``, reuse and write one result file per item.

    A stored result is reused only if its question, answer and prediction are
    the ones asked now, so a directory reused for a new model's predictions
    re-judges what changed.
    """
    records = list(records)
    if not records:
        raise InvalidInput("judge_all: no records to judge")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    verdicts: dict[str, Verdict] = {}
    for record in tqdm(records, desc="judging", unit="q", disable=not progress):
        if record.uid in verdicts:
            raise InvalidInput(f"judge_all: uid {record.uid!r} appears twice")
        path = result_file(out, record.uid) if out is not None else None
        stored = _read_result(path, record) if path is not None else None
        if stored is None:
            stored = judge.judge(record.question, record.answer, record.pred)
            if path is not None:
                _write_result(path, record, stored)
        verdicts[record.uid] = stored
    yes = sum(v.pred == "yes" for v in verdicts.values())
    return OpenEndedScore(
        n=len(verdicts),
        yes=yes,
        accuracy=yes / len(verdicts),
        score=sum(v.score for v in verdicts.values()) / len(verdicts),
        verdicts=verdicts,
    )


def _read_result(path: Path, record: OpenEndedRecord) -> Verdict | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        same = (stored["id"], stored["question"], stored["answer"], stored["pred"]) == (
            record.uid, record.question, record.answer, record.pred,
        )
        return Verdict(stored["judge"]["pred"], float(stored["judge"]["score"])) if same else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # a damaged result file: judge again


def _write_result(path: Path, record: OpenEndedRecord, verdict: Verdict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "id": record.uid,
        "question": record.question,
        "answer": record.answer,
        "pred": record.pred,
        "judge": {"pred": verdict.pred, "score": verdict.score},
    }), encoding="utf-8")
    tmp.replace(path)
