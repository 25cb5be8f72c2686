"""Video decoding (vidalign.data.videoset) vs the clips/s a stage-2 step consumes.

Makes ``--clips`` 10-second 640x480 30 fps h264 clips with PyAV (libx264,
``veryfast``, crf 23: a noise texture that pans, with moving shapes on it; in
``--cache`` so reruns skip encoding), then measures, in this one run:

(a) ``decode_views`` of one clip at each config's two stage-2 views (student +
    teacher), in this process with one torch thread (what a DataLoader worker
    gets): clips/s per worker, median of ``--repeats`` after a warm-up; also, for
    scale, the time of demuxing + decoding the same frames converted to RGB at
    full size (``decode_at``), as a share of ``decode_views``, which instead
    scales each frame in swscale while converting it (and centre-crops);
(b) the same through ``load_batches`` (spawned workers, batch 2) with 1 and 2
    workers over ``--items`` items: time to the first batch (worker start-up +
    one batch) and steady clips/s (after every worker delivered its first batch);
(c) what a stage-2 step consumes: ``run_stage2`` in this process (teacher
    ``local``, tiny-videollava student, batch 2, toy clips in memory: the local
    arm of bench/stage2.py), clips/s = batch / mean step time after warm-up;
(d) the same stage-2 runs reading the encoded clips (``data.kind: records``,
    ``data.workers: 2``): step time with real decoding included.

Configs: ``real`` = Video-LLaVA's student view (8 x 224) + AnimateDiff's
(24 x 512), VDA's pair; ``tiny`` / ``small`` = bench/stage2.py's student view
(16 x 64) + tiny-/small-animatediff's own frames and resolution. The ratio
decode clips/s (2 workers, the default) / consumed clips/s > 1 means loading is
not the bottleneck. Workers and the step share the machine's cores, so (b)
and (c) measured apart are an upper bound; (d) is the direct check.

    .venv/bin/python bench/data.py [--quick] [--cache .cache/bench-data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidalign.data.videoset import VideoItems, VideoRecord, View, decode_views, load_batches

WIDTH, HEIGHT, FPS, SECONDS = 640, 480, 30, 10
ENCODE = {"preset": "veryfast", "crf": "23"}
"""libx264 options; ``veryfast`` keeps CABAC and B-frames (decoding cost like real uploads)."""
STUDENT = "tiny-videollava"
BATCH = 2
STEP_WARMUP = 2
"""Stage-2 steps dropped before the mean (the first includes model set-up)."""
E2E_WARMUP = 6
"""With real clips, also past the batches the workers decoded ahead (2 workers x prefetch 2)."""
WORKERS = (1, 2)
DEFAULT_WORKERS = 2
"""``data.workers``' default (vidalign_trainer.common.DataConfig)."""


@dataclass(frozen=True)
class Setup:
    name: str
    student: View
    teacher: View
    teacher_model: str
    """Registry name of the teacher whose stage-2 step is timed; "" for none (real)."""

    @property
    def views(self) -> dict[str, View]:
        return {"student": self.student, "teacher": self.teacher}

    def describe(self) -> str:
        s, t = self.student, self.teacher
        return f"{s.frames}x{s.height} + {t.frames}x{t.height}"


def setups() -> list[Setup]:
    from vidalign.vda.registry import TEACHER_MODELS

    out = [Setup("real", View(8, 224), View(24, 512), "")]  # Video-LLaVA + AnimateDiff (VDA)
    for name, model in (("tiny", "tiny-animatediff"), ("small", "small-animatediff")):
        spec = TEACHER_MODELS[model]
        out.append(Setup(name, View(16, 64), View(spec.frames, spec.resolution), model))
    return out


# --- clips ------------------------------------------------------------------------------


def _frames(seed: int):
    """``SECONDS * FPS`` RGB frames: panning noise texture, moving boxes, a little grain."""
    rng = np.random.default_rng(seed)
    pad = 200
    fine = rng.integers(0, 256, (HEIGHT + pad, WIDTH + pad, 3), dtype=np.uint8)
    coarse = rng.integers(0, 256, ((HEIGHT + pad) // 4, (WIDTH + pad) // 4, 3), dtype=np.uint8)
    coarse = np.repeat(np.repeat(coarse, 4, 0), 4, 1)
    texture = (fine // 2 + coarse // 2).astype(np.uint8)
    boxes = [
        (rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(-6, 6), rng.uniform(-6, 6),
         int(rng.integers(30, 90)), rng.integers(0, 256, 3, dtype=np.uint8))
        for _ in range(5)
    ]
    for t in range(SECONDS * FPS):
        ox = int(pad / 2 + 80 * math.sin(t / 40))
        oy = int(pad / 2 + 60 * math.cos(t / 55))
        frame = texture[oy:oy + HEIGHT, ox:ox + WIDTH].copy()
        for x, y, vx, vy, r, colour in boxes:
            cx, cy = int((x + vx * t) % WIDTH), int((y + vy * t) % HEIGHT)
            frame[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colour
        grain = rng.integers(-3, 4, (HEIGHT // 8, WIDTH // 8, 1), dtype=np.int16)
        grain = np.repeat(np.repeat(grain, 8, 0), 8, 1)
        yield np.clip(frame.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def encode_clip(path: Path, seed: int) -> None:
    import av

    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = dict(ENCODE)
        for pixels in _frames(seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


def make_clips(directory: Path, count: int) -> tuple[list[Path], float]:
    """The clips (encoded unless ``directory`` already holds them); seconds spent encoding."""
    import av

    try:
        av.codec.Codec("libx264", "w")
    except Exception as err:  # PyAV raises several types for a missing encoder
        raise SystemExit(f"bench/data.py: PyAV {av.__version__} has no libx264 encoder ({err})") from None
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"size": [WIDTH, HEIGHT], "fps": FPS, "seconds": SECONDS, "encode": ENCODE, "version": 1}
    stamp = directory / "clips.json"
    known = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if known.get("spec") != spec:
        known = {"spec": spec}
    paths, spent = [], 0.0
    for i in range(count):
        path = directory / f"clip{i:02d}.mp4"
        if not (path.is_file() and str(i) in known):
            tic = time.perf_counter()
            encode_clip(path, seed=i)
            spent += time.perf_counter() - tic
            known[str(i)] = path.stat().st_size
            stamp.write_text(json.dumps(known, indent=1))
            print(f"  encoded {path.name} in {time.perf_counter() - tic:.1f} s", file=sys.stderr)
        paths.append(path)
    return paths, spent


# --- (a) one process --------------------------------------------------------------------


def decode_in_process(clips: list[Path], setup: Setup, repeats: int) -> dict:
    """Seconds per clip of ``decode_views`` and of its demux + decode alone (one thread)."""
    from vidalign.data.frames import decode_at, frame_times
    from vidalign.video import uniform_indices

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        decode_views(clips[0], setup.views)  # warm-up
        whole, raw = [], []
        for k in range(repeats):
            clip = clips[k % len(clips)]
            tic = time.perf_counter()
            out = decode_views(clip, setup.views)
            whole.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            timeline = frame_times(clip)
            union = sorted({i for v in setup.views.values()
                            for i in uniform_indices(len(timeline), v.frames)})
            decode_at(clip, timeline, union)
            raw.append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)
    for key, view in setup.views.items():
        got = tuple(out[key].shape)
        if got != (view.frames, *view.shape, 3):
            raise SystemExit(f"bench/data.py: decode_views gave {key} {got} for {view}")
    s, d = statistics.median(whole), statistics.median(raw)
    return {"s_per_clip": s, "clips_per_s": 1 / s, "decode_s": d, "decode_share": d / s,
            "frames_picked": len(union)}


# --- (b) worker processes ---------------------------------------------------------------


def decode_in_workers(clips: list[Path], setup: Setup, items: int, workers: int) -> dict:
    records = [VideoRecord(id=p.stem, video=str(p)) for p in clips]
    dataset = VideoItems(records, [i % len(records) for i in range(items)], setup.views)
    plan = [list(range(lo, min(lo + BATCH, items))) for lo in range(0, items, BATCH)]
    arrived, sizes = [], []
    tic = time.perf_counter()
    for batch in load_batches(dataset, plan, workers=workers):
        arrived.append(time.perf_counter() - tic)
        bad = [x for x in batch if x.views is None or x.skips]
        if bad:
            raise SystemExit(f"bench/data.py: workers skipped clips: {bad[0].skips}")
        sizes.append(len(batch))
    # Every worker starts together, so each delivers its first batch at about the same time;
    # from the last of those on, the remaining batches measure the steady rate.
    first = min(workers, len(arrived) - 1) - 1 if workers else 0
    steady = sum(sizes[first + 1:]) / (arrived[-1] - arrived[first])
    return {"workers": workers, "items": items, "first_batch_s": arrived[0],
            "total_s": arrived[-1], "clips_per_s": steady, "clips_per_s_with_startup": items / arrived[-1]}


# --- (c), (d) stage 2 -------------------------------------------------------------------


def stage2_steps(setup: Setup, steps: int, root: Path, *, records: Path | None, warmup: int) -> dict:
    """Mean step time of a local stage-2 run (bench/stage2.py's config) after ``warmup``."""
    from vidalign.students import load_student
    from vidalign.vda import Adapter, load_teacher
    from vidalign_trainer.stage2 import (
        DataConfig,
        OutputConfig,
        Stage2Config,
        TeacherConfig,
        TrainConfig,
        run_stage2,
    )

    adapter = root / f"{setup.teacher_model}.safetensors"
    if not adapter.is_file():
        teacher = load_teacher(setup.teacher_model)
        Adapter.create(d_v=load_student(STUDENT).d_v, cond_dim=teacher.cond_dim,
                       teacher_family=teacher.family).save(adapter)
        del teacher
    if records is None:
        data = DataConfig(num_clips=16, frames=setup.student.frames, size=setup.student.height, seed=0)
    else:
        data = DataConfig(kind="records", path=str(records), num_clips=0, frames=setup.student.frames,
                          size=setup.student.height, seed=0, workers=DEFAULT_WORKERS)
    out = root / f"{setup.name}-{'records' if records else 'toy'}"
    run_stage2(Stage2Config(
        student=STUDENT, device="cpu",
        teacher=TeacherConfig(address="local", model=setup.teacher_model, adapter=str(adapter)),
        data=data, train=TrainConfig(steps=steps, batch_size=BATCH, seed=0),
        output=OutputConfig(dir=str(out), checkpoint_every=10**9),
    ))
    times = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = times[warmup:]
    mean = statistics.fmean(kept)
    return {"steps": len(times), "warmup": warmup, "mean_step_s": mean,
            "median_step_s": statistics.median(kept), "max_step_s": max(kept),
            "clips_per_s": BATCH / mean}


# --- report -----------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def workers_needed(consumed: float, per_worker: float) -> int:
    """Workers (each with a core of its own) whose decoding keeps up with ``consumed`` clips/s."""
    return max(1, math.ceil(consumed / per_worker))


def report(results: dict) -> str:
    lines = [
        f"clips: {results['clips']['count']} x {SECONDS} s {WIDTH}x{HEIGHT} {FPS} fps h264 "
        f"({ENCODE['preset']}, crf {ENCODE['crf']}), {results['clips']['mbps']:.2f} Mbit/s mean; "
        f"batch {BATCH}; {results['machine']}",
        "",
        "| config | views (student + teacher) | in-process s/clip (full-size decode alone) | clips/s per worker "
        "| 1 worker: first batch s, clips/s | 2 workers: first batch s, clips/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["configs"].items():
        a, w = row["in_process"], {str(x["workers"]): x for x in row["workers"]}
        lines.append(
            f"| {name} | {row['views']} | {a['s_per_clip']:.3f} ({a['decode_share']:.0%}) "
            f"| {a['clips_per_s']:.2f} "
            f"| {w['1']['first_batch_s']:.1f}, {w['1']['clips_per_s']:.2f} "
            f"| {w['2']['first_batch_s']:.1f}, {w['2']['clips_per_s']:.2f} |"
        )
    lines += [
        "",
        "| stage-2 config | s/step (toy clips) | consumed clips/s | decode clips/s, 2 workers: own views "
        "(ratio) | real views (ratio) | workers needed: own, real views "
        "| s/step reading the h264 clips, 2 workers | with clips / toy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    real = results["configs"]["real"]["workers"]
    real_rate = next(x["clips_per_s"] for x in real if x["workers"] == DEFAULT_WORKERS)
    real_one = results["configs"]["real"]["in_process"]["clips_per_s"]
    for name, row in results["configs"].items():
        c = row.get("stage2")
        if not c:
            continue
        own = next(x["clips_per_s"] for x in row["workers"] if x["workers"] == DEFAULT_WORKERS)
        e2e = row.get("stage2_records")
        lines.append(
            f"| {name} ({row['teacher_model']}) | {c['mean_step_s']:.3f} | {c['clips_per_s']:.2f} "
            f"| {own:.2f} ({own / c['clips_per_s']:.2f}x) "
            f"| {real_rate:.2f} ({real_rate / c['clips_per_s']:.2f}x) "
            f"| {workers_needed(c['clips_per_s'], row['in_process']['clips_per_s'])}, "
            f"{workers_needed(c['clips_per_s'], real_one)} "
            f"| {fmt(e2e and e2e['mean_step_s'], 3)} "
            f"| {fmt(e2e and e2e['mean_step_s'] / c['mean_step_s'])}{'x' if e2e else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 4 clips, 12 items, 3 repeats, 8 stage-2 steps, 12 with clips")
    parser.add_argument("--clips", type=int, default=6, help="clips to encode (default 6)")
    parser.add_argument("--items", type=int, default=24, help="items per load_batches run (default 24)")
    parser.add_argument("--repeats", type=int, default=5, help="in-process decodes after the warm-up")
    parser.add_argument("--steps", type=int, default=12, help="stage-2 steps on toy clips (default 12)")
    parser.add_argument("--e2e-steps", type=int, default=18,
                        help="stage-2 steps reading the encoded clips (default 18; 0: skip (d))")
    parser.add_argument("--configs", nargs="+", default=["real", "tiny", "small"],
                        help="which of real, tiny, small to run (default all)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the encoded clips here and reuse them (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.items, args.repeats = min(args.clips, 4), min(args.items, 12), min(args.repeats, 3)
        args.steps, args.e2e_steps = min(args.steps, 8), min(args.e2e_steps, 12)
    known = {s.name: s for s in setups()}
    unknown = sorted(set(args.configs) - set(known))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected some of {list(known)}")
    if "real" not in args.configs:
        args.configs.insert(0, "real")  # the ratio table compares against the real views
    if args.clips < 1 or args.repeats < 1:
        parser.error("--clips and --repeats must be >= 1")
    if args.items < BATCH * (max(WORKERS) + 2):
        parser.error(f"--items must be >= {BATCH * (max(WORKERS) + 2)} (a steady state past start-up)")
    if args.steps <= STEP_WARMUP or (args.e2e_steps and args.e2e_steps <= E2E_WARMUP):
        parser.error(f"--steps must be > {STEP_WARMUP} and --e2e-steps 0 or > {E2E_WARMUP}")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: directory {args.json.parent} does not exist")

    from vidalign.log import configure_logging

    configure_logging(level="WARNING")
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        print(f"encoding {args.clips} clips ...", file=sys.stderr)
        clips, spent = make_clips(args.cache or root / "clips", args.clips)
        records = root / "records.jsonl"
        records.write_text("".join(json.dumps({"id": p.stem, "video": str(p)}) + "\n" for p in clips))
        results = {
            "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load:.1f} at start, "
                       f"torch {torch.__version__}",
            "clips": {"count": len(clips), "encode_s": spent,
                      "mbps": statistics.fmean(p.stat().st_size * 8 / SECONDS / 1e6 for p in clips)},
            "configs": {},
        }
        for name in args.configs:
            setup = known[name]
            print(f"[{name}] decoding in process ...", file=sys.stderr)
            row = {"views": setup.describe(), "teacher_model": setup.teacher_model,
                   "in_process": decode_in_process(clips, setup, args.repeats), "workers": []}
            for w in WORKERS:
                print(f"[{name}] load_batches, {w} worker(s) ...", file=sys.stderr)
                row["workers"].append(decode_in_workers(clips, setup, args.items, w))
            if setup.teacher_model:
                print(f"[{name}] stage 2 on toy clips ...", file=sys.stderr)
                row["stage2"] = stage2_steps(setup, args.steps, root, records=None, warmup=STEP_WARMUP)
                if args.e2e_steps:
                    print(f"[{name}] stage 2 reading the clips ...", file=sys.stderr)
                    row["stage2_records"] = stage2_steps(setup, args.e2e_steps, root, records=records,
                                                         warmup=E2E_WARMUP)
            results["configs"][name] = row
    results["wall_s"] = time.perf_counter() - started
    results["load_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(report(results))
    print(f"\nwall time {results['wall_s']:.0f} s; load average at end {results['load_at_end']:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
