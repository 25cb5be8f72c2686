"""MotionEnhancer priors over a dataset, on the teacher pool: ``vidalign priors extract | show``.

``extract`` reads a MotionBench-layout dataset (SynthMotion included) with the
benchmark loaders, asks a CogVideoX teacher for the priors of every clip
(in process by default, or a ``vidalign teacher serve --teacher-model ...`` service
with ``--teacher host:port``) and writes them to a store::

    <out>/shard-00000/<clip>.safetensors   one priors file per clip (vidalign.motionenhancer.io format)
    <out>/shard-00000/MANIFEST.json        meta: clip_ids, keys, source (what made them)
    <out>/shard-00001/...
    <out>/index/index.json                 every clip: id, key, shard, prompt, video; source

A unit is one video with its caption when the dataset has a SynthMotion
sidecar (``synthmotion.jsonl``), else one question (prompt = the question
text, its segment of the video). With ``--bench records|shards|motionvid``
(a ``data prepare`` subset, a ``data shard`` set, MotionVid-QA) a unit is one
clip, keyed by the id the trainers use, prompted with its caption or else its
first question; SFT on the same records or shards finds each clip's priors by
that id. A clip that cannot be decoded is skipped (``<out>/skipped.jsonl``:
file, record line, reason; the index lists only the clips it has), and the job
stops once more than ``--max-skip-fraction`` of the clips read were bad. Each shard is an artifact (files first,
manifest last): a killed run leaves whole shards only, and a rerun skips the
shards committed with the same source and the same clips. The index is
committed last; ``load_priors_set`` refuses a set without it. Planning,
resumption and commits are ``vidalign.shards``'s; ``--rank``/``--world-size``
split the shards among processes.

``show`` renders, per clip, one PNG per selected token (its attention over the
video-token grid, upsampled and overlaid on the frames, titled with the token
text) and ``heads.png``, a bar chart of the MHS head scores (selected heads
highlighted). PNGs are drawn with Pillow (matplotlib is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vidalign.errors import InvalidInput, NotFound, VidalignError
from vidalign.log import get_logger
from vidalign.motionenhancer.io import PriorsSet, clip_key, load_priors_set
from vidalign.papers import (
    ME_CROSS_STREAM_MEMORY,
    ME_DDIM_STEPS,
    ME_GUIDANCE,
    ME_HEAD_RATIO,
    ME_TOKEN_RATIO,
)
from vidalign.shards import Shard, ShardingConfig, ShardOutput, run_sharded
from vidalign.store import open_store
from vidalign.teacher.credential_args import client_credentials
from vidalign.teacher.protocol import AttentionPriorsRequest, TeacherInfo, public_name

log = get_logger("vidalign.priors")

PRODUCER = "vidalign priors extract"


# --- the dataset ----------------------------------------------------------------


@dataclass(frozen=True)
class PriorsClip:
    """One unit of extraction: a video (or a segment of it) and its prompt."""

    clip_id: str
    video_path: Path | str
    prompt: str
    segment: tuple[float, float] | None = None
    record: Any = None
    """The ``VideoRecord`` of a records or shards source (read through its store)."""


RECORD_SOURCES = ("records", "shards", "motionvid")
"""``--bench`` values read as training records (``vidalign.data.videoset``): one unit per
clip, prompted with its caption, or its first question when it has none."""


def record_clips(bench: str, data: str, video_dir: str | None) -> tuple[list[PriorsClip], Any]:
    """The units of a records, shards or MotionVid-QA source, and the source's records."""
    from vidalign.data.videoset import read_records

    loaded = read_records(bench, str(data), video_dir=str(video_dir or ""))
    clips = []
    for record in loaded.records:
        prompt = record.caption or (record.qa[0].prompt if record.qa else "")
        if not prompt:
            raise InvalidInput(f"{record.origin}: clip {record.id} has neither a caption nor a question")
        clips.append(PriorsClip(clip_id=record.id, video_path=record.video, prompt=prompt,
                                segment=record.segment, record=record))
    return clips, loaded


def dataset_clips(
    data: str | Path, *, bench: str = "motionbench", video_dir: str | Path | None = None,
    skip_missing: bool = False,
) -> list[PriorsClip]:
    """The units of a dataset: per video with a sidecar caption, else per question; per clip
    for the record sources (:data:`RECORD_SOURCES`)."""
    from vidalign.data.benchmarks import load_benchmark
    from vidalign.data.synth import SIDECAR_FILE, read_sidecar

    if bench in RECORD_SOURCES:
        return _unique(record_clips(bench, str(data), str(video_dir) if video_dir else None)[0])
    loaded = load_benchmark(bench, data, video_dir=video_dir)
    if loaded.missing and not skip_missing:
        raise NotFound(
            f"data: {len(loaded.missing)} videos are missing (first: {loaded.missing[0]}); "
            "fetch them or pass --skip-missing"
        )
    missing = {Path(p).resolve() for p in loaded.missing}
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    captions: dict[Path, tuple[str, str]] = {}
    if (root / SIDECAR_FILE).is_file():
        captions = {r.video_path.resolve(): (r.clip_id, r.caption) for r in read_sidecar(root)}
    clips: list[PriorsClip] = []
    seen_videos: set[Path] = set()
    for item in loaded.items:
        video = Path(item.video_path).resolve()
        if video in missing:
            continue
        if video in captions and captions[video][1].strip():
            if video in seen_videos:
                continue
            seen_videos.add(video)
            clip_id, caption = captions[video]
            clips.append(PriorsClip(clip_id=clip_id, video_path=video, prompt=caption))
        else:
            clips.append(PriorsClip(
                clip_id=item.uid, video_path=video, prompt=item.question, segment=item.segment
            ))
    return _unique(clips)


def _unique(clips: list[PriorsClip]) -> list[PriorsClip]:
    ids = [c.clip_id for c in clips]
    if len(set(ids)) != len(ids):
        raise InvalidInput("data: clip ids are not unique; priors are keyed by them")
    keys = [clip_key(i) for i in ids]
    if len(set(keys)) != len(keys):
        raise InvalidInput("data: clip ids collide after sanitising for file names")
    return clips


def load_frames(
    video_path: str | Path, *, frames: int, height: int, width: int,
    segment: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 (frames, height, width, 3): ``frames`` spread uniformly, resized when needed."""
    from vidalign.data.frames import decode_frames

    start, end = segment if segment is not None else (None, None)
    video = decode_frames(video_path, num_frames=frames, start=start, end=end)
    if video.shape[1:3] != (height, width):
        x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(
            x, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
        video = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return video


# --- extraction -----------------------------------------------------------------


class PriorsTeacher(Protocol):
    """What extraction needs: ``LocalTeacher`` or ``GrpcTeacher`` on a CogVideoX model."""

    def info(self) -> TeacherInfo: ...

    def attention_priors(self, request: AttentionPriorsRequest) -> Any: ...

    def close(self) -> None: ...


@dataclass(kw_only=True)
class ExtractConfig(ShardingConfig):
    """What ``extract_dataset_priors`` does; ``shard_size``, ``rank`` and ``world_size`` are
    ``ShardingConfig``'s."""

    data: str
    """Dataset directory (or its meta file) in a benchmark loader's layout."""
    out: str
    """Store URI (local dir or s3://bucket/prefix) of the priors set."""
    bench: str = "motionbench"
    """Loader name (``vidalign.data.benchmarks.QA_BENCHMARKS``); SynthMotion is motionbench."""
    video_dir: str | None = None
    model: str = "tiny-cogvideox"
    """CogVideoX model: loaded in process, or the model the --teacher service must host."""
    teacher: str = ""
    """host:port of a CogVideoX teacher service; empty: in process."""
    credentials: Any = None
    """``vidalign.teacher.credentials.TeacherCredentials`` for ``teacher`` (TLS, token); None:
    plaintext (with ``VIDALIGN_TEACHER_TOKEN`` if set)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    frames: int = 0
    """Frames sampled per clip; 0: the model's."""
    height: int = 0
    """Frame size the clips are resized to; 0: the model's."""
    width: int = 0
    steps: int = ME_DDIM_STEPS
    """DDIM inversion steps, and as many denoising steps after them."""
    guidance: float = ME_GUIDANCE
    head_ratio: float = ME_HEAD_RATIO
    token_ratio: float = ME_TOKEN_RATIO
    chunk_size: int = 0
    """Query rows per attention-capture chunk; 0: auto (from the token count and device)."""
    memory: bool = ME_CROSS_STREAM_MEMORY
    skip_missing: bool = False
    max_skip_fraction: float = 0.01
    """Stop when more than this fraction of the clips read were unreadable (``skipped.jsonl``)."""


def _connect(config: ExtractConfig) -> PriorsTeacher:
    from vidalign.teacher.client import GrpcTeacher, LocalTeacher

    if config.teacher:
        teacher = GrpcTeacher(config.teacher, credentials=config.credentials)
        teacher.wait_ready(timeout=60.0)
        return teacher
    return LocalTeacher(config.model, device=config.device)


def extract_dataset_priors(config: ExtractConfig, *, teacher: PriorsTeacher | None = None) -> str:
    """Priors of every clip of ``config.data`` into ``config.out``; returns the set's URI.

    Shards already committed from the same source and clips are kept, so a
    rerun after a crash (or of a finished job) only does the missing work.
    """
    clips = dataset_clips(
        config.data, bench=config.bench, video_dir=config.video_dir, skip_missing=config.skip_missing
    )
    if not clips:
        raise InvalidInput(f"data: {config.data} holds no clips")
    store = open_store(config.out)
    own_teacher = teacher is None
    teacher = teacher if teacher is not None else _connect(config)
    try:
        info = teacher.info()
        if info.family != "cogvideox":
            raise InvalidInput(
                f"teacher: '{info.model}' is a {info.family} teacher; priors need a CogVideoX one"
            )
        if config.teacher and config.model and info.model != public_name(config.model):
            raise NotFound(
                f"teacher {config.teacher} hosts '{info.model}', not '{config.model}'; "
                "pass the model it hosts with --teacher-model or point --teacher at the right pool"
            )
        frames = config.frames or info.frames
        height = config.height or info.height or info.resolution
        width = config.width or info.width or info.resolution
        source = {
            "model": info.model,
            "steps": config.steps,
            "guidance": config.guidance,
            "head_ratio": config.head_ratio,
            "token_ratio": config.token_ratio,
            "chunk_size": config.chunk_size,
            "memory": config.memory,
            "frames": frames,
            "height": height,
            "width": width,
        }
        log.info("priors_teacher", model=info.model, teacher=config.teacher or "in-process")

        from vidalign.data.videoset import BadVideo, Skip, SkipLog

        ranks_key = "skipped.jsonl" if config.rank == 0 else f"skipped.rank{config.rank}.jsonl"
        skips = SkipLog(store, max_fraction=config.max_skip_fraction, total=len(clips), key=ranks_key)
        # One reader for every record clip: a shard set's store client is opened once.
        from vidalign.data.videoset import VideoItems, View

        records = [c.record for c in clips if c.record is not None]
        reader = VideoItems(records, [0], {"cogvideox": View(frames, height, width)},
                            store_uri=config.data if config.bench == "shards" else "",
                            ) if records else None

        def run_shard(shard: Shard, advance: Callable[[int], None]) -> ShardOutput:
            files: dict[str, bytes] = {}
            bad: list[str] = []
            for clip in clips[shard.start : shard.stop]:
                try:
                    video = _clip_frames(clip, reader, frames=frames, height=height, width=width)
                except BadVideo as err:
                    origin = getattr(clip.record, "origin", "") or str(clip.video_path)
                    skips.record([Skip(clip.clip_id, str(clip.video_path), origin, str(err))])
                    bad.append(clip.clip_id)
                else:
                    skips.record([], read=[clip.clip_id])
                    files[f"{clip_key(clip.clip_id)}.safetensors"] = _clip_priors(
                        teacher, clip, video, config, frames=frames, height=height, width=width
                    )
                advance(1)
            if not files:  # an artifact needs a file: the shard's own list of what it skipped
                files["skipped.json"] = json.dumps(bad).encode()
            keys = [clip_key(c.clip_id) for c in clips[shard.start : shard.stop] if c.clip_id not in bad]
            return ShardOutput(files, {"keys": keys, "skipped": bad})

        def index(shards: list[Shard], manifests: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            skipped = {i for m in manifests for i in m.meta.get("skipped", [])}
            entries = [
                {
                    "id": c.clip_id,
                    "key": clip_key(c.clip_id),
                    "shard": shard.name,
                    "prompt": c.prompt,
                    "video": str(c.video_path),
                    "segment": c.segment,
                }
                for shard in shards
                for c in clips[shard.start : shard.stop]
                if c.clip_id not in skipped
            ]
            if not entries:
                raise InvalidInput(f"data: no clip of {config.data} could be read; see "
                                   f"{store.uri}/{ranks_key}")
            return {"clips": entries}, {"model": info.model, "skipped": len(skipped)}

        run = run_sharded(
            store, [c.clip_id for c in clips], config.shard_size, run_shard, source=source,
            producer=PRODUCER, index=index, rank=config.rank, world_size=config.world_size,
            name="priors",
        )
    finally:
        if own_teacher:
            teacher.close()
    return run.uri


def _clip_frames(
    clip: PriorsClip, reader: Any, *, frames: int, height: int, width: int
) -> np.ndarray:
    """uint8 (frames, height, width, 3) of one unit; ``BadVideo`` when it cannot be read.
    ``reader`` (a ``VideoItems`` at the CogVideoX view) reads records and shard members."""
    from vidalign.data.videoset import BadVideo

    if clip.record is not None:  # records and shards: resized to cover, centre-cropped
        return reader.read(clip.record)["cogvideox"].numpy()
    try:
        return load_frames(clip.video_path, frames=frames, height=height, width=width,
                           segment=clip.segment)
    except (InvalidInput, NotFound) as err:
        raise BadVideo(str(err).removeprefix("path: ")) from None


def _clip_priors(
    teacher: PriorsTeacher, clip: PriorsClip, video: np.ndarray, config: ExtractConfig, *,
    frames: int, height: int, width: int,
) -> bytes:
    from vidalign.motionenhancer.io import priors_to_bytes

    priors = teacher.attention_priors(AttentionPriorsRequest(
        video=video,
        prompt=clip.prompt,
        steps=config.steps,
        guidance=config.guidance,
        head_ratio=config.head_ratio,
        token_ratio=config.token_ratio,
        chunk_size=config.chunk_size,
        memory=config.memory,
        model=public_name(config.model) if config.teacher else "",
    ))
    meta = {
        "clip_id": clip.clip_id,
        "video": str(clip.video_path),
        "segment": clip.segment,
        "frames": frames,
        "height": height,
        "width": width,
    }
    return priors_to_bytes(priors, prompt=clip.prompt, meta=meta)


# --- reading --------------------------------------------------------------------


# --- rendering ------------------------------------------------------------------

_COLORMAP = np.array(  # inferno-like anchors, 0 -> 1
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3)."""
    x = np.clip(values, 0, 1) * (len(_COLORMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_COLORMAP) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _COLORMAP[lo] + t * _COLORMAP[lo + 1]).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_token(
    prior: np.ndarray, frames: np.ndarray | None, title: str, *, min_side: int = 128
) -> Any:
    """One token's prior (F_tok, h, w) over F_tok representative frames -> a PIL image."""
    from PIL import Image, ImageDraw

    f_tok, h, w = prior.shape
    if frames is None:
        frames = np.full((f_tok, h * 8, w * 8, 3), 96, np.uint8)
    height, width = frames.shape[1:3]
    scale = max(1, math.ceil(min_side / min(height, width)))
    ph, pw = height * scale, width * scale
    lo, hi = float(prior.min()), float(prior.max())
    norm = (prior - lo) / (hi - lo) if hi > lo else np.zeros_like(prior)
    pad, title_h, label_h = 8, 28, 18
    canvas = Image.new("RGB", (pad + f_tok * (pw + pad), title_h + ph + label_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black", font=_font(16))
    # Token frame j covers the pixel frames around j * (F - 1) / (F_tok - 1).
    picks = np.linspace(0, len(frames) - 1, f_tok).round().astype(int) if f_tok > 1 else [0]
    for j in range(f_tok):
        frame = Image.fromarray(frames[picks[j]]).resize((pw, ph), Image.NEAREST)
        heat = Image.fromarray(colormap(norm[j])).resize((pw, ph), Image.BILINEAR)
        panel = Image.blend(frame, heat, 0.55)
        x = pad + j * (pw + pad)
        canvas.paste(panel, (x, title_h))
        draw.text((x, title_h + ph + 2), f"frame {picks[j]}", fill="black", font=_font(12))
    return canvas


def render_heads(scores: np.ndarray, selected: Sequence[int], title: str) -> Any:
    """Bar chart of the MHS head scores; selected heads in orange."""
    from PIL import Image, ImageDraw

    n = len(scores)
    bar, gap, left, top, bottom = max(6, min(32, 600 // max(n, 1))), 4, 48, 32, 28
    plot_h = 200
    width = max(320, left + n * (bar + gap) + 16)
    canvas = Image.new("RGB", (width, top + plot_h + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), title, fill="black", font=_font(14))
    lo, hi = min(0.0, float(scores.min())), max(0.0, float(scores.max()))
    span = (hi - lo) or 1.0

    def y(v: float) -> float:
        return top + (hi - v) / span * plot_h

    zero = y(0.0)
    draw.line([(left - 4, zero), (width - 8, zero)], fill="black")
    draw.text((4, top - 6), f"{hi:.3g}", fill="black", font=_font(10))
    draw.text((4, top + plot_h - 6), f"{lo:.3g}", fill="black", font=_font(10))
    chosen = set(int(h) for h in selected)
    for i, value in enumerate(scores):
        x0 = left + i * (bar + gap)
        y0, y1 = sorted((zero, y(float(value))))
        draw.rectangle([x0, y0, x0 + bar, max(y1, y0 + 1)],
                       fill=(245, 125, 21) if i in chosen else (150, 150, 150))
        if n <= 64:
            draw.text((x0, top + plot_h + 6), str(i), fill="black", font=_font(10))
    return canvas


def show_priors(
    priors: Any, prompt: str, out_dir: str | Path, *, frames: np.ndarray | None = None,
    max_tokens: int = 0,
) -> list[Path]:
    """Write ``token-NN.png`` per selected token and ``heads.png``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prior = priors.prior.float().numpy()
    tokens = priors.selected_tokens[: max_tokens or None]
    paths = []
    for rank, token in enumerate(tokens):
        title = f"{token.text!r}  (token {token.index}, chars {token.span[0]}-{token.span[1]}, score {token.score:.4g})"
        path = out / f"token-{rank:02d}.png"
        render_token(prior[rank], frames, title).save(path, format="PNG")
        paths.append(path)
    heads = out / "heads.png"
    render_heads(
        priors.head_scores.float().numpy(), priors.selected_heads,
        f"MHS head scores; selected {list(priors.selected_heads)}",
    ).save(heads, format="PNG")
    paths.append(heads)
    return paths


def show(
    priors_uri: str, out_dir: str | Path, *, clip_ids: Sequence[str] = (), max_tokens: int = 0,
    video_dir: str | None = None,
) -> list[Path]:
    """Render clips of a priors set (or one local priors file) to PNGs under ``out_dir/<clip>``."""
    from vidalign.motionenhancer.io import load_priors

    if priors_uri.endswith(".safetensors") and Path(priors_uri).is_file():
        items = [load_priors(priors_uri)]
    else:
        priors_set = load_priors_set(priors_uri)
        ids = list(clip_ids) or priors_set.ids[:1]
        items = [priors_set.get(i) for i in ids]
    paths: list[Path] = []
    for priors, prompt in items:
        meta = priors.metadata
        clip_id = str(meta.get("clip_id") or Path(priors_uri).stem)
        frames = None
        video = meta.get("video")
        if video:
            video_path = Path(video_dir) / Path(video).name if video_dir else Path(video)
            try:
                frames = load_frames(
                    video_path, frames=int(meta["frames"]), height=int(meta["height"]),
                    width=int(meta["width"]),
                    segment=tuple(meta["segment"]) if meta.get("segment") else None,
                )
            except (VidalignError, KeyError) as err:
                log.warning("priors_show_no_frames", clip=clip_id, error=str(err))
        paths += show_priors(
            priors, prompt, Path(out_dir) / clip_key(clip_id), frames=frames, max_tokens=max_tokens
        )
    return paths


# --- command line (`vidalign priors extract|show`) ---------------------------------------


def run_extract(args: argparse.Namespace) -> None:
    config = ExtractConfig(
        data=args.data, out=args.out, bench=args.bench, video_dir=args.video_dir, model=args.teacher_model,
        teacher=args.teacher, shard_size=args.shard_size, frames=args.frames, height=args.height,
        width=args.width, steps=args.steps, guidance=args.guidance, head_ratio=args.head_ratio,
        token_ratio=args.token_ratio, chunk_size=args.chunk_size, memory=not args.no_memory,
        skip_missing=args.skip_missing, max_skip_fraction=args.max_skip_fraction,
        rank=args.rank, world_size=args.world_size,
        **({"device": args.device} if args.device else {}),
        credentials=client_credentials(args) if args.teacher else None,
    )
    print(extract_dataset_priors(config))


def run_show(args: argparse.Namespace) -> None:
    for path in show(args.priors, args.out, clip_ids=args.clip, max_tokens=args.max_tokens,
                     video_dir=args.video_dir):
        print(path)


__all__ = [
    "ExtractConfig",
    "PriorsClip",
    "PriorsSet",
    "dataset_clips",
    "extract_dataset_priors",
    "load_frames",
    "load_priors_set",
    "render_heads",
    "render_token",
    "show",
    "show_priors",
]
