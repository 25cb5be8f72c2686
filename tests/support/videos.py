"""A small set of REAL encoded videos, good and broken, with benchmark annotations.

``make_video_set(tmp_path)`` writes, in well under a second on 2 cores::

    root/videos/            the clips (valid and broken, see below)
    root/OpenVid-1M.csv     OpenVid captions: ``video`` is the name inside videos/
    root/video_info.meta.jsonl   MotionBench QA: ``video_path`` is ``videos/<name>``
    root/motionvid_qa.json  MotionVid-QA preference records: ``video`` is ``videos/<name>``

so ``load_openvid(vs.openvid_csv, vs.video_dir)``, ``load_motionbench(vs.root)``
and ``load_motionvid_qa(vs.motionvid_json)`` read them. Every annotation file
lists every clip, valid and broken, as a crawled data set would.

Each clip is a shape of one colour sliding in one direction across a striped,
noisy background, so consecutive frames differ and the caption says what moves.
Everything (pixels, file bytes, captions, answer letters) follows from ``seed``;
encoders run single-threaded, so the bytes do not depend on the core count.

Encoders. The PyAV 18.1.0 wheel (FFmpeg 8.1.2) ships, for video: libx264,
libx265, libvpx (VP8), libvpx-vp9, libsvtav1 and FFmpeg's own mpeg4, mpeg1/2,
mjpeg, ffv1 (plus hardware-only ones such as h264_nvenc, unusable here); it
has no libopenh264, libxvid or libaom. Decoders: FFmpeg's native h264, hevc,
vp8, vp9, av1, mpeg4, plus libvpx-vp9 and libdav1d. Where an encoder is missing
(another wheel or a system FFmpeg) a clip falls back along its ``_CANDIDATES``
row: h264 -> libopenh264 -> mpeg4, vp9 -> vp8 -> mpeg4 (in .mkv), and
``VideoFile.codec`` / the file name say what was written.

Broken files (``VideoFile.broken`` is the kind; ``frames``, ``fps``, size and
codec describe the clip as encoded before it was broken, or, for ``empty``, the
clip that should have been there):

``truncated``  the bytes of a valid clip cut in the middle of its middle packet.
               mp4, moov atom at the end (FFmpeg's default): ``av.open`` raises
               InvalidDataError.
               mp4, faststart (moov first): opens; the cut packet demuxes with
               ``packet.is_corrupt``, the rest are missing (``stream.frames``
               still counts them); h264 decoding raises InvalidDataError at the
               cut packet, defaults or not.
               avi: opens; the cut packet demuxes with ``packet.is_corrupt`` and
               fewer packets than ``stream.frames``; mpeg4 decodes it with
               concealment (``frame.is_corrupt``) by default and raises with
               ``err_detect=explode`` (but not with frame threading, which
               loses the last packet's error).
               webm: opens and decodes the frames before the cut WITHOUT ANY
               ERROR; only the demuxed span falling short of
               ``container.duration`` (Segment Info) shows the loss.
``empty``      0 bytes: ``av.open`` raises InvalidDataError.
``damaged``    container intact, coded data of every non-key packet overwritten
               with seeded random bytes (see :func:`damage`; the keyframe is
               kept). h264 and mpeg4: FFmpeg's defaults mostly CONCEAL it (the
               frames come back, a few with ``frame.is_corrupt``; for about a
               quarter of seeds decoding raises instead); never silent. vp9:
               raises even with defaults. With ``err_detect=explode`` all three
               raise InvalidDataError, for every seed tried (0-39).
``short``      a valid clip of 3 frames: decodes cleanly; a policy (minimum
               frame count) has to reject it.

:func:`strict_check` is the detection recipe those findings recommend; the
unit test ``tests/unit/test_video_fixtures.py`` holds every file to it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

BROKEN_KINDS = ("truncated", "empty", "damaged", "short")

# (encoder, codec as decoders name it, file extension, muxer) in order of preference.
_CANDIDATES: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "h264": (("libx264", "h264", ".mp4", "mp4"), ("libopenh264", "h264", ".mp4", "mp4"),
             ("mpeg4", "mpeg4", ".mp4", "mp4")),
    "vp9": (("libvpx-vp9", "vp9", ".webm", "webm"), ("libvpx", "vp8", ".webm", "webm"),
            ("mpeg4", "mpeg4", ".mkv", "matroska")),
    "vp9-mp4": (("libvpx-vp9", "vp9", ".mp4", "mp4"), ("mpeg4", "mpeg4", ".mp4", "mp4")),
    "mpeg4": (("mpeg4", "mpeg4", ".avi", "avi"),),
    "mpeg4-mp4": (("mpeg4", "mpeg4", ".mp4", "mp4"),),
}

# Fast, deterministic settings. threads=1: x264's output depends on its thread count.
_ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast", "threads": "1"},  # CABAC, 3 B-frames
    "libopenh264": {"threads": "1"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "threads": "1"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "threads": "1"},
    "mpeg4": {"threads": "1"},
}

COLORS = {
    "red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 230),
    "yellow": (235, 220, 40), "white": (245, 245, 245),
}
SHAPES = ("square", "circle")
DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class _Spec:
    stem: str
    family: str  # key of _CANDIDATES
    width: int
    height: int
    fps: int
    frames: int
    gop: int | None = None
    faststart: bool = False
    """mp4 only: the moov atom before the media data, as web-served files have it."""


# The valid clips: three codecs, three sizes, 8/12/25 fps, 1-3 s.
_VALID = (
    _Spec("clip-a", "h264", 64, 48, 8, 16),            # 2 s, one keyframe, B-frames
    _Spec("clip-b", "h264", 96, 64, 25, 75, gop=12, faststart=True),  # 3 s, keyframe every 12
    _Spec("clip-c", "vp9", 96, 64, 12, 24),             # 2 s
    _Spec("clip-d", "vp9-mp4", 80, 80, 25, 25, faststart=True),  # 1 s
    _Spec("clip-e", "mpeg4", 80, 80, 25, 25),           # 1 s
    _Spec("clip-f", "mpeg4-mp4", 64, 48, 12, 36),       # 3 s
)
# Broken files: (stem, kind, the valid clip they are made from).
_BROKEN = (
    ("bad-truncated-a", "truncated", "clip-a"),
    ("bad-truncated-b", "truncated", "clip-b"),
    ("bad-truncated-c", "truncated", "clip-c"),
    ("bad-truncated-e", "truncated", "clip-e"),
    ("bad-empty", "empty", "clip-a"),
    ("bad-damaged-a", "damaged", "clip-a"),
    ("bad-damaged-c", "damaged", "clip-c"),
    ("bad-damaged-e", "damaged", "clip-e"),
)
_SHORT = _Spec("bad-short", "h264", 64, 48, 8, 3)


@dataclass(frozen=True)
class VideoFile:
    name: str
    """File name inside ``VideoSet.video_dir`` (what the OpenVid CSV calls ``video``)."""
    path: Path
    codec: str
    """Codec as FFmpeg's decoders name it: ``h264``, ``vp9``, ``mpeg4`` (or a fallback)."""
    encoder: str
    container: str
    """The muxer: ``mp4``, ``webm``, ``avi`` or ``matroska``."""
    width: int
    height: int
    fps: int
    frames: int
    """Frames encoded (before breaking, for a broken file)."""
    broken: str | None
    """None for a valid clip, else one of BROKEN_KINDS."""
    caption: str
    shape: str
    color: str
    direction: str
    keyframes: int = 1
    faststart: bool = False
    """An mp4 whose moov atom precedes the media data (it survives truncation)."""

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height


@dataclass(frozen=True)
class VideoSet:
    root: Path
    video_dir: Path
    files: tuple[VideoFile, ...]
    openvid_csv: Path
    motionbench_meta: Path
    motionvid_json: Path
    encoders: dict[str, str] = field(default_factory=dict)
    """Clip family -> the encoder that wrote it (shows any fallback taken)."""

    @property
    def valid(self) -> list[VideoFile]:
        return [f for f in self.files if f.broken is None]

    @property
    def broken(self) -> list[VideoFile]:
        return [f for f in self.files if f.broken is not None]

    def of_kind(self, kind: str) -> list[VideoFile]:
        if kind not in BROKEN_KINDS:
            raise ValueError(f"kind: expected one of {BROKEN_KINDS}, got {kind!r}")
        return [f for f in self.files if f.broken == kind]

    def __getitem__(self, name: str) -> VideoFile:
        for f in self.files:
            if f.name == name or Path(f.name).stem == name:
                return f
        raise KeyError(name)


# ---------------------------------------------------------------- encoding


def _encoder_available(name: str) -> bool:
    import av

    if name not in av.codecs_available:
        return False
    try:
        av.Codec(name, "w")
    except Exception:  # a decoder-only name, or not built in
        return False
    return True


def _pick(family: str) -> tuple[str, str, str, str]:
    for candidate in _CANDIDATES[family]:
        if _encoder_available(candidate[0]):
            return candidate
    raise RuntimeError(f"no encoder for {family!r} clips among {_CANDIDATES[family]}")


def _draw(spec: _Spec, shape: str, color: str, direction: str, rng: np.random.Generator):
    """``spec.frames`` uint8 RGB frames: the shape crosses a striped noisy background."""
    w, h, n = spec.width, spec.height, spec.frames
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.where(((xx + yy // 2) // 4) % 2 == 0, 70, 130)
    tint = rng.integers(0, 40, size=3)
    noise = rng.integers(0, 24, size=(h, w, 3))
    background = np.clip(stripes[..., None] + tint + noise, 0, 255).astype(np.uint8)
    side = max(8, min(w, h) // 3)
    rgb = np.array(COLORS[color], dtype=np.uint8)
    disk = (np.mgrid[0:side, 0:side] - (side - 1) / 2) ** 2
    mask = disk.sum(axis=0) <= (side / 2) ** 2 if shape == "circle" else np.ones((side, side), bool)
    for i in range(n):
        t = i / max(1, n - 1)
        x0, y0 = (w - side) // 2, (h - side) // 2
        if direction in ("left", "right"):
            x0 = round((w - side) * (1 - t if direction == "left" else t))
        else:
            y0 = round((h - side) * (1 - t if direction == "up" else t))
        frame = background.copy()
        frame[y0:y0 + side, x0:x0 + side][mask] = rgb
        yield frame


def _encode(spec: _Spec, frames, encoder: str, muxer: str, path: Path) -> bytes:
    """Encode ``frames`` into ``path`` (faststart cannot write to a BytesIO) and return its bytes."""
    import av

    # bitexact: no random Matroska UIDs, no library version strings in the headers.
    options = {"fflags": "+bitexact"}
    if spec.faststart and muxer == "mp4":
        options["movflags"] = "+faststart"
    with av.open(str(path), "w", format=muxer, options=options) as out:
        stream = out.add_stream(encoder, rate=spec.fps, options=dict(_ENCODER_OPTIONS.get(encoder, {})))
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.thread_count = 1
        if spec.gop:
            stream.codec_context.gop_size = spec.gop
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


# ---------------------------------------------------------------- breaking


def packet_spans(data: bytes) -> list[tuple[int, int, bool]]:
    """(byte offset in ``data``, size, is keyframe) of each video packet, in file order."""
    import av

    spans: list[tuple[int, int, bool]] = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if not packet.size:
                continue
            payload = bytes(packet)
            # packet.pos is the payload's offset for mp4/avi, the block's for Matroska.
            start = max(packet.pos or 0, 0)
            offset = data.find(payload, start)
            if offset < 0:
                offset = data.find(payload)
            assert offset >= 0, "a packet's bytes are not stored contiguously in the file"
            spans.append((offset, packet.size, bool(packet.is_keyframe)))
    return spans


def truncate(data: bytes) -> bytes:
    """``data`` cut in the middle of the packet that holds its middle frame."""
    spans = sorted(packet_spans(data))
    offset, size, _ = spans[len(spans) // 2]
    return data[: offset + size // 2]


def damage(data: bytes, seed: int, *, header_bytes: int | None = None) -> bytes:
    """Every non-key packet's bytes ``[start, 3/4 of its size)`` replaced by random bytes.

    ``start`` is ``header_bytes`` when given, else a quarter of the packet.
    The container's boxes / elements / index are untouched, so the file opens
    and demuxes exactly as before; only coded picture data is garbage, and the
    keyframe is kept, so the first frame decodes.

    - a quarter (h264, mpeg4): slice / macroblock data. FFmpeg's defaults
      conceal it: every frame comes back, some with ``frame.is_corrupt``;
      ``err_detect=explode`` raises InvalidDataError.
    - 8 (vp9): from inside the frame header on. FFmpeg's vp9 decoder raises
      InvalidDataError even with defaults. Damage confined to VP9 tile data
      (what a quarter hits in larger frames) is NOT detectable by FFmpeg's vp9
      decoder with any option: it has no checksum and decodes garbage
      (libvpx's decoder, ``av.CodecContext.create("libvpx-vp9", "r")``, does
      reject it).
    """
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    damaged = 0
    for offset, size, key in packet_spans(data):
        lo = offset + (size // 4 if header_bytes is None else header_bytes)
        hi = offset + (3 * size) // 4
        if key or hi <= lo:
            continue
        out[lo:hi] = rng.integers(0, 256, size=hi - lo, dtype=np.uint8).tobytes()
        damaged += 1
    assert damaged, "no packet large enough to damage"
    return bytes(out)


# Where ``damage`` starts inside a packet, per codec (None: a quarter in).
_DAMAGE_HEADER_BYTES = {"vp9": 8, "vp8": 8}


# ---------------------------------------------------------------- detecting


@dataclass
class CheckReport:
    """What :func:`strict_check` saw; ``problem`` is None for a good file."""

    problem: str | None = None
    opened: bool = False
    header_frames: int = 0
    """``stream.frames`` (0 where the container keeps no count, as in WebM)."""
    packets: int = 0
    corrupt_packets: int = 0
    frames: int = 0
    corrupt_frames: int = 0
    width: int = 0
    height: int = 0
    error: str | None = None


DECODER_OPTIONS = {"err_detect": "explode"}
"""Set on ``stream.codec_context.options`` BEFORE the first decode. Passing it
to ``av.open(options=...)`` or ``stream_options=`` does not reach the decoder
PyAV decodes with (those go to the demuxer and avformat_find_stream_info)."""


def strict_check(source: str | Path | bytes, *, min_frames: int = 1) -> CheckReport:
    """Demux and decode every frame the recommended way; say what is wrong, if anything.

    A file is bad when any of these holds:
    - ``av.open`` raises (empty file; mp4 cut before its moov atom), or there
      is no video stream, or no packet;
    - a packet comes back with ``packet.is_corrupt`` (avi/mp4 cut mid-packet);
    - the container states a frame count (``stream.frames`` > 0, mp4 and avi)
      and fewer packets demux, or states a duration (``container.duration``,
      all three) and the demuxed frames span less than it minus 1.5 frames;
    - decoding with ``err_detect=explode`` raises ``av.FFmpegError``, or a
      frame has ``frame.is_corrupt`` (FFmpeg concealed an error), or fewer
      frames decode than packets demuxed;
    - fewer than ``min_frames`` frames.

    It decodes from the start. ``err_detect=explode`` after a seek into an
    open-GOP h264 stream raises on the leading B-frames of a valid file, so a
    reader that seeks should not treat that error alone as damage.
    """
    import av

    report = CheckReport()

    def open_():
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))

    try:
        with open_() as container:
            report.opened = True
            if not container.streams.video:
                report.problem = "no video stream"
                return report
            stream = container.streams.video[0]
            report.header_frames = stream.frames
            duration = container.duration / 1e6 if container.duration else None
            pts = []
            for packet in container.demux(stream):
                if packet.size:
                    report.packets += 1
                    report.corrupt_packets += bool(packet.is_corrupt)
                    if packet.pts is not None:
                        pts.append(packet.pts)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            span = None
            if pts and rate:
                span = (max(pts) - min(pts)) * float(stream.time_base) + 1 / rate
        with open_() as container:
            stream = container.streams.video[0]
            stream.codec_context.options = dict(DECODER_OPTIONS)
            for frame in container.decode(stream):
                report.frames += 1
                report.corrupt_frames += bool(frame.is_corrupt)
                report.width, report.height = frame.width, frame.height
    except av.FFmpegError as err:
        report.error = f"{type(err).__name__}: {err}"
        report.problem = ("decode failed: " if report.opened else "open failed: ") + report.error
        return report

    if not report.packets:
        report.problem = "no packets"
    elif report.corrupt_packets:
        report.problem = f"{report.corrupt_packets} packet(s) flagged corrupt by the demuxer"
    elif report.header_frames and report.packets < report.header_frames:
        report.problem = f"{report.packets} of the {report.header_frames} frames in the header demuxed"
    elif span is not None and duration is not None and span < duration - 1.5 / rate:
        report.problem = f"frames span {span:.3f} s of the container's {duration:.3f} s"
    elif report.corrupt_frames:
        report.problem = f"{report.corrupt_frames} frame(s) decoded with concealed errors"
    elif report.frames < report.packets:
        report.problem = f"{report.frames} frames decoded from {report.packets} packets"
    elif report.frames < min_frames:
        report.problem = f"{report.frames} frames, fewer than {min_frames}"
    return report


# ---------------------------------------------------------------- annotations


def _choose(rng: np.random.Generator) -> tuple[str, str, str]:
    return (
        str(rng.choice(SHAPES)),
        str(rng.choice(list(COLORS))),
        str(rng.choice(DIRECTIONS)),
    )


def _caption(shape: str, color: str, direction: str) -> str:
    return f"A {color} {shape} moves {direction} across a striped background."


def _options(right: str, choices: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """(option lines "A. ..", letter of ``right``) with 4 shuffled options."""
    wrong = [c for c in choices if c != right]
    picked = [right] + [str(w) for w in rng.choice(wrong, size=3, replace=False)]
    order = rng.permutation(4)
    options = [picked[k] for k in order]
    letters = "ABCD"
    lines = "\n".join(f"{letters[k]}. {o}" for k, o in enumerate(options))
    return lines, letters[options.index(right)]


def _write_annotations(vs_root: Path, files: list[VideoFile], rng: np.random.Generator) -> tuple[Path, Path, Path]:
    openvid = vs_root / "OpenVid-1M.csv"
    with openvid.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "aesthetic score", "motion score",
                         "temporal consistency score", "camera motion", "frame", "fps", "seconds"])
        for v in files:
            writer.writerow([
                v.name, v.caption, f"{rng.uniform(4, 6):.3f}", f"{rng.uniform(1, 8):.3f}",
                f"{rng.uniform(0.95, 1):.4f}", "static", v.frames, v.fps, f"{v.seconds:g}",
            ])

    meta = vs_root / "video_info.meta.jsonl"
    with meta.open("w", encoding="utf-8") as f:
        for v in files:
            key = Path(v.name).stem
            direction_lines, direction_answer = _options(v.direction, list(DIRECTIONS), rng)
            color_lines, color_answer = _options(v.color, list(COLORS), rng)
            record = {
                "key": key,
                "video_path": f"videos/{v.name}",
                "video_type": "synthetic",
                "question_type": "Motion Recognition",
                "video_info": {"duration": v.seconds, "fps": v.fps, "resolution": f"{v.width}x{v.height}"},
                "qa": [
                    {"uid": f"{key}-direction",
                     "question": f"Which way does the {v.shape} move?\n{direction_lines}",
                     "answer": direction_answer, "start": 0.0, "end": v.seconds},
                    {"uid": f"{key}-color",
                     "question": f"What colour is the moving {v.shape}?\n{color_lines}",
                     "answer": color_answer, "start": 0.0, "end": v.seconds},
                ],
            }
            f.write(json.dumps(record) + "\n")

    motionvid = vs_root / "motionvid_qa.json"
    records = []
    for v in files:
        wrong = str(rng.choice([d for d in DIRECTIONS if d != v.direction]))
        records.append({
            "question": f"Describe the motion of the {v.color} {v.shape}.",
            "video": f"videos/{v.name}",
            "chosen": f"The {v.color} {v.shape} moves steadily {v.direction}.",
            "rejected": f"The {v.color} {v.shape} moves {wrong}.",
        })
    motionvid.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return openvid, meta, motionvid


# ---------------------------------------------------------------- the set


def make_video_set(root: Path, *, seed: int = 0) -> VideoSet:
    """Write the clips and annotation files under ``root`` (see the module doc)."""
    root = Path(root)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encoders: dict[str, str] = {}
    files: list[VideoFile] = []
    encoded: dict[str, tuple[bytes, VideoFile]] = {}

    def build(spec: _Spec) -> tuple[bytes, VideoFile]:
        encoder, codec, ext, muxer = _pick(spec.family)
        encoders[spec.family] = encoder
        shape, color, direction = _choose(rng)
        name = f"{spec.stem}_{codec}_{spec.width}x{spec.height}_{spec.fps}fps{ext}"
        path = video_dir / name
        data = _encode(spec, _draw(spec, shape, color, direction, rng), encoder, muxer, path)
        keyframes = sum(key for _, _, key in packet_spans(data))
        info = VideoFile(
            name=name, path=path, codec=codec, encoder=encoder, container=muxer,
            width=spec.width, height=spec.height, fps=spec.fps, frames=spec.frames,
            broken=None, caption=_caption(shape, color, direction),
            shape=shape, color=color, direction=direction, keyframes=keyframes,
            faststart=spec.faststart and muxer == "mp4",
        )
        files.append(info)
        return data, info

    for spec in _VALID:
        encoded[spec.stem] = build(spec)

    for stem, kind, source in _BROKEN:
        data, info = encoded[source]
        name = f"{stem}_{info.name.split('_', 1)[1]}"
        if kind == "truncated":
            broken = truncate(data)
        elif kind == "empty":
            broken = b""
        else:
            broken = damage(data, seed=int(rng.integers(2**31)),
                            header_bytes=_DAMAGE_HEADER_BYTES.get(info.codec))
        info = replace(info, name=name, path=video_dir / name, broken=kind)
        info.path.write_bytes(broken)
        files.append(info)

    build(_SHORT)
    files[-1] = replace(files[-1], broken="short")

    openvid, meta, motionvid = _write_annotations(root, files, rng)
    return VideoSet(
        root=root, video_dir=video_dir, files=tuple(files), openvid_csv=openvid,
        motionbench_meta=meta, motionvid_json=motionvid, encoders=encoders,
    )
