"""Decode benchmark videos into uint8 frames: N spread uniformly, or at a target fps.

Evaluations fix either a number of frames spread over the clip or a sampling
rate (FAVOR-Bench's reference script feeds Qwen2.5-VL at 1 fps). Both are
picked from presentation timestamps, not from frame counts in the header, so
variable-frame-rate files and containers without a frame count sample
correctly. Only the picked frames are converted
to RGB, so a long video costs decoding time but not memory.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidalign.errors import InvalidInput, NotFound
from vidalign.video import uniform_indices


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns from demuxing, without decoding."""

    frames: int
    fps: float
    """The stream's average rate, frames per second."""
    duration: float
    """Seconds from the first frame's timestamp to the last one's, plus one frame."""
    width: int
    height: int


def _open(path: str | Path):
    if not Path(path).is_file():
        raise NotFound(f"path: video file {str(path)!r} does not exist")
    import av  # video I/O only: scoring saved predictions does not need FFmpeg

    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise InvalidInput(f"path: {str(path)!r} is not a readable video ({err})") from None
    if not container.streams.video:
        container.close()
        raise InvalidInput(f"path: {str(path)!r} has no video stream")
    return container


def _timestamps(path: str | Path) -> tuple[list[int], float, float, int, int]:
    """Sorted frame pts, time base, average fps, width, height."""
    with _open(path) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = float(stream.time_base)
    if not pts:
        raise InvalidInput(f"path: {str(path)!r} has a video stream with no frames")
    return pts, time_base, rate, width, height


def probe(path: str | Path) -> VideoInfo:
    """Frame count, fps, duration and size of the first video stream."""
    pts, time_base, rate, width, height = _timestamps(path)
    frame = 1 / rate if rate else 0.0
    duration = (pts[-1] - pts[0]) * time_base + frame
    return VideoInfo(frames=len(pts), fps=rate, duration=duration, width=width, height=height)


def decode_frames(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` RGB frames from ``[start, end]`` seconds (default: all).

    Exactly one of ``num_frames`` (spread uniformly, both ends included, frames
    repeat when the segment has fewer) and ``fps`` (the frame nearest to each
    of ``start, start + 1/fps, ...``) must be given. Times are measured from
    the first frame.
    """
    if (num_frames is None) == (fps is None):
        raise InvalidInput("decode_frames: give exactly one of num_frames and fps")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise InvalidInput(f"num_frames: expected an integer >= 1, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise InvalidInput(f"fps: expected a positive number, got {fps!r}")

    pts, time_base, _, _, _ = _timestamps(path)
    times = [(p - pts[0]) * time_base for p in pts]
    lo = bisect.bisect_left(times, start - 1e-6) if start is not None else 0
    hi = bisect.bisect_right(times, end + 1e-6) if end is not None else len(times)
    if lo >= hi:
        raise InvalidInput(
            f"segment: [{start}, {end}] s holds no frame of {str(path)!r}, "
            f"whose frames span [0, {times[-1]:.3f}] s"
        )
    if num_frames is not None:
        picks = [lo + i for i in uniform_indices(hi - lo, num_frames)]
    else:
        targets = np.arange(times[lo], times[hi - 1] + 1e-6, 1 / fps)
        picks = [_nearest(times, float(t), lo, hi) for t in targets]

    wanted = {pts[i] for i in picks}
    last = pts[max(picks)]
    found: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        if lo > 0:
            # Seek to the keyframe before the segment instead of decoding from 0.
            container.seek(pts[lo], stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts in wanted:
                found[frame.pts] = frame.to_ndarray(format="rgb24")
            if frame.pts is not None and frame.pts >= last:
                break
    lost = wanted - found.keys()
    if lost:
        raise InvalidInput(
            f"path: {len(lost)} frames of {str(path)!r} listed by the container "
            "did not decode (a damaged file?)"
        )
    return np.stack([found[pts[i]] for i in picks])


def _nearest(times: list[float], t: float, lo: int, hi: int) -> int:
    """Index in ``[lo, hi)`` of the time closest to ``t``."""
    i = bisect.bisect_left(times, t, lo, hi)
    if i == hi:
        return hi - 1
    if i > lo and t - times[i - 1] <= times[i] - t:
        return i - 1
    return i
