"""Toy motion clips: one coloured square moving across a plain background.

Small, deterministic videos for tests and the first demo. Each clip comes with
a full caption (scene + motion) and a static caption (scene only), the pair
VDA needs: the teacher is conditioned on the static caption, so motion has to
come from the encoder's features.

The square wraps around the frame edges, so its position in any one frame says
nothing about the direction; only the change between frames does. Clip ``i``
of a seed draws from its own generator, seeded with ``(seed, i)``, so it is the
same bytes however many clips are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from vidalign.errors import InvalidInput, NotFound

DIRECTIONS = ("left", "right", "up", "down")
"""Motion directions, image coordinates: "up" is towards row 0."""

SQUARE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
"""Saturated square colours; none is close to a background colour."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
"""Neutral backgrounds, so the square is found by colour alone."""

_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""(row, column) displacement per unit of speed."""


@dataclass(frozen=True)
class ToyClip:
    """One toy video with its captions and ground-truth labels."""

    clip_id: str
    """Stable id, ``f"toy-{seed}-{index:05d}"``."""
    video: np.ndarray
    """uint8 ``(F, H, W, 3)`` RGB frames."""
    caption: str
    """Scene and motion: ``"a red square on a gray background moves right"``."""
    static_caption: str
    """Scene only, no motion words: ``"a red square on a gray background"``."""
    direction: str
    """One of :data:`DIRECTIONS`."""
    color: str
    """Square colour, a key of :data:`SQUARE_COLORS`."""


def _check_int(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{field}: expected an integer >= {minimum}, got {value!r}")


def _make_clip(seed: int, index: int, frames: int, size: int) -> ToyClip:
    rng = np.random.default_rng([seed, index])
    color = str(rng.choice(list(SQUARE_COLORS)))
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    direction = str(rng.choice(DIRECTIONS))
    side = int(rng.integers(max(2, size // 8), max(2, size // 4) + 1))
    # Under half a frame per step, so the shortest wrapped displacement between
    # consecutive frames is the true one and the direction stays readable.
    speed = int(rng.integers(1, max(1, size // 12) + 1))
    row0, col0 = (int(v) for v in rng.integers(0, size, 2))

    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND_COLORS[background]
    d_row, d_col = _STEP[direction]
    offsets = np.arange(side)
    for f in range(frames):
        rows = (row0 + d_row * speed * f + offsets) % size
        cols = (col0 + d_col * speed * f + offsets) % size
        video[f, rows[:, None], cols[None, :]] = SQUARE_COLORS[color]

    article = "an" if color[0] in "aeiou" else "a"
    static_caption = f"{article} {color} square on a {background} background"
    return ToyClip(
        clip_id=f"toy-{seed}-{index:05d}",
        video=video,
        caption=f"{static_caption} moves {direction}",
        static_caption=static_caption,
        direction=direction,
        color=color,
    )


def moving_squares(n: int, *, frames: int = 16, size: int = 32, seed: int = 0) -> list[ToyClip]:
    """``n`` clips of ``frames`` square ``size`` x ``size`` frames.

    Per clip: square colour, background, direction, side (size/8 to size/4),
    speed (1 to size/12 pixels per frame) and start position are random.
    """
    _check_int("n", n, 0)
    _check_int("frames", frames, 2)
    _check_int("size", size, 8)
    _check_int("seed", seed, 0)
    return [_make_clip(seed, i, frames, size) for i in range(n)]


def write_mp4(clip: ToyClip | np.ndarray, path: str | Path, fps: int = 8) -> None:
    """Encode a clip (or uint8 ``(F, H, W, 3)`` frames) as H.264 (MPEG-4 Part 2 if absent).

    yuv420p, the pixel format players accept, halves chroma resolution, so
    height and width must be even: decoded pixels differ slightly from the
    input, by that conversion only. H.264 is written lossless (``qp 0``), so the
    decoded frames are the same in every process: x264's lossy rate control
    (its macroblock-tree lookahead) gave different bytes and decoded pixels from
    one run to the next for the same frames, which made data written by two
    processes differ (a resumed build, a retried job). On SynthMotion's flat
    colours lossless files are no larger. The MPEG-4 fallback stays lossy.
    """
    video = clip.video if isinstance(clip, ToyClip) else clip
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4:
        raise InvalidInput(
            f"clip: expected a ToyClip or a uint8 (F, H, W, 3) array, got {type(video).__name__} "
            f"{getattr(video, 'dtype', '')} {getattr(video, 'shape', '')}"
        )
    frames, height, width, channels = video.shape
    if frames == 0 or channels != 3 or height % 2 or width % 2:
        raise InvalidInput(
            f"clip.video: expected shape (F >= 1, even H, even W, 3), got {video.shape}"
        )
    _check_int("fps", fps, 1)
    import av  # video I/O only: training on in-memory clips does not need FFmpeg

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": "0"}
        else:
            stream.bit_rate = 4_000_000
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of the first video stream as uint8 ``(F, H, W, 3)`` RGB."""
    if not Path(path).is_file():
        raise NotFound(f"path: video file {str(path)!r} does not exist")
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InvalidInput(f"path: {str(path)!r} has no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise InvalidInput(f"path: {str(path)!r} has a video stream with no frames")
    return np.stack(frames)
