"""Each benchmark's own prompt, so numbers are comparable with published ones.

Where a prompt comes from:

- **MotionBench**: the official repository (THUDM/MotionBench) ships answer
  parsing and accuracy code but no inference prompt. We give the question
  field exactly as the benchmark writes it (stem and ``"A. ..."`` lines) and
  the multiple-choice instruction of LLaVA / lmms-eval, which public
  MotionBench evaluation scripts append: :data:`LETTER_INSTRUCTION`.
- **FAVOR-Bench**: the close-ended prompt of its reference script
  ``inference_qa_qwen.py`` (FAVOR-Bench/FAVOR-Bench), options rendered as that
  script does, by formatting the Python list.
- **Video-MME**: the subtitle-free prompt in the Video-MME README
  (BradyFU/Video-MME, "Evaluation Pipeline").
- **SEED-Bench** (video dimensions): the official evaluation ranks the four
  options by likelihood and has no generation prompt; for a generating model
  we use the MotionBench layout and instruction.
- **MSVD-QA / MSRVTT-QA**: Video-ChatGPT-style evaluation gives the question
  as is.
"""

from __future__ import annotations

from vidalign.data.benchmarks.records import LETTERS, QAItem
from vidalign.errors import InvalidInput

LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

FAVOR_PROMPT = (
    "Carefully watch the video and pay attention to temporal dynamics in this video, "
    "focusing on the camera motions, actions, activities, and interactions. Based on your "
    "observations, select the best option that accurately addresses the question.\n"
    "{question}\nYou can only response with the answer among {options}"
)

VIDEOMME_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n"
    "{question}\n{options}\nThe best answer is:"
)


def lettered(options: list[str]) -> str:
    """``"A. first\\nB. second"``."""
    return "\n".join(f"{LETTERS[k]}. {text}" for k, text in enumerate(options))


def build_prompt(item: QAItem) -> str:
    """The text a model is given for ``item``, by its benchmark's convention."""
    if item.benchmark in ("motionbench", "seedbench-video"):
        # MotionBench's raw question already holds the options; keep its exact text.
        question = item.extra.get("raw_question") or f"{item.question}\n{lettered(item.options)}"
        return f"{question}\n{LETTER_INSTRUCTION}"
    if item.benchmark == "favor":
        return FAVOR_PROMPT.format(question=item.question, options=item.options)
    if item.benchmark == "videomme":
        return VIDEOMME_PROMPT.format(question=item.question, options=lettered(item.options))
    if item.benchmark in ("msvd-qa", "msrvtt-qa"):
        return item.question
    raise InvalidInput(f"{item.uid}: no prompt for benchmark {item.benchmark!r}")
