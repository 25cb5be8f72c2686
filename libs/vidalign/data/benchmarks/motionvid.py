"""MotionVid-QA (HF nkp37/MotionSight): DPO-style training records.

Each record: ``question``, ``video`` (a path relative to the video root),
``chosen`` (the preferred answer) and ``rejected``. The release is a JSON
array; JSON Lines is read too. Records have no ids; ours are
``f"motionvid-{k}"`` by position, plus the record's ``id`` when it has one.
"""

from __future__ import annotations

from pathlib import Path

from vidalign.data.benchmarks._io import VideoIndex, array_or_lines, text_field, video_root
from vidalign.data.benchmarks.records import LoadedSet, PreferenceItem


def load_motionvid_qa(
    path: str | Path, video_dir: str | Path | None = None
) -> LoadedSet[PreferenceItem]:
    """Every preference record; ``video`` resolves against ``video_dir`` (default: the file's)."""
    path = Path(path)
    root = video_root(path, video_dir)
    videos = VideoIndex()
    items = []
    for k, (number, record) in enumerate(array_or_lines(path)):
        where = f"{path}:{number}"
        video = Path(text_field(record, "video", where))
        items.append(PreferenceItem(
            uid=str(record["id"]) if "id" in record else f"motionvid-{k}",
            video_path=videos.check(video if video.is_absolute() else root / video),
            question=text_field(record, "question", where),
            chosen=text_field(record, "chosen", where),
            rejected=text_field(record, "rejected", where),
            source_file=str(path),
            line=number,
        ))
    return LoadedSet("motionvid-qa", path, items, videos.warn("motionvid-qa", path))
