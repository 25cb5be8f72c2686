"""A SynthMotion directory in memory, for the training jobs.

Evaluation reads SynthMotion through the MotionBench loader
(``vidalign.data.benchmarks``); training reads it here, through the *same*
loader, so a question's training prompt is exactly its evaluation prompt
(``QAItem.prompt``: MotionBench's question text plus its letter instruction).
The target is :data:`ANSWER_FORMAT`: the right option's text, then its letter
in parentheses, which MotionBench's official rule reads as the letter.

    data = load_synth_set("runs/demo/data/train", frames=16, size=32)
    data.videos        # uint8 (N, F, H, W, 3), decoded once
    data.qa            # [QAExample(clip, prompt, answer, category), ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidalign.errors import InvalidInput

ANSWER_FORMAT = "{option} ({letter})"
"""Training target of a multiple-choice question: ``"moves back and forth (B)"``.

MotionBench's rule takes the text inside the first parentheses, so this scores
exactly as ``"B"`` would. The order is for small models trained from scratch:
naming the option first is a classification of the video, and the letter is
then a copy of the token before that text among the options; a letter first
would need both done at once, which a few-layer model learns far more slowly
(on the demo's student, not at all in 1000 steps).
"""


@dataclass(frozen=True)
class QAExample:
    clip: int
    """Index of the clip in :attr:`SynthSet.ids`."""
    prompt: str
    answer: str
    """The option letter."""
    category: str
    target: str
    """What the model is taught to reply (:data:`ANSWER_FORMAT`)."""


@dataclass
class SynthSet:
    ids: list[str]
    videos: torch.Tensor
    """uint8 ``(N, F, H, W, 3)``."""
    captions: list[str]
    static_captions: list[str]
    truths: list[dict[str, Any]]
    qa: list[QAExample]

    def __len__(self) -> int:
        return len(self.ids)


def load_synth_set(
    path: str | Path, *, num_clips: int = 0, frames: int = 16, size: int = 32
) -> SynthSet:
    """The first ``num_clips`` clips (0: all) of a SynthMotion directory, frames resampled.

    Every clip is decoded to ``frames`` frames of ``size`` x ``size`` pixels.
    """
    from vidalign.data.benchmarks import load_benchmark
    from vidalign.data.benchmarks.records import LETTERS
    from vidalign.data.frames import decode_frames
    from vidalign.data.synth import read_sidecar
    from vidalign.video import sample_frames

    if num_clips < 0:
        raise InvalidInput(f"num_clips: expected >= 0, got {num_clips}")
    records = read_sidecar(path)
    if num_clips:
        records = records[:num_clips]
    if not records:
        raise InvalidInput(f"path: {path} holds no SynthMotion clips")
    index = {r.video_path.resolve(): i for i, r in enumerate(records)}
    videos = []
    for record in records:
        decoded = torch.from_numpy(decode_frames(record.video_path, num_frames=frames))
        videos.append(sample_frames(decoded[None], frames, size)[0])
    qa = []
    for item in load_benchmark("motionbench", Path(path)).items:
        clip = index.get(Path(item.video_path).resolve())
        if clip is None:  # a clip beyond num_clips
            continue
        if item.answer is None:
            raise InvalidInput(f"{item.source_file}:{item.line}: question {item.uid} has no answer")
        option = item.options[LETTERS.index(item.answer)]
        target = ANSWER_FORMAT.format(option=option, letter=item.answer)
        qa.append(QAExample(clip, item.prompt, item.answer, item.category, target))
    return SynthSet(
        ids=[r.clip_id for r in records],
        videos=torch.stack(videos),
        captions=[r.caption for r in records],
        static_captions=[r.static_caption for r in records],
        truths=[r.truth for r in records],
        qa=qa,
    )
