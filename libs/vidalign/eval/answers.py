"""Official answer rules: turn a model's output into right or wrong, as each benchmark does.

Reimplemented from the rules as published, so scores are comparable:

- MotionBench (``polish_answer`` in THUDM/MotionBench): the text before the
  first ")", after the first "(" if there is one, its first whitespace token,
  that token's first character. Case-sensitive: "b" is not "B".
- Video-MME (``extract_characters_regex`` in BradyFU/Video-MME): strip
  answer prefixes, then the first capital A-D anywhere in what is left.
- FAVOR-Bench (``inference_qa_qwen.py``): right when the correct option's
  text appears in the output, case-insensitively, unless another option that
  contains it (case-sensitive containment, as the script tests) also appears.
- SEED-Bench's video dimensions are officially ranked by likelihood; for a
  generating model we apply the MotionBench rule.

:func:`chosen_option` says which option an output picks, by the same rules, as
a letter: the unit of the answer distribution and of the video-substitution
check's same-choice rate (``vidalign.eval.runner``).
"""

from __future__ import annotations

import re

from vidalign.data.benchmarks import LETTERS, OPEN_ENDED, QAItem
from vidalign.errors import InvalidInput


def parse_motionbench_answer(output: str) -> str:
    """The option letter MotionBench reads from ``output`` ("" when it reads none).

    >>> [parse_motionbench_answer(s) for s in ["(B)", "B.", "The answer is C", "B and C", ""]]
    ['B', 'B', 'T', 'B', '']
    """
    text = output.strip().split(")")[0].strip()
    if "(" in text:
        text = text.split("(")[1].strip()
    # The reference splits on " "; the text is stripped, so its first token's
    # first character is the same as that of the first whitespace token.
    tokens = text.split()
    return tokens[0][0] if tokens else ""


# Video-MME's list, as the reference evaluates it: two missing commas in its
# source concatenate four of the prefixes pairwise, so "The correct option is"
# and "Best option:" on their own are not removed. Reproduced on purpose.
_VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)


def parse_videomme_answer(output: str) -> str:
    """The option letter Video-MME reads from ``output`` ("" when it reads none)."""
    text = output.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    # The reference also returns "" for a reply of over ten words without A-D,
    # which the search below already does.
    match = re.search(r"[ABCD]", text)
    return match.group(0) if match else ""


def favor_judge(output: str, correct: str, options: list[str]) -> bool:
    """FAVOR-Bench's substring judge."""
    said = output.lower()
    if correct.lower() not in said:
        return False
    containing = [o for o in options if o != correct and correct in o]
    return not any(o.lower() in said for o in containing)


def is_correct(item: QAItem, output: str) -> bool:
    """Whether ``output`` answers a multiple-choice ``item`` rightly, by its benchmark's rule."""
    if item.answer is None:
        raise InvalidInput(f"{item.uid}: the benchmark withholds this answer; it cannot be scored")
    if item.benchmark in ("motionbench", "seedbench-video"):
        return parse_motionbench_answer(output) == item.answer
    if item.benchmark == "videomme":
        return parse_videomme_answer(output) == item.answer
    if item.benchmark == "favor":
        return favor_judge(output, item.answer, item.options or [])
    if item.benchmark in OPEN_ENDED:
        raise InvalidInput(f"{item.uid}: {item.benchmark} is open-ended; score it with a judge")
    raise InvalidInput(f"{item.uid}: no answer rule for benchmark {item.benchmark!r}")


def answer_letter(item: QAItem) -> str:
    """The right option's letter of a multiple-choice ``item``; "" when the answer is withheld.

    The answer is a letter (MotionBench, Video-MME, SEED-Bench) or the option's text
    (FAVOR-Bench).
    """
    if item.options is None:
        raise InvalidInput(f"{item.uid}: {item.benchmark} is open-ended; it has no option letters")
    if item.answer is None:
        return ""
    if item.answer in LETTERS[: len(item.options)]:
        return item.answer
    if item.answer in item.options:
        return LETTERS[item.options.index(item.answer)]
    raise InvalidInput(f"{item.uid}: answer {item.answer!r} is neither an option letter nor an option")


def chosen_option(item: QAItem, output: str) -> str:
    """The option letter ``output`` picks by ``item``'s benchmark rule; "" when it picks none.

    The letter rules (MotionBench, SEED-Bench, Video-MME) read one letter; one
    that is not an option of the item (MotionBench reads "T" from "The answer
    is C") picks none. FAVOR-Bench's substring judge picks the option it would
    mark right; none when no option, or more than one, would be. Open-ended
    items have no options: always "".
    """
    if item.options is None:
        return ""
    valid = LETTERS[: len(item.options)]
    if item.benchmark in ("motionbench", "seedbench-video"):
        letter = parse_motionbench_answer(output)
    elif item.benchmark == "videomme":
        letter = parse_videomme_answer(output)
    elif item.benchmark == "favor":
        named = [k for k, o in enumerate(item.options) if favor_judge(output, o, item.options)]
        letter = valid[named[0]] if len(named) == 1 else ""
    else:
        raise InvalidInput(f"{item.uid}: no answer rule for benchmark {item.benchmark!r}")
    return letter if letter and letter in valid else ""
