"""OpenVid-1M: a CSV of clips with a caption and quality / motion scores.

Columns (any order; header names are matched case-insensitively, with ``_``
and spaces equivalent): ``video`` (file name), ``caption``, ``aesthetic
score``, ``motion score``, ``temporal consistency score``, ``camera motion``,
``frame``, ``fps``, ``seconds``. Only ``video`` and ``caption`` are required;
an empty cell reads as None, a cell that is not a number is an error.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from vidalign.data.benchmarks._io import VideoIndex, read_text, video_root
from vidalign.data.benchmarks.records import CaptionItem, LoadedSet
from vidalign.errors import InvalidInput

REQUIRED = ("video", "caption")
NUMBERS = ("aesthetic score", "motion score", "temporal consistency score", "frame", "fps", "seconds")


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _number(cell: str | None, column: str, where: str) -> float | None:
    if cell is None or not cell.strip():
        return None
    try:
        value = float(cell)
    except ValueError:
        raise InvalidInput(f"{where}: {column}: expected a number, got {cell!r}") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{where}: {column}: expected a finite number, got {cell!r}")
    return value


def load_openvid(path: str | Path, video_dir: str | Path | None = None) -> LoadedSet[CaptionItem]:
    """Every row; ``video`` resolves against ``video_dir`` (default: the CSV's directory)."""
    path = Path(path)
    root = video_root(path, video_dir)
    reader = csv.reader(read_text(path).splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        raise InvalidInput(f"{path}: empty file, expected a header row")
    columns = {_normal(name): k for k, name in enumerate(header)}
    absent = [c for c in REQUIRED if c not in columns]
    if absent:
        raise InvalidInput(f"{path}:1: header lacks column(s) {absent}; it has {header}")

    videos = VideoIndex()
    items: list[CaptionItem] = []
    seen: dict[str, int] = {}
    # A quoted caption may span lines, so a row starts where the previous one ended.
    next_start = reader.line_num + 1
    for row in reader:
        start, next_start = next_start, reader.line_num + 1
        where = f"{path}:{start}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InvalidInput(f"{where}: expected {len(header)} cells like the header, got {len(row)}")
        cells = {c: row[k] for c, k in columns.items()}
        name = cells["video"].strip()
        caption = cells["caption"].strip()
        if not name or not caption:
            raise InvalidInput(f"{where}: video and caption must not be empty")
        if name in seen:
            raise InvalidInput(f"{where}: video {name!r} already on line {seen[name]}")
        seen[name] = start
        numbers = {c: _number(cells.get(c), c, where) for c in NUMBERS}
        frames = numbers["frame"]
        if frames is not None and not frames.is_integer():
            raise InvalidInput(f"{where}: frame: expected a whole number, got {frames}")
        items.append(CaptionItem(
            uid=name,
            video_path=videos.check(root / name),
            caption=caption,
            aesthetic_score=numbers["aesthetic score"],
            motion_score=numbers["motion score"],
            temporal_consistency_score=numbers["temporal consistency score"],
            camera_motion=(cells.get("camera motion") or "").strip() or None,
            frames=None if frames is None else int(frames),
            fps=numbers["fps"],
            seconds=numbers["seconds"],
            source_file=str(path),
            line=start,
        ))
    return LoadedSet("openvid", path, items, videos.warn("openvid", path))
