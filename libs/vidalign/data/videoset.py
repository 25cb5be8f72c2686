"""Real videos for every stage: records, decoding in worker processes, bad data skipped.

A training set is a list of :class:`VideoRecord` (a clip's id, where its video
is, its captions and questions). Sources (:func:`read_records`):

========== ==================================================================
records    JSON Lines of records: what ``vidalign data prepare`` commits
           (``<out>/subset``: ``uid, video, caption, static_caption``) or any
           file of :meth:`VideoRecord.to_json` lines
shards     a shard set written by ``vidalign data shard`` (``vidalign.data.shardset``)
motionbench MotionBench's ``video_info.meta.jsonl`` layout (SynthMotion too):
           one record per video with its questions
motionvid  MotionVid-QA's preference records: the ``chosen`` answer is the target
synth      a SynthMotion directory (``vidalign data synth``): captions, static
           captions and MotionBench-layout questions
========== ==================================================================

A job turns records into *items* (a record index and what the job attaches to
it: a prompt and target, nothing for a whole-clip job) and hands
:class:`VideoItems` to a ``torch.utils.data.DataLoader`` whose batch sampler is
its step plan, so worker processes decode ahead while the job trains. Each item
is decoded once at the union of the frames its :class:`View` s ask for (the
student's frames and size, the teacher's from ``GetInfo``, CogVideoX's 49), then
cropped and resized per view. Nothing holds the set's pixels: a worker holds the
clips it is decoding.

Bad data: a video that cannot be read (missing, zero bytes, cut short, damaged
packets), one with fewer frames than a view asks for, or a malformed record is
*skipped*: the item gives way to the next one in the set (deterministically, so
a resumed run sees exactly what an uninterrupted one saw) and a :class:`Skip`
(file, line, reason) goes to the run's ``skipped.jsonl`` through
:class:`SkipLog`, which stops the run with a clear message once more than
``max_skip_fraction`` of what it read was bad.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vidalign.errors import InvalidInput, NotFound, VidalignError
from vidalign.log import get_logger
from vidalign.video import uniform_indices

log = get_logger(__name__)

SOURCES = ("records", "shards", "motionbench", "motionvid", "synth")
"""Record sources read from files (the trainers also hold ``toy`` clips in memory)."""

SKIPPED_FILE = "skipped.jsonl"


# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """One instruction about a clip: what the model is asked and taught to answer."""

    prompt: str
    target: str
    answer: str = ""
    """The answer in the benchmark's form (an option letter), when there is one."""
    category: str = ""


@dataclass(frozen=True)
class Blob:
    """Where a clip's encoded bytes lie in a shard set: ``length`` bytes at ``offset``."""

    shard: str
    """Key of the shard file in the shard set's store."""
    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class VideoRecord:
    """One clip: its id, where its video is, and what the stages read about it."""

    id: str
    """Unique and stable: features, latents, priors and the teacher's draws are keyed by it."""
    video: str
    """A local path or a store URI (``s3://bucket/key``); for shards, the original path."""
    caption: str = ""
    static_caption: str = ""
    """The caption with its motion removed (VDA conditions the teacher on it)."""
    qa: tuple[QA, ...] = ()
    origin: str = ""
    """``file:line`` of the record, for messages and ``skipped.jsonl``."""
    segment: tuple[float, float] | None = None
    """(start, end) seconds the record is about; None: the whole video."""
    blob: Blob | None = None
    """Set for a clip inside a shard set."""
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    """uint8 (F, H, W, 3) already in memory (the toy and SynthMotion sets); no decoding."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "video": self.video}
        if self.caption:
            out["caption"] = self.caption
        if self.static_caption:
            out["static_caption"] = self.static_caption
        if self.qa:
            out["qa"] = [asdict(q) for q in self.qa]
        if self.segment is not None:
            out["segment"] = list(self.segment)
        return out

    @classmethod
    def from_json(cls, raw: Any, origin: str, video_root: str = "") -> VideoRecord:
        """A record from a JSON object: ours, or a ``vidalign data prepare`` subset line."""
        if not isinstance(raw, dict):
            raise InvalidInput(f"{origin}: expected a JSON object, got {type(raw).__name__}")
        clip_id = raw.get("id", raw.get("uid"))
        if not isinstance(clip_id, str | int) or isinstance(clip_id, bool) or not str(clip_id).strip():
            raise InvalidInput(f"{origin}: id (or uid): expected a non-empty string")
        video = raw.get("video")
        if not isinstance(video, str) or not video.strip():
            raise InvalidInput(f"{origin}: video: expected a path or store URI")
        texts = {}
        for key in ("caption", "static_caption"):
            value = raw.get(key, "")
            if not isinstance(value, str):
                raise InvalidInput(f"{origin}: {key}: expected a string")
            texts[key] = value.strip()
        qa = raw.get("qa", [])
        if not isinstance(qa, list):
            raise InvalidInput(f"{origin}: qa: expected a list of {{prompt, target}}")
        items = []
        for k, q in enumerate(qa):
            if not (isinstance(q, dict) and isinstance(q.get("prompt"), str)
                    and isinstance(q.get("target"), str) and q["prompt"].strip() and q["target"].strip()):
                raise InvalidInput(f"{origin}: qa[{k}]: expected non-empty prompt and target strings")
            items.append(QA(q["prompt"], q["target"], str(q.get("answer", "")),
                            str(q.get("category", ""))))
        segment = raw.get("segment")
        if segment is not None:
            if not (isinstance(segment, list) and len(segment) == 2
                    and all(isinstance(x, int | float) for x in segment) and segment[0] < segment[1]):
                raise InvalidInput(f"{origin}: segment: expected [start, end] seconds, start < end")
            segment = (float(segment[0]), float(segment[1]))
        return cls(
            id=str(clip_id), video=resolve_video(video.strip(), video_root), origin=origin,
            qa=tuple(items), segment=segment, **texts,
        )


def resolve_video(video: str, root: str) -> str:
    """``video`` as written in a record, made absolute against ``root`` (a dir or store URI)."""
    if "://" in video or Path(video).is_absolute() or not root:
        return video
    if "://" in root:
        return f"{root.rstrip('/')}/{video}"
    return str(Path(root) / video)


@dataclass(frozen=True)
class Skip:
    """A clip or record left out, and why (one line of ``skipped.jsonl``)."""

    id: str
    file: str
    line: str
    """``file:line`` of the record it came from, when it has one."""
    reason: str


@dataclass
class Records:
    """What a source holds: the good records, and the malformed ones it skipped."""

    records: list[VideoRecord]
    skipped: list[Skip]
    source: str
    store: str = ""
    """A shard set's location: where ``VideoRecord.blob`` s are read from."""

    def __len__(self) -> int:
        return len(self.records)


def read_records(kind: str, location: str, *, num_clips: int = 0, video_dir: str = "") -> Records:
    """The records of a source (module docstring); the first ``num_clips`` (0: all).

    Malformed records are skipped (listed in ``Records.skipped``); a file that
    is not UTF-8 or not there is an error naming it.
    """
    if kind not in SOURCES:
        raise InvalidInput(f"data.kind: expected one of {list(SOURCES)}, got {kind!r}")
    if not location:
        raise InvalidInput(f"data.path: kind {kind} reads from a path or store URI; none given")
    if num_clips < 0:
        raise InvalidInput(f"data.num_clips: expected >= 0, got {num_clips}")
    if kind == "shards":
        from vidalign.data.shardset import open_shards

        out = open_shards(location)
    elif kind == "records":
        out = _jsonl_records(location, video_dir)
    elif kind == "synth":
        out = _synth_records(location)
    else:
        out = _benchmark_records(kind, location, video_dir)
    if num_clips:
        out.records = out.records[:num_clips]
    seen: dict[str, str] = {}
    for record in out.records:
        if record.id in seen:
            raise InvalidInput(f"{record.origin}: clip id {record.id!r} already used at {seen[record.id]}")
        seen[record.id] = record.origin
    if not out.records:
        raise InvalidInput(f"data.path: {location} ({kind}) holds no usable record")
    return out


def _text_file(location: str, default_name: str) -> tuple[str, str]:
    """(text, name) of a local file or store object; a directory or artifact names its
    ``default_name``."""
    from vidalign.store import is_store_uri, materialize

    remote = is_store_uri(location)
    path = materialize(location) if remote else Path(location)
    name = location if remote else str(path)
    if path.is_dir():
        path = path / default_name
        name = f"{name.rstrip('/')}/{default_name}"
    if not path.is_file():
        raise NotFound(f"data.path: {name} does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig"), name
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_records(location: str, video_dir: str) -> Records:
    text, name = _text_file(location, "subset.jsonl")
    records, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        origin = f"{name}:{number}"
        try:
            records.append(VideoRecord.from_json(json.loads(line), origin, video_dir))
        except json.JSONDecodeError as err:
            skipped.append(Skip("", name, origin, f"malformed record: not valid JSON ({err.msg})"))
        except InvalidInput as err:
            skipped.append(Skip("", name, origin, f"malformed record: {_after(str(err), origin)}"))
    return Records(records, skipped, name)


def _after(message: str, origin: str) -> str:
    return message[len(origin) + 2:] if message.startswith(origin + ": ") else message


def _benchmark_records(kind: str, location: str, video_dir: str) -> Records:
    """MotionBench / MotionVid-QA files as records: one per video, its questions as QA."""
    import warnings

    from vidalign.data.benchmarks import (
        LETTERS,
        MissingVideosWarning,
        load_benchmark,
        load_motionvid_qa,
    )
    from vidalign.data.synthset import ANSWER_FORMAT
    from vidalign.store import is_store_uri, materialize

    path = materialize(location) if is_store_uri(location) else Path(location)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVideosWarning)  # reported per clip when read
        loaded = (load_benchmark("motionbench", path, video_dir=video_dir or None) if kind == "motionbench"
                  else load_motionvid_qa(path, video_dir=video_dir or None))
    by_video: dict[str, dict[str, Any]] = {}
    skipped = []
    for item in loaded.items:
        origin = f"{item.source_file}:{item.line}"
        if kind == "motionbench":
            if item.answer is None:
                skipped.append(Skip(item.uid, item.source_file, origin,
                                    "malformed record: the answer is withheld (NA); nothing to train on"))
                continue
            option = item.options[LETTERS.index(item.answer)] if item.options else item.answer
            qa = QA(item.prompt, ANSWER_FORMAT.format(option=option, letter=item.answer),
                    item.answer, item.category)
            segment = item.segment
        else:
            qa, segment = QA(item.question, item.chosen), None
        key = f"{item.video_path}|{segment}"
        entry = by_video.setdefault(key, {"video": str(item.video_path), "origin": origin,
                                          "segment": segment, "qa": [], "uid": item.uid})
        entry["qa"].append(qa)
    records = []
    for entry in by_video.values():
        stem = Path(entry["video"]).stem
        clip_id = stem if entry["segment"] is None else f"{stem}@{entry['segment'][0]:g}-{entry['segment'][1]:g}"
        records.append(VideoRecord(id=clip_id, video=entry["video"], qa=tuple(entry["qa"]),
                                   origin=entry["origin"], segment=entry["segment"]))
    # Two videos with one stem in different directories: keep ids unique and stable.
    counts: dict[str, int] = {}
    for r in records:
        counts[r.id] = counts.get(r.id, 0) + 1
    records = [r if counts[r.id] == 1 else _renamed(r) for r in records]
    return Records(records, skipped, str(path))


def _synth_records(location: str) -> Records:
    """A SynthMotion directory: the sidecar's captions with the MotionBench questions."""
    from vidalign.data.synth import SIDECAR_FILE, read_sidecar

    qa = {r.id: r.qa for r in _benchmark_records("motionbench", location, "").records}
    records = [
        VideoRecord(id=r.clip_id, video=str(r.video_path), caption=r.caption,
                    static_caption=r.static_caption, qa=qa.get(r.video_path.stem, ()),
                    origin=f"{Path(location) / SIDECAR_FILE}:{n}")
        for n, r in enumerate(read_sidecar(location), 1)
    ]
    return Records(records, [], location)


def _renamed(record: VideoRecord) -> VideoRecord:
    digest = hashlib.sha256(record.video.encode()).hexdigest()[:8]
    return VideoRecord(**{**record.__dict__, "id": f"{record.id}-{digest}"})


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """How one consumer wants a clip: ``frames`` spread uniformly, ``height`` x ``width``.

    Frames are resized so they cover the view, then centre-cropped (a 16:9 clip
    in a square view loses its sides, never its proportions).
    """

    frames: int
    height: int
    width: int = 0
    """0: square (``height``)."""

    def __post_init__(self) -> None:
        if self.frames < 1 or self.height < 1 or self.width < 0:
            raise InvalidInput(f"view: frames and sizes must be positive, got {self}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width or self.height


class BadVideo(VidalignError):
    """A clip that cannot be used as asked; the message is the reason."""


def fit_view(frames: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> uint8 (F, h, w, 3): resize to cover, centre crop, antialiased."""
    h, w = view.shape
    src_h, src_w = frames.shape[1:3]
    if (src_h, src_w) == (h, w):
        return frames.contiguous()
    scale = max(h / src_h, w / src_w)
    cover = (max(h, round(src_h * scale)), max(w, round(src_w * scale)))
    x = frames.permute(0, 3, 1, 2).float()
    if cover != (src_h, src_w):
        x = F.interpolate(x, size=cover, mode="bilinear", align_corners=False, antialias=True)
    top, left = (cover[0] - h) // 2, (cover[1] - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_views(
    source: str | Path | bytes, views: dict[str, View], *, name: str = "",
    segment: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Each view of one video, decoded once at the union of the frames the views pick.

    Raises :class:`BadVideo` (the reason) for an unreadable or damaged video or
    one with fewer frames (in ``segment``) than a view asks for.
    """
    import bisect

    from vidalign.data.frames import decode_at, frame_times

    try:
        timeline = frame_times(source, name=name or None)
        lo, hi = 0, len(timeline)
        if segment is not None:
            lo = bisect.bisect_left(timeline.times, segment[0] - 1e-6)
            hi = bisect.bisect_right(timeline.times, segment[1] + 1e-6)
        available = hi - lo
        picks = {}
        for key, view in views.items():
            if available < view.frames:
                raise BadVideo(f"too short: {available} frames, {view.frames} asked ({key})")
            picks[key] = [lo + i for i in uniform_indices(available, view.frames)]
        union = sorted({i for p in picks.values() for i in p})
        wanting = {i: [key for key in views if i in picks[key]] for i in union}
        by_pts = dict(zip((timeline.pts[i] for i in union), union, strict=True))

        def convert(frame) -> dict[str, np.ndarray]:
            return {key: scale_frame(frame, views[key]) for key in wanting[by_pts[frame.pts]]}

        scaled = decode_at(source, timeline, union, name=name or None, convert=convert)
    except (InvalidInput, NotFound) as err:
        raise BadVideo(_reason(str(err), name or str(source))) from None
    row = {index: k for k, index in enumerate(union)}
    return {key: torch.from_numpy(np.stack([scaled[row[i]][key] for i in picks[key]]))
            for key in views}


def scale_frame(frame, view: View) -> np.ndarray:
    """One decoded ``av.VideoFrame`` -> uint8 (h, w, 3) RGB at ``view``: scaled by FFmpeg's
    swscale to cover the view (area averaging when shrinking, bilinear when growing), then
    centre-cropped. In C, and fused with the colour conversion: several times cheaper than
    converting at full size and resizing in torch."""
    h, w = view.shape
    scale = max(h / frame.height, w / frame.width)
    cover_h, cover_w = max(h, round(frame.height * scale)), max(w, round(frame.width * scale))
    interpolation = "AREA" if scale < 1 else "BILINEAR"
    rgb = frame.to_ndarray(width=cover_w, height=cover_h, format="rgb24", interpolation=interpolation)
    top, left = (cover_h - h) // 2, (cover_w - w) // 2
    return np.ascontiguousarray(rgb[top:top + h, left:left + w])


def _reason(message: str, name: str) -> str:
    """An error message without its ``path: 'file'`` preamble (the skip names the file)."""
    return message.removeprefix("path: ").removeprefix(f"{name!r} ")


def view_pixels(pixels: np.ndarray, views: dict[str, View]) -> dict[str, torch.Tensor]:
    """The views of a clip already in memory (toy, SynthMotion): frames repeat when few."""
    video = torch.from_numpy(pixels)
    return {k: fit_view(video[uniform_indices(video.shape[0], v.frames)], v) for k, v in views.items()}


# --- items in worker processes ----------------------------------------------------------


@dataclass
class Loaded:
    """One decoded item, as a worker hands it over."""

    index: int
    """The item actually used: the one asked for, or (after skips) a later one."""
    record: int
    views: dict[str, torch.Tensor] | None
    """None: the item was bad and ``substitute`` was off."""
    skips: list[Skip]
    """The bad clips met on the way to it."""


class VideoItems(torch.utils.data.Dataset):
    """Items (each names a record) decoded at ``views``; a bad clip yields to the next item.

    With ``substitute`` off (a pass over every clip, such as feature extraction)
    a bad item comes back without views instead.

    Map-style, so a sampler decides the order and any worker may decode any
    item: a run's batches do not depend on the number of workers, and resuming
    at step k needs only k. Shard sets are read by byte range from their store,
    opened once per worker process.
    """

    def __init__(
        self, records: Sequence[VideoRecord], items: Sequence[int], views: dict[str, View], *,
        store_uri: str = "", max_tries: int = 64, substitute: bool = True,
    ) -> None:
        if not items:
            raise InvalidInput("data: no items to train on")
        self.records = list(records)
        self.items = list(items)
        self.views = dict(views)
        self.store_uri = store_uri
        self.max_tries = max_tries
        self.substitute = substitute
        self._store: tuple[int, Any] | None = None
        self._bad: dict[int, str] = {}
        """Record index -> reason, of the clips this process found bad (several items may name
        one clip: it is decoded once)."""

    def __len__(self) -> int:
        return len(self.items)

    def _shards(self):
        from vidalign.store import open_store

        if self._store is None or self._store[0] != os.getpid():  # one client per process
            self._store = (os.getpid(), open_store(self.store_uri))
        return self._store[1]

    def read(self, record: VideoRecord) -> dict[str, torch.Tensor]:
        """The views of one record; :class:`BadVideo` when it cannot be used."""
        if record.pixels is not None:
            return view_pixels(record.pixels, self.views)
        source: str | bytes = record.video
        if record.blob is not None:
            try:
                data = self._shards().read_range(record.blob.shard, record.blob.offset, record.blob.length)
            except VidalignError as err:
                raise BadVideo(f"unreadable shard member ({err})") from None
            if hashlib.sha256(data).hexdigest() != record.blob.sha256:
                raise BadVideo(f"shard member damaged: sha256 differs from the index ({record.blob.shard})")
            source = data
        elif "://" in record.video:
            from vidalign.store import split_uri

            try:
                store, key = split_uri(record.video)
                source = store.get_bytes(key)
            except VidalignError as err:
                raise BadVideo(f"unreadable: {err}") from None
        return decode_views(source, self.views, name=record.video, segment=record.segment)

    def __getitem__(self, index: int) -> Loaded:
        skips = []
        for tried in range(min(self.max_tries, len(self.items))):
            i = (index + tried) % len(self.items)
            record = self.records[self.items[i]]
            try:
                if self.items[i] in self._bad:
                    raise BadVideo(self._bad[self.items[i]])
                views = self.read(record)
            except BadVideo as err:
                self._bad[self.items[i]] = str(err)
                skips.append(Skip(record.id, record.video, record.origin, str(err)))
                if not self.substitute:
                    return Loaded(i, self.items[i], None, skips)
                continue
            return Loaded(i, self.items[i], views, skips)
        raise InvalidInput(
            f"data: {len(skips)} clips in a row could not be read (last: {skips[-1].file}: "
            f"{skips[-1].reason}); is the data readable from here?"
        )


def load_batches(
    dataset: VideoItems, plan: Sequence[list[int]], *, workers: int, prefetch: int = 2,
) -> Iterator[list[Loaded]]:
    """The items of each batch of ``plan``, in order, decoded ahead by ``workers`` processes.

    Workers are spawned, not forked: the training process may hold gRPC
    channels and process groups that a fork would copy in a broken state.
    """
    if workers < 0:
        raise InvalidInput(f"data.workers: expected >= 0, got {workers}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=list(plan),
        num_workers=workers,
        collate_fn=list,
        prefetch_factor=prefetch if workers else None,
        multiprocessing_context="spawn" if workers else None,
    )
    yield from loader


# --- skip log ---------------------------------------------------------------------------


class SkipLog:
    """``skipped.jsonl`` in the run's output, and the stop when too much of the data is bad.

    The fraction is of the distinct clips read (a bad clip met again in a later
    epoch, or through several of its questions, counts once), judged once
    ``min_reads`` of them were read (or the whole set, when smaller), so one
    bad clip among the first few does not stop a run.
    """

    def __init__(
        self, store, *, max_fraction: float, total: int, key: str = SKIPPED_FILE,
        min_reads: int = 100,
    ) -> None:
        if not 0 <= max_fraction <= 1:
            raise InvalidInput(f"data.max_skip_fraction: expected 0..1, got {max_fraction}")
        self.store, self.key = store, key
        self.max_fraction = max_fraction
        self.min_reads = max(1, min(min_reads, total))
        self.read: set[str] = set()
        self.bad: set[str] = set()
        self.entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        if store is not None and store.exists(key):  # a resumed run keeps what it found
            for line in store.get_bytes(key).decode().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[(entry["id"], entry["line"], entry["reason"])] = entry

    def add(self, loaded: Iterable[Loaded], records: Sequence[VideoRecord]) -> None:
        for item in loaded:
            self.record(item.skips, read=[records[item.record].id])

    def record(self, skips: Sequence[Skip], *, read: Iterable[str] = ()) -> None:
        """Clips read (``read``: ids of good ones) and the bad ones met (``skips``)."""
        keys = [skip.id or skip.line for skip in skips]
        self.read.update(read, keys)
        self.bad.update(keys)
        new = False
        for skip in skips:
            key = (skip.id, skip.line, skip.reason)
            if key not in self.entries:
                self.entries[key] = asdict(skip)
                log.warning("clip_skipped", id=skip.id, file=skip.file, line=skip.line, reason=skip.reason)
                new = True
        if new and self.store is not None:
            self.store.put_bytes(
                self.key, "".join(json.dumps(e) + "\n" for e in self.entries.values()).encode()
            )
        self.check()

    def check(self) -> None:
        reads, bad = len(self.read), len(self.bad)
        if reads >= self.min_reads and bad > self.max_fraction * reads:
            where = f"{self.store.uri}/{self.key}" if self.store is not None else self.key
            raise InvalidInput(
                f"data: {bad} of the {reads} clips read were bad "
                f"({bad / reads:.1%} > data.max_skip_fraction {self.max_fraction:.1%}); "
                f"see {where} for each file and reason"
            )
