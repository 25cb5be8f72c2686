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
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


Source = str | Path | bytes
"""A video: a local path, or the encoded bytes of a file (a shard member, a store object)."""


def _describe(source: Source, name: str | None) -> str:
    if name:
        return name
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)


def _open(source: Source, name: str | None = None):
    """An open container; ``name`` is what errors call the video (default: its path)."""
    what = _describe(source, name)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise NotFound(f"path: video file {what!r} does not exist")
    if isinstance(source, bytes) and not source:
        raise InvalidInput(f"path: {what!r} is empty (0 bytes)")
    import av  # video I/O only: scoring saved predictions does not need FFmpeg

    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except av.FFmpegError as err:
        raise InvalidInput(f"path: {what!r} is not a readable video ({_ffmpeg_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise InvalidInput(f"path: {what!r} has no video stream")
    return container


def _ffmpeg_reason(err: Exception) -> str:
    """FFmpeg's own words for an error, without the file name PyAV appends."""
    reason = getattr(err, "strerror", None) or str(err)
    where = getattr(err, "filename", None)
    return f"{reason} in {where}" if where and "(" in str(where) else reason


@contextlib.contextmanager
def _reading(source: Source, name: str | None):
    """An open container whose FFmpeg errors (a damaged packet, a cut file) name the video."""
    import av

    with _open(source, name) as container:
        try:
            yield container
        except av.FFmpegError as err:
            raise InvalidInput(
                f"path: {_describe(source, name)!r} is damaged: {_ffmpeg_reason(err)}"
            ) from None


DECODER_OPTIONS = {"err_detect": "explode"}
"""FFmpeg decoder options: raise on a damaged bitstream instead of concealing it (h264 and
mpeg4 otherwise return every frame of a file whose packets were overwritten). They must be
set on the stream's codec context before the first decode; options given to ``av.open``
reach the demuxer only."""


def _timestamps(source: Source, name: str | None = None) -> tuple[list[int], float, float, int, int]:
    """Sorted frame pts, time base, average fps, width, height.

    Demuxing alone also finds a cut file: a packet the demuxer flags corrupt
    (mp4 or avi cut mid-packet), fewer packets than the header's frame count, or
    frames spanning less than the stream's stated duration (a cut webm decodes
    its first frames without any error).
    """
    what = _describe(source, name)
    with _reading(source, name) as container:
        stream = container.streams.video[0]
        pts, corrupt = [], 0
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None:
                pts.append(packet.pts)
                corrupt += bool(packet.is_corrupt)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = float(stream.time_base or 0)
        stated = _stated_duration(container, stream, time_base)
        header_frames = stream.frames
    pts.sort()
    if not pts:
        raise InvalidInput(f"path: {what!r} has a video stream with no frames")
    if corrupt:
        raise InvalidInput(f"path: {what!r} is damaged: {corrupt} packet(s) flagged corrupt "
                           "(a file cut short?)")
    if header_frames and len(pts) < header_frames:
        raise InvalidInput(f"path: {what!r} is cut short: {len(pts)} of the {header_frames} "
                           "frames its header lists are there")
    if stated and rate and time_base:
        span = (pts[-1] - pts[0]) * time_base + 1 / rate
        if span < stated - 1.5 / rate:
            raise InvalidInput(f"path: {what!r} is cut short: its frames span {span:.2f} s of the "
                               f"{stated:.2f} s it states")
    return pts, time_base, rate, width, height


def _stated_duration(container, stream, time_base: float) -> float | None:
    """Seconds the video stream says it lasts, when that is the video's own figure: the
    stream's duration, or the container's when the video is its only stream (with audio,
    the container's duration may be the audio's)."""
    if stream.duration and time_base:
        return float(stream.duration) * time_base
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def probe(path: Source, *, name: str | None = None) -> VideoInfo:
    """Frame count, fps, duration and size of the first video stream."""
    pts, time_base, rate, width, height = _timestamps(path, name)
    frame = 1 / rate if rate else 0.0
    duration = (pts[-1] - pts[0]) * time_base + frame
    return VideoInfo(frames=len(pts), fps=rate, duration=duration, width=width, height=height)


def decode_frames(
    path: Source,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` RGB frames from ``[start, end]`` seconds (default: all).

    Exactly one of ``num_frames`` (spread uniformly, both ends included, frames
    repeat when the segment has fewer) and ``fps`` (the frame nearest to each
    of ``start, start + 1/fps, ...``) must be given. Times are measured from
    the first frame. ``path`` may be the file's bytes; ``name`` is what errors
    call it.
    """
    if (num_frames is None) == (fps is None):
        raise InvalidInput("decode_frames: give exactly one of num_frames and fps")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise InvalidInput(f"num_frames: expected an integer >= 1, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise InvalidInput(f"fps: expected a positive number, got {fps!r}")

    timeline = frame_times(path, name=name)
    times = timeline.times
    lo = bisect.bisect_left(times, start - 1e-6) if start is not None else 0
    hi = bisect.bisect_right(times, end + 1e-6) if end is not None else len(times)
    if lo >= hi:
        raise InvalidInput(
            f"segment: [{start}, {end}] s holds no frame of {_describe(path, name)!r}, "
            f"whose frames span [0, {times[-1]:.3f}] s"
        )
    if num_frames is not None:
        picks = [lo + i for i in uniform_indices(hi - lo, num_frames)]
    else:
        targets = np.arange(times[lo], times[hi - 1] + 1e-6, 1 / fps)
        picks = [_nearest(times, float(t), lo, hi) for t in targets]
    return decode_at(path, timeline, picks, name=name)


@dataclass(frozen=True)
class Timeline:
    """A video's frames in presentation order, from demuxing alone (no decoding)."""

    pts: list[int]
    times: list[float]
    """Seconds from the first frame, per frame."""
    fps: float
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.pts)


def frame_times(path: Source, *, name: str | None = None) -> Timeline:
    """The presentation timestamps of every frame of the first video stream."""
    pts, time_base, rate, width, height = _timestamps(path, name)
    return Timeline(pts, [(p - pts[0]) * time_base for p in pts], rate, width, height)


def decode_at(
    path: Source, timeline: Timeline, picks: list[int], *, name: str | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> np.ndarray | list[Any]:
    """uint8 ``(len(picks), H, W, 3)``: the frames at indices ``picks`` of ``timeline``.

    Decodes from the keyframe before the first pick to the last pick and
    converts only the picked frames to RGB, with FFmpeg's error concealment
    turned into errors (:data:`DECODER_OPTIONS`). A damaged packet, a frame
    FFmpeg had to conceal, or a frame the container lists but the decoder
    never returns is an error naming the video. ``convert`` (an ``av.VideoFrame``
    -> anything) replaces the RGB array per picked frame; the result is then the
    list of what it returned.
    """
    first = min(picks)
    try:
        return _decode_picks(path, timeline, picks, name, seek=first > 0, convert=convert)
    except InvalidInput:
        if first == 0:
            raise
        # With err_detect=explode, a seek into an open-GOP stream raises on a valid file:
        # decode from the start before calling the file damaged.
        return _decode_picks(path, timeline, picks, name, seek=False, convert=convert)


def _decode_picks(
    path: Source, timeline: Timeline, picks: list[int], name: str | None, *, seek: bool,
    convert: Callable[[Any], Any] | None,
) -> np.ndarray | list[Any]:
    pts = timeline.pts
    wanted = {pts[i] for i in picks}
    last = pts[max(picks)]
    found: dict[int, Any] = {}
    with _reading(path, name) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = dict(DECODER_OPTIONS)
        # Slice threads only: frame threading loses the error of a file's last packet.
        stream.thread_type = "SLICE"
        if seek:
            # Seek to the keyframe before the first pick instead of decoding from 0.
            container.seek(pts[min(picks)], stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.is_corrupt:
                raise InvalidInput(f"path: {_describe(path, name)!r} is damaged: frame at pts "
                                   f"{frame.pts} decoded with errors")
            if frame.pts in wanted:
                found[frame.pts] = convert(frame) if convert else frame.to_ndarray(format="rgb24")
            if frame.pts is not None and frame.pts >= last:
                break
    lost = wanted - found.keys()
    if lost:
        raise InvalidInput(
            f"path: {len(lost)} frames of {_describe(path, name)!r} listed by the container "
            "did not decode (a damaged file?)"
        )
    if convert is not None:
        return [found[pts[i]] for i in picks]
    return np.stack([found[pts[i]] for i in picks])


def _nearest(times: list[float], t: float, lo: int, hi: int) -> int:
    """Index in ``[lo, hi)`` of the time closest to ``t``."""
    i = bisect.bisect_left(times, t, lo, hi)
    if i == hi:
        return hi - 1
    if i > lo and t - times[i - 1] <= times[i] - t:
        return i - 1
    return i
