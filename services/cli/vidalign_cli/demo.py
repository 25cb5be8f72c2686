"""``make demo``: does diffusion alignment teach a VideoLLM motion? A toy-scale answer, offline.

On a 2-core machine, in minutes, with the small pretrained models that
``make demo-assets`` made and ships in ``assets/demo`` (a text-to-video tiny
AnimateDiff and tiny CogVideoX trained on SynthMotion, and a baseline VideoLLM
whose encoder was pretrained on single-frame static objectives and then
instruction-tuned on SynthMotion questions):

0. SynthMotion clips for post-training and a held-out evaluation set;
1. the teacher's **conditioning gap** (its loss with the true vs a wrong motion
   description, through the gRPC service) -- printed before anything trains;
2. **baseline** evaluation on the held-out set (MotionBench's six categories +
   the static control), by letter, named option and option likelihood, and
   again with another clip's video (the substitution check); a **probe** of
   what the baseline's features carry;
3. **+VDA**: features -> stage 1 (W_proj + LoRA, teacher in-process) -> the
   teacher's **feature gap** with the stage-1 adapter -> stage 2 (the encoder
   through the teacher service on loopback) -> a probe of the new encoder ->
   stage 3 (LLM LoRA);
4. the **controls**, same budget: stage 2 with mismatched clips; the whole
   recipe with an untrained (random) teacher; stage 3 alone (no teacher); and
   the **oracle ceiling**: the encoder supervised on where each object is in
   every frame (motion given, not taught), then the same stage 3 -- what VDA
   could reach at best, and proof that stage 3 and the scoring can show a gain;
5. **+MotionEnhancer**: CogVideoX's **caption gap**, then priors from the
   CogVideoX teacher service -> SFT with CE + lambda L_align, and its control,
   the same SFT with lambda = 0;
6. a table per category, the headline "+VDA minus the best control", loss
   curves and attention-prior overlays as PNG, everything in ``--out``.

The diagnostics (1, 2, 3, 5; ``vidalign_cli.diagnostics``) each print a PASS or
WARN line against a threshold; they open ``results.md`` and fill
``results["diagnostics"]``. A WARN never stops the demo: it says which link from
teacher to answer is broken, so that the table's "no" can be read.

Every run's artifacts are committed to a local store under ``--out``; the
numbers land in ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vidalign.errors import FailedPrecondition, Unavailable
from vidalign.log import get_logger
from vidalign_cli import diagnostics as diag

if TYPE_CHECKING:
    from vidalign.probe import ProbeReport

log = get_logger("vidalign.demo")

TEACHER_MODEL = "tiny-animatediff"
PRIORS_MODEL = "tiny-cogvideox"
STUDENT = "tiny-videollava"
ASSETS = Path("assets/demo")
"""Where ``make demo-assets`` writes and the demo reads: animatediff/, cogvideox/, videollm/
and MANIFEST.json."""
EVAL_SEED = 999_999
"""SynthMotion seed of the held-out evaluation clips (never used for training anywhere)."""
POST_TRAIN_SEED = 500_000
"""Post-training clips of demo seed s come from SynthMotion seed POST_TRAIN_SEED + s."""
LIKELIHOOD_ROWS = 64
"""(question, option) rows per forward pass of the likelihood scorer: the tiny student's logits
for 64 rows are a few MB, and it takes half the time of the scorer's default 8 (measured)."""
STAGE2_RUNS = ("vda", "ctrl-mismatch", "ctrl-random-teacher")
"""The runs with a stage-2 encoder of their own (the no-teacher control keeps the baseline's)."""


# --- the teacher service ---------------------------------------------------------------


def start_teacher(
    model: str,
    adapters: Sequence[Path | str],
    workdir: Path,
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 300.0,
    name: str = "teacher",
) -> tuple[subprocess.Popen, str]:
    """Start ``vidalign teacher serve`` on a free loopback port; return (process, address)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    cmd = [
        sys.executable, "-m", "vidalign_cli.main", "teacher", "serve",
        "--teacher-model", model, "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--device", device, "--dtype", dtype,
    ]
    if weights:
        cmd += ["--weights", str(weights)]
    for adapter in adapters:
        cmd += ["--adapter", str(adapter)]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise Unavailable(f"the teacher did not start; see {log_path}")
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    wait_serving(address, deadline - time.monotonic(), proc)
    return proc, address


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (the model has loaded)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise Unavailable(f"the teacher at {address} exited with status {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise Unavailable(f"the teacher at {address} was not SERVING within {timeout:.0f} s")


def stop_teacher(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def serving(model: str, workdir: Path, *, weights: Path, adapters: Sequence[str] = (),
            name: str = "teacher") -> Iterator[str]:
    """A teacher service for the duration of a ``with`` block; yields its address."""
    proc, address = start_teacher(model, adapters, workdir, weights=weights, name=name)
    say(f"{name}: {model} ({weights}) serving on {address}, pid {proc.pid}")
    try:
        yield address
    finally:
        stop_teacher(proc)


# --- sizes -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DemoConfig:
    seed: int = 0
    """Seed of the post-training clips and of every training run (the evaluation set is fixed)."""
    assets: str = str(ASSETS)
    train_clips: int = 64
    eval_clips: int = 48
    frames: int = 16
    size: int = 32
    """Frame side the teachers see (the shipped teachers' resolution): their gaps and priors."""
    student_size: int = 0
    """Frame side of the student's view (its features, stages 2-3, SFT, the oracle ceiling's
    supervision); 0: its tower's ``image_size``, read from the student's config. Stages 1 and 2
    resize the student's clips to the teacher's resolution for the teacher."""
    timestep_range: list[int] = field(default_factory=lambda: [500, 1000])
    """Where stages 1 and 2 draw timesteps: the high-noise half, where the conditioning matters
    (the conditioning gap printed first says whether it does)."""
    gap_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Timesteps of both teachers' caption gaps (AnimateDiff's and CogVideoX's)."""
    gap_clips: int = 8
    cogvideox_gap_clips: int = 32
    """Post-training clips of CogVideoX's caption gap (each is VAE-encoded and denoised under
    three captions at every gap timestep, twice; the 32 take about 3 s on two CPU cores)."""
    oracle_gap_clips: int = 8
    """Post-training clips of the oracle feature gap (the oracle adapter never saw them)."""
    feature_gap_clips: int = 8
    """Post-training clips of the VDA teacher's feature gap (at least 2: one lends the other
    its F_V). Each timestep costs five teacher calls (own F_V and four spoilt), two draws a clip:
    the 8 take about 15 s on two CPU cores."""
    feature_gap_timesteps: list[int] = field(default_factory=lambda: [625, 875])
    """Where the feature gap is sought: the middles of the two halves of the alignment
    timesteps [500, 1000)."""
    probe_train_clips: int = 128
    probe_held_out_clips: int = 64
    """The probes' clips (``vidalign probe --clips``): half its defaults, to keep the demo fast."""
    probe_arms: list[str] = field(
        default_factory=lambda: ["vda", "ctrl-mismatch", "ctrl-random-teacher"])
    """Runs whose stage-2 encoder is probed after stage 2 (``vda`` is compared with
    ``ctrl-mismatch`` when both are listed)."""
    pooling: str = "grid:4"
    """F_V of every VDA arm: 4 x 4 pooled patch tokens per frame, where the objects are."""
    conditioning: str = "spatial"
    """How W_proj(F_V) reaches the teacher: the one route the oracle gate passes on the tiny
    teacher (docs/design.md, "VDA conditioning")."""
    projection: str = "mlp"
    """W_proj of every VDA arm: ``mlp`` (two layers with a GELU, VDA's appendix-B variant) reads
    the student's F_V better than the paper's ``linear`` here. After 240 stage-1 steps, another
    clip's F_V raised the teacher's loss by 11.6 / 6.3 / 7.3% (seeds 0 / 1 / 2) against 5.9 /
    2.9 / 4.9% with ``linear``, and reversed frames by 6.4 / 6.4 / 3.8% against 5.0 / 2.1 /
    3.9% (docs/design.md, "The demo"). The paper found the two within 0.5 points."""
    stage1_lr: float = 1e-2
    """W_proj starts at zero under ``spatial`` (as does the LoRA's B): the learning rate of the
    oracle fit that passed its gate (vidalign.vda.oracle)."""
    stage1_steps: int = 240
    """Stage 1 long enough for the teacher to read the student's F_V (seed 0; README, Results):
    with the linear W_proj the feature gap was +2.1% (another clip's F_V) and -0.1% (frames
    reversed) after 60 steps, +5.9% and +5.0% after 240; with the MLP +10.5% and +6.0% after
    160, +11.6% and +6.4% after 240. Seed 2's reversed-frames gap is 3.8% even so. The oracle
    fit needed ~200 steps too."""
    stage2_steps: int = 60
    oracle_encoder_steps: int = 300
    """Steps of the oracle ceiling's position supervision (batch 8, lr ``oracle_encoder_lr``)."""
    oracle_encoder_lr: float = 1e-3
    stage3_steps: int = 120
    sft_steps: int = 120
    batch_size: int = 4
    stage2_lr: float = 1e-4
    stage3_lr: float = 1e-3
    prior_steps: int = 2
    """DDIM inversion / denoising steps of the priors (the paper: 5)."""
    sft_align_weight: float = 100.0
    """lambda of CE + lambda L_align. Prior and VLM rows are distributions over the N ~ 128 cells
    of the student's vision grid, so L_align ~ 1/N: at the paper's lambda = 1 it is ~1% of CE and
    changes no answer (measured: identical to lambda = 0). 100 puts the two on one scale."""
    sft_lr: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-3, 3e-3])
    """SFT learning rates of the vision tower, projector, LLM and aligner (toy scale, as
    configs/sft-tiny.yaml; real models use ~1e-6 / 1e-5 / 1e-5)."""
    workers: int = 2
    """Arms trained side by side (stage 1 of both teachers, every stage 3 and eval, both SFT
    runs), each in a worker process on one torch thread; 1: one after another in this process
    on every thread. One thread makes each arm's numbers the same on any machine: stage 1 at
    lr 1e-2 ends at another adapter when float sums are taken in another order."""

    def __post_init__(self) -> None:
        if self.student_size < 0:
            raise ValueError(f"student_size: expected >= 0 (0: the student's own), got {self.student_size}")
        if self.workers < 1:
            raise ValueError(f"workers: expected >= 1, got {self.workers}")
        if f"F_V {self.pooling}" != diag.PROBE_FV:
            raise ValueError(
                f"pooling: the demo probes {diag.PROBE_FV!r}, the F_V stage 2 trains through; "
                f"got {self.pooling!r}")
        unknown = sorted(set(self.probe_arms) - set(STAGE2_RUNS))
        if unknown:
            raise ValueError(
                f"probe_arms: {unknown} ran no stage 2; choose from {list(STAGE2_RUNS)}")


# --- helpers -----------------------------------------------------------------------------


_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def _worker_init(t0: float) -> None:
    """A side-by-side worker: one torch thread, the parent's clock for ``say``, logging on."""
    import torch

    from vidalign.log import configure_logging

    global _T0
    _T0 = t0  # CLOCK_MONOTONIC: one clock for every process of the machine
    torch.set_num_threads(1)
    configure_logging()


@contextmanager
def arm_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` spawned processes for :func:`side_by_side` (None: run in this process)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(_T0,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def side_by_side(pool: ProcessPoolExecutor | None,
                 calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """``fn(*args)`` for each call, results in order: in ``pool``'s workers when there is one.

    The first failure is raised once the calls already running have finished; calls not
    yet started are cancelled.
    """
    if pool is None:
        return [fn(*args) for fn, args in calls]
    futures = [pool.submit(fn, *args) for fn, args in calls]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


@dataclass
class Timings:
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"== {name}")
        tic = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - tic, 1)


def check_assets(assets: Path) -> dict[str, Any]:
    manifest = assets / "MANIFEST.json"
    needed = ["animatediff/base/unet", "oracle/adapter.safetensors", "cogvideox/transformer",
              "videollm/model/config.json"]
    missing = [p for p in needed if not (assets / p).exists()]
    if not manifest.is_file() or missing:
        raise FailedPrecondition(
            f"assets: {assets} lacks {missing or ['MANIFEST.json']}; "
            "`make demo-assets` makes them (about 45 minutes on 2 cores)"
        )
    return json.loads(manifest.read_text())


def make_random_teacher(directory: Path, trained: Path, *, seed: int) -> None:
    """The control teacher: the trained one's architecture, tokenizer and VAE, untrained.

    The UNet is the registry's random init; the text encoder is re-initialised
    under ``seed``; the VAE (frozen in pretraining anyway) is the same.
    """
    if (directory / "unet").is_dir():
        return
    import torch
    from transformers import CLIPTextModel

    from vidalign.vda import load_teacher

    teacher = load_teacher(TEACHER_MODEL, base=str(trained))
    teacher.unet = load_teacher(TEACHER_MODEL).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher.text_encoder = CLIPTextModel(teacher.text_encoder.config).eval()
    teacher.save_pretrained(directory)


def make_data(out: Path, config: DemoConfig) -> tuple[Path, Path]:
    from vidalign.data.synth import generate, write_dataset

    train, held_out = out / "data" / "train", out / "data" / "eval"
    for path, n, seed in ((train, config.train_clips, POST_TRAIN_SEED + config.seed),
                          (held_out, config.eval_clips, EVAL_SEED)):
        if not (path / "synthmotion.jsonl").is_file():
            write_dataset(generate(n, seed=seed, frames=config.frames, size=64), path)
    return train, held_out


def student_view_size(config: DemoConfig, student: Path) -> int:
    """``config.student_size``, or the student's own frame side (its vision tower's
    ``image_size``) when that is 0; ``student`` is the VideoLLM asset (``<student>/model``)."""
    if config.student_size:
        return config.student_size
    path = student / "model" / "config.json"
    try:
        return int(json.loads(path.read_text())["vision_config"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FailedPrecondition(
            f"student: cannot read its frame size from {path} ({e}); set student_size") from e


def evaluate_student(items: list, *, weights: Path | str, encoder: str = "", lora: str = "",
                     out: Path, name: str, substitute: bool = False) -> dict[str, Any]:
    """Score one variant on the held-out items; writes ``<out>/eval/<name>.{json,md,...}``.

    Every variant is scored by letter, by the option it names and by option likelihood
    (which needs no generation, so a student that cannot copy letters is still measured);
    ``substitute`` also asks every question with another clip's video (doubles the time).
    """
    from vidalign.eval import evaluate, result_dict, write_result
    from vidalign.eval.likelihood import videollm_option_scorer
    from vidalign.students.answerer import load_trained_videollm, videollm_answerer

    llm = load_trained_videollm(STUDENT, path=str(weights), encoder=encoder, lora=lora)
    scorer = videollm_option_scorer(llm, max_rows=LIKELIHOOD_ROWS)
    result = evaluate(items, videollm_answerer(llm, max_new_tokens=24), batch_size=16,
                      frames=16, progress=False, option_scorer=scorer,
                      substitute=substitute, substitute_seed=0)
    write_result(result, out / "eval", name=name, model=name)
    summary = result_dict(result, model=name)
    summary["named"] = named_option_scores(items, {p.uid: p.output for p in result.predictions})
    by = {m: _metric(summary, m) for m in METRICS}
    say(f"{name}: motion average " + " / ".join(f"{100 * s['average']:.1f}%" for s in by.values())
        + f" by {' / '.join(by)}; static control "
        + " / ".join(f"{100 * _static(s):.1f}%" for s in by.values()))
    return summary


def named_option_scores(items: list, outputs: dict[str, str]) -> dict[str, Any]:
    """Accuracy by the option *text* a reply names (FAVOR-Bench's substring rule).

    The demo's students reply "option text (letter)". The letter, which the
    MotionBench rule reads, also needs the option's position copied right; the
    named text is what the model understood of the video. Both are reported.
    """
    from vidalign.data.benchmarks.records import LETTERS
    from vidalign.eval.answers import favor_judge
    from vidalign.eval.scoring import score

    s = score(
        (i.category, favor_judge(outputs.get(i.uid, ""), i.options[LETTERS.index(i.answer)], i.options))
        for i in items
    )
    return {
        "n": s.n, "overall": s.overall, "average": s.average,
        "categories": {c: {"n": cs.n, "correct": cs.correct, "accuracy": cs.accuracy}
                       for c, cs in s.categories.items()},
    }


def _static(summary: dict[str, Any]) -> float:
    from vidalign.data.synth import STATIC_CATEGORY

    return summary["categories"].get(STATIC_CATEGORY, {}).get("accuracy", 0.0)


def _trend(losses: list[float], k: int = 10) -> str:
    """Mean loss of the first and last ``k`` steps (single steps are dominated by the timestep)."""
    if not losses:
        return "already done"
    k = max(1, min(k, len(losses) // 2 or 1))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"mean loss of the first {k} steps {first:.4f}, of the last {k} {last:.4f}"


def _losses(run_dir: str | Path, key: str = "loss") -> list[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


# --- the pipeline ------------------------------------------------------------------------


def print_gap(title: str, gaps: list) -> None:
    print(f"\n{title}")
    print(f"{'timestep':>8} {'true caption':>13} {'wrong motion':>13} {'gap':>8}")
    for g in gaps:
        print(f"{g.timestep:>8} {g.true_loss:>13.5f} {g.wrong_loss:>13.5f} {g.relative:>+8.2%}")
    print(flush=True)


def measure_gap(address: str, train_dir: Path, config: DemoConfig) -> list:
    from vidalign.data.synthset import load_synth_set
    from vidalign.gap import caption_gap, swap_motion_words
    from vidalign.teacher.client import connect

    data = load_synth_set(train_dir, num_clips=config.gap_clips, frames=config.frames, size=config.size)
    teacher = connect(address)
    try:
        return caption_gap(
            teacher, data.ids, data.videos, data.captions,
            [swap_motion_words(c) for c in data.captions],
            timesteps=config.gap_timesteps, seed=config.seed, draws=2,
        )
    finally:
        teacher.close()


def vda_configs(root: Path, config: DemoConfig, train_dir: Path, *, teacher_weights: Path,
                student_weights: Path) -> dict[str, Any]:
    """Stage configs of one VDA run (vidalign_trainer.vda wiring) at the demo's sizes."""
    from vidalign_trainer.vda import VDAConfig, stage_configs

    seed, steps = config.seed, {"batch_size": config.batch_size, "seed": config.seed}
    return stage_configs(VDAConfig(
        store=str(root),
        student=STUDENT,
        student_weights=str(student_weights),
        teacher=TEACHER_MODEL,
        teacher_weights=str(teacher_weights),
        pooling=config.pooling,
        conditioning=config.conditioning,
        projection=config.projection,
        data={"kind": "synth", "path": str(train_dir), "num_clips": 0, "frames": config.frames,
              "size": student_view_size(config, Path(student_weights)), "seed": seed},
        stage1={"train": {**steps, "steps": config.stage1_steps, "lr": config.stage1_lr,
                          "timestep_range": config.timestep_range},
                "eval": {"every": 0}, "output": {"checkpoint_every": config.stage1_steps}},
        stage2={"train": {**steps, "steps": config.stage2_steps, "lr": config.stage2_lr,
                          "timestep_range": config.timestep_range},
                "output": {"checkpoint_every": config.stage2_steps}},
        stage3={"train": {**steps, "steps": config.stage3_steps, "lr": config.stage3_lr},
                "data": {"tasks": ["qa"]}, "output": {"checkpoint_every": config.stage3_steps}},
    ))


def run_demo(out: Path, config: DemoConfig | None = None) -> dict[str, Any]:
    """The whole demo; returns what it writes to ``<out>/results.json``."""
    config = config or DemoConfig()
    with arm_pool(config.workers) as pool:
        return _run_demo(out, config, pool)


def _run_demo(out: Path, config: DemoConfig, pool: ProcessPoolExecutor | None) -> dict[str, Any]:
    from vidalign.data.benchmarks import load_benchmark
    from vidalign.data.synth import MOTION_CATEGORIES
    from vidalign_trainer.features import extract_features
    from vidalign_trainer.stage2 import run_stage2

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(config.assets).resolve()
    manifest = check_assets(assets)
    timings = Timings()
    student = assets / "videollm"
    trained, random_teacher = assets / "animatediff", out / "random-animatediff"
    results: dict[str, Any] = {"config": asdict(config), "assets": manifest.get("summary", {})}

    with timings.phase("data"):
        make_random_teacher(random_teacher / "base", trained / "base", seed=config.seed)
        train_dir, eval_dir = make_data(out, config)
        items = load_benchmark("motionbench", eval_dir).items
        say(f"post-training clips: {train_dir}; held-out: {eval_dir} ({len(items)} questions)")

    found: list[diag.Diagnostic] = []
    with timings.phase("conditioning gap"):
        gaps = {}
        for name, weights in (("trained", trained), ("random", random_teacher)):
            with serving(TEACHER_MODEL, out / "teachers", weights=weights, name=f"gap-{name}") as address:
                gaps[name] = measure_gap(address, train_dir, config)
            print_gap(f"conditioning gap of the {name} teacher (loss with a wrong motion "
                      f"description vs the true one; same noise):", gaps[name])
        results["gap"] = {k: [asdict(g) | {"relative": g.relative} for g in v] for k, v in gaps.items()}
        gap_check = diag.animatediff_gap_diagnostic(gaps["trained"], config.timestep_range)
        results["gap_at_alignment"] = _note(found, [gap_check])[0].value

    with timings.phase("oracle feature gap: can the VDA teacher read features at all?"):
        oracle_gaps = diag.measure_oracle_gap(
            trained / "base", assets / "oracle" / "adapter.safetensors", train_dir=train_dir,
            clips=config.oracle_gap_clips, frames=config.frames, size=config.size,
            timesteps=config.feature_gap_timesteps, seed=config.seed)
        print(diag.feature_gap_text(oracle_gaps, diag.ORACLE_SOURCE), flush=True)
        results["oracle_gap"] = {how: [asdict(g) | {"relative": g.relative} for g in per_t]
                                 for how, per_t in oracle_gaps.items()}
        _note(found, diag.feature_gap_diagnostics(oracle_gaps, diag.ORACLE_SOURCE))

    evals: dict[str, dict[str, Any]] = {}
    with timings.phase("baseline eval (and with another clip's video)"):
        evals["baseline"] = evaluate_student(items, weights=student / "model", out=out,
                                             name="baseline", substitute=True)
        _note(found, diag.student_diagnostics(evals["baseline"]))

    probes: dict[str, ProbeReport] = {}
    with timings.phase("probe: what the baseline's features carry"):
        probe_clips = diag.probe_clips(config.probe_train_clips, config.probe_held_out_clips)
        probes["baseline"] = diag.probe(STUDENT, probe_clips, train_clips=config.probe_train_clips,
                                        weights=str(student / "model"),
                                        sources=(diag.PROBE_FV, diag.PROBE_LLM), seed=config.seed)
        print(f"\nprobe of the baseline student:\n{probes['baseline'].table()}", flush=True)
        _note(found, diag.probe_diagnostics(probes["baseline"]))

    runs = {
        "vda": vda_configs(out / "vda", config, train_dir, teacher_weights=trained,
                           student_weights=student),
        "ctrl-mismatch": vda_configs(out / "ctrl-mismatch", config, train_dir,
                                     teacher_weights=trained, student_weights=student),
        "ctrl-random-teacher": vda_configs(out / "ctrl-random-teacher", config, train_dir,
                                           teacher_weights=random_teacher, student_weights=student),
        "ctrl-no-teacher": vda_configs(out / "ctrl-no-teacher", config, train_dir,
                                       teacher_weights=trained, student_weights=student),
        "oracle-ceiling": vda_configs(out / "oracle-ceiling", config, train_dir,
                                      teacher_weights=trained, student_weights=student),
    }
    runs["ctrl-mismatch"]["stage2"].train.mismatch = True
    runs["ctrl-no-teacher"]["stage3"].encoder = ""  # the baseline's own encoder
    # The mismatch control reuses +VDA's stage-1 adapter: only stage 2 differs.
    runs["ctrl-mismatch"]["stage2"].teacher.adapter = runs["vda"]["stage2"].teacher.adapter

    with timings.phase("VDA stage 1 (features, W_proj + LoRA; trained and random teacher)"):
        stage1_arms = ("vda", "ctrl-random-teacher")
        for name in stage1_arms:
            extract_features(runs[name]["features"])
        done = side_by_side(pool, [(_stage1, (runs[name]["stage1"],)) for name in stage1_arms])
        for name, result in zip(stage1_arms, done, strict=True):
            say(f"{name} stage 1: {_trend(result.losses)}")

    # One teacher service, +VDA's stage-1 adapter loaded: first the feature gap, then stage 2.
    with ExitStack() as service:
        with timings.phase("feature gap: does the teacher read F_V? (+VDA's stage-1 adapter)"):
            adapter = runs["vda"]["stage2"].teacher.adapter
            address = service.enter_context(
                serving(TEACHER_MODEL, out / "teachers", weights=trained, adapters=[adapter]))
            feature_gaps = diag.measure_feature_gap(
                address, adapter=adapter, features_uri=runs["vda"]["features"].output.dir,
                train_dir=train_dir, clips=config.feature_gap_clips, frames=config.frames,
                size=config.size, timesteps=config.feature_gap_timesteps, seed=config.seed,
                text=runs["vda"]["stage2"].train.text)
            print(diag.feature_gap_text(feature_gaps), flush=True)
            results["feature_gap"] = {how: [asdict(g) | {"relative": g.relative} for g in per_t]
                                      for how, per_t in feature_gaps.items()}
            _note(found, diag.feature_gap_diagnostics(feature_gaps))
        with timings.phase("VDA stage 2 through the gRPC teacher (+VDA, mismatch control)"):
            for name in ("vda", "ctrl-mismatch"):
                runs[name]["stage2"].teacher.address = address
                losses = run_stage2(runs[name]["stage2"], resume=True)
                say(f"{name} stage 2: {_trend(losses)}")
    with timings.phase("VDA stage 2 through the gRPC teacher (random-teacher control)"):
        stage2 = runs["ctrl-random-teacher"]["stage2"]
        with serving(TEACHER_MODEL, out / "teachers", weights=random_teacher,
                     adapters=[stage2.teacher.adapter], name="random-teacher") as address:
            stage2.teacher.address = address
            losses = run_stage2(stage2, resume=True)

    with timings.phase("probe: the stage-2 encoders"):
        for name in config.probe_arms:
            probes[name] = diag.probe(STUDENT, probe_clips, train_clips=config.probe_train_clips,
                                      weights=str(student / "model"),
                                      encoder=runs[name]["stage3"].encoder, seed=config.seed)
        print(f"\n{diag.PROBE_FV} after stage 2 (accuracy %, change from the baseline):\n\n"
              f"{diag.probe_table(probes, HEADERS)}", flush=True)
        if "vda" in probes:
            control = "ctrl-mismatch" if "ctrl-mismatch" in probes else "baseline"
            _note(found, [diag.probe_change_diagnostic(probes, "vda", control, HEADERS)])

    with timings.phase("oracle ceiling: the encoder supervised on where the objects are"):
        ceiling = runs["oracle-ceiling"]["stage3"]
        ceiling.encoder = str(train_oracle_encoder(out / "oracle-ceiling", train_dir, student,
                                                   config))
        probes["oracle-ceiling"] = diag.probe(
            STUDENT, probe_clips, train_clips=config.probe_train_clips,
            weights=str(student / "model"), encoder=ceiling.encoder, seed=config.seed)
        print(f"\n{diag.PROBE_FV} of the oracle ceiling's encoder:\n"
              f"{probes['oracle-ceiling'].table()}", flush=True)

    with timings.phase("VDA stage 3 (LLM LoRA) and eval, +VDA, controls and oracle ceiling"):
        done = side_by_side(pool, [(_stage3_and_eval, (stages["stage3"], items, student, out, name))
                                   for name, stages in runs.items()])
        evals.update(zip(runs, done, strict=True))
        chance = statistics.mean(1 / len(i.options) for i in items if i.category in MOTION_CATEGORIES)
        _note(found, [diag.ceiling_diagnostic(evals["oracle-ceiling"], evals["ctrl-no-teacher"],
                                              chance)])

    with timings.phase("caption gap of the CogVideoX teacher (before its priors)"):
        cogvideox_gap = diag.measure_cogvideox_gap(
            assets / "cogvideox", PRIORS_MODEL, train_dir=train_dir,
            clips=config.cogvideox_gap_clips, frames=config.frames, size=config.size,
            timesteps=config.gap_timesteps, seed=config.seed)
        print(diag.cogvideox_gap_text(cogvideox_gap), flush=True)
        results["cogvideox_gap"] = cogvideox_gap.to_dict()
        _note(found, diag.cogvideox_gap_diagnostics(cogvideox_gap))
    with timings.phase("MotionEnhancer: priors from the CogVideoX teacher service"):
        priors_uri = str(out / "me" / "priors")
        with serving(PRIORS_MODEL, out / "teachers", weights=assets / "cogvideox",
                     name="cogvideox") as address:
            _extract_priors(train_dir, priors_uri, address, config)
    with timings.phase("MotionEnhancer SFT (CE + lambda L_align) and its control (lambda = 0), eval"):
        arms = {"motionenhancer": config.sft_align_weight, "ctrl-sft-no-align": 0.0}
        done = side_by_side(pool, [
            (_sft_and_eval, (out / "me" / name, train_dir, priors_uri, student, weight, config,
                             items, out, name))
            for name, weight in arms.items()])
        evals.update(zip(arms, done, strict=True))

    with timings.phase("report"):
        results["probe"] = {name: report.to_dict() for name, report in probes.items()}
        results["diagnostics"] = [d.to_dict() for d in found]
        results["evals"] = evals
        results["headline"] = headline(evals)
        results["headline_named"] = headline(evals, "named")
        results["headline_likelihood"] = headline(evals, "likelihood")
        results["timings_s"] = timings.phases
        curves = {
            "+VDA stage 1": _losses(out / "vda" / "stage1"),
            "+VDA stage 2": _losses(out / "vda" / "stage2"),
            "mismatch stage 2": _losses(out / "ctrl-mismatch" / "stage2"),
            "random-teacher stage 2": _losses(out / "ctrl-random-teacher" / "stage2"),
            "+VDA stage 3": _losses(out / "vda" / "stage3"),
            "+ME SFT (CE + L_align)": _losses(out / "me" / "motionenhancer"),
        }
        from vidalign.plots import line_chart

        line_chart(curves, f"demo seed {config.seed}: training losses").save(out / "losses.png")
        _show_priors(priors_uri, out / "priors-png")
        diagnostics = diagnostics_section(found)
        table = accuracy_tables(evals)
        probe_section = (f"{diag.PROBE_FV} probe (accuracy %, change from the baseline):\n\n"
                         + diag.probe_table(probes, HEADERS))
        (out / "results.md").write_text(f"{diagnostics}\n{table}\n{probe_section}")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print("\nheld-out SynthMotion accuracy (%), by category,", table)
    print(diagnostics)
    print(f"\nwall time {sum(timings.phases.values()):.0f} s: " +
          ", ".join(f"{k} {v:.0f} s" for k, v in timings.phases.items()))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; plots: {out / 'losses.png'}, "
          f"{out / 'priors-png'}")
    return results


def _note(found: list[diag.Diagnostic], new: list[diag.Diagnostic]) -> list[diag.Diagnostic]:
    """Print each new diagnostic's PASS / WARN line and keep it for the report; returns ``new``."""
    for d in new:
        say(d.line())
    found.extend(new)
    return new


def diagnostics_section(found: Sequence[diag.Diagnostic]) -> str:
    """The top of ``results.md``: the diagnostics table and which gates failed."""
    return ("diagnostics (PASS / WARN against each threshold; vidalign_cli/diagnostics.py says "
            f"why each):\n\n{diag.diagnostics_table(found)}\n{diag.gates_summary(found)}")


def train_oracle_encoder(root: Path, train_dir: Path, student: Path, config: DemoConfig) -> Path:
    """The oracle ceiling's encoder: the student's, supervised on where each object is in every
    frame (``position_supervise``) on the post-training clips; returns the directory holding its
    ``encoder.safetensors`` (the stage-2 artifact's layout, so stage 3 reads it the same way).
    A finished one is reused; an interrupted one resumes from its checkpoint."""
    from safetensors.torch import save_file

    from vidalign.data.synthset import load_synth_set
    from vidalign.store import MANIFEST, open_store
    from vidalign.store.artifacts import commit_artifact
    from vidalign.students.encoder import load_student
    from vidalign_trainer.pretrain import Schedule, position_supervise

    target = root / "encoder"
    if (target / MANIFEST).is_file():  # committed last: the artifact is whole
        return target
    data = load_synth_set(train_dir, frames=config.frames, size=student_view_size(config, student))
    encoder = load_student(STUDENT, path=str(student / "model"), pooling=config.pooling)
    losses = position_supervise(encoder, data.videos, data.truths, Schedule(
        steps=config.oracle_encoder_steps, batch_size=8, lr=config.oracle_encoder_lr,
        seed=config.seed, out=str(root / "position"), checkpoint_every=config.oracle_encoder_steps))
    say(f"oracle ceiling, position supervision: {_trend(losses)}")
    with tempfile.TemporaryDirectory(prefix="vidalign-oracle-encoder-") as tmp:
        weights = Path(tmp) / "encoder.safetensors"
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))
        commit_artifact(open_store(str(root)), "encoder", {"encoder.safetensors": weights},
                        producer="vidalign demo: oracle ceiling", step=config.oracle_encoder_steps,
                        meta={"student": STUDENT, "objective": "position_supervise",
                              "pooling": config.pooling})
    return target


def _extract_priors(train_dir: Path, uri: str, address: str, config: DemoConfig) -> None:
    from vidalign_teacher.priors import ExtractConfig, extract_dataset_priors

    extract_dataset_priors(ExtractConfig(
        data=str(train_dir), out=uri, model=PRIORS_MODEL, teacher=address, device="cpu",
        steps=config.prior_steps,
    ))


def _stage1(stage1: Any) -> Any:
    """One VDA arm's stage 1, resumed where it stopped (a :func:`side_by_side` call)."""
    from vidalign_trainer.stage1 import run_stage1

    return run_stage1(stage1, resume=True)


def _stage3_and_eval(stage3: Any, items: list, student: Path, out: Path, name: str) -> dict[str, Any]:
    """One VDA arm's stage 3, then its held-out evaluation (a :func:`side_by_side` call)."""
    from vidalign_trainer.stage3 import run_stage3

    run_stage3(stage3, resume=True)
    return evaluate_student(items, weights=student / "model", encoder=stage3.encoder,
                            lora=f"{stage3.output.dir}/lora", out=out, name=name)


def _sft_and_eval(run_dir: Path, train_dir: Path, priors: str, student: Path, weight: float,
                  config: DemoConfig, items: list, out: Path, name: str) -> dict[str, Any]:
    """One MotionEnhancer arm's SFT, then its held-out evaluation (a :func:`side_by_side` call)."""
    _run_sft(run_dir, train_dir, priors, student, weight, config)
    return evaluate_student(items, weights=run_dir / "model", out=out, name=name)


def _run_sft(run_dir: Path, train_dir: Path, priors: str, student: Path, weight: float,
             config: DemoConfig) -> Path:
    from vidalign.config import from_dict
    from vidalign_trainer.sft import SFTConfig, run_sft

    sft = from_dict(SFTConfig, {
        "student": STUDENT, "student_weights": str(student), "priors": priors,
        "data": {"kind": "synth", "path": str(train_dir), "num_clips": config.train_clips,
                 "frames": config.frames, "size": student_view_size(config, student),
                 "seed": config.seed, "tasks": ["caption", "qa"]},
        "align": {"weight": weight},
        "train": {"steps": config.sft_steps, "batch_size": config.batch_size, "seed": config.seed,
                  **dict(zip(("lr_vision", "lr_projector", "lr_llm", "lr_aligner"), config.sft_lr,
                             strict=True))},
        "output": {"dir": str(run_dir), "checkpoint_every": config.sft_steps},
    })
    result = run_sft(sft, resume=True)
    if result.losses:
        aligned = [r["align"] for r in result.losses if r["align"] > 0]  # steps with a caption
        say(f"SFT lambda={weight}: CE {_trend([r['ce'] for r in result.losses])}; "
            f"L_align over the {len(aligned)} steps with aligned rows: {_trend(aligned, 5)}; "
            f"before/after on the training set {result.eval_start} -> {result.eval_end}")
    return run_dir


def _show_priors(uri: str, out_dir: Path, clips: int = 2) -> None:
    """``vidalign priors show`` for the first clips: each selected token's prior on the frames."""
    from vidalign.motionenhancer.io import load_priors_set
    from vidalign_teacher.priors import show

    show(uri, out_dir, clip_ids=load_priors_set(uri).ids[:clips], max_tokens=4)


# --- the report ---------------------------------------------------------------------------

COLUMNS = ("baseline", "vda", "ctrl-mismatch", "ctrl-random-teacher", "ctrl-no-teacher",
           "oracle-ceiling", "motionenhancer", "ctrl-sft-no-align")
HEADERS = {"baseline": "baseline", "vda": "+VDA", "ctrl-mismatch": "mismatch",
           "ctrl-random-teacher": "random teacher", "ctrl-no-teacher": "no teacher",
           "oracle-ceiling": "oracle ceiling",
           "motionenhancer": "+MotionEnhancer", "ctrl-sft-no-align": "SFT, no align"}
VDA_CONTROLS = ("ctrl-mismatch", "ctrl-random-teacher", "ctrl-no-teacher")
METRICS = {
    "letter": "by letter (MotionBench's rule)",
    "named": "by the option text named (FAVOR-Bench's substring rule)",
    "likelihood": "by option likelihood (the option text the student finds most likely, "
                  "nothing generated)",
}
"""The accuracies of every arm, each with its table and headline (``_metric`` reads them)."""


def _metric(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    return summary if metric == "letter" else summary[metric]


def results_table(evals: dict[str, dict[str, Any]], metric: str = "letter") -> str:
    """Rows: categories, Overall, Average; columns: the runs; n = questions per row.

    ``metric``: ``letter`` (MotionBench's rule), ``named`` (the option text named) or
    ``likelihood`` (the most likely option); see :data:`METRICS`.
    """
    from vidalign.data.synth import MOTION_CATEGORIES, STATIC_CATEGORY

    evals = {k: _metric(v, metric) for k, v in evals.items()}
    cols = [c for c in COLUMNS if c in evals]
    head = ["category", "n", *(HEADERS[c] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    first = evals[cols[0]]
    for category in [*MOTION_CATEGORIES, STATIC_CATEGORY]:
        if category not in first["categories"]:
            continue
        n = first["categories"][category]["n"]
        cells = [f"{100 * evals[c]['categories'][category]['accuracy']:.1f}" for c in cols]
        label = f"{category} (control)" if category == STATIC_CATEGORY else category
        lines.append("| " + " | ".join([label, str(n), *cells]) + " |")
    for key, label in (("overall", "Overall (motion, micro)"), ("average", "Average (motion, macro)")):
        cells = [f"{100 * evals[c][key]:.1f}" for c in cols]
        lines.append("| " + " | ".join([label, str(first["n"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def accuracy_tables(evals: dict[str, dict[str, Any]]) -> str:
    """A table and headline per metric of :data:`METRICS` present in every eval."""
    parts = []
    for metric, title in METRICS.items():
        if all(metric == "letter" or v.get(metric) for v in evals.values()):
            parts.append(f"{title}:\n\n{results_table(evals, metric)}\n"
                         f"{headline_text(headline(evals, metric))}\n")
    return "\n".join(parts)


HEADLINES = {
    "vda": ("+VDA minus its best control", "motion_vs_best_control"),
    "oracle_ceiling": ("oracle ceiling minus stage 3 alone (no teacher)", "motion_vs_no_teacher"),
    "motionenhancer": ("+MotionEnhancer minus SFT without alignment", "motion_vs_control"),
}
"""The comparisons :func:`headline` makes: its key, the line's name, the motion-average field."""


def headline(evals: dict[str, dict[str, Any]], metric: str = "letter") -> dict[str, Any]:
    """+VDA minus its best control, the oracle ceiling minus stage 3 alone, +ME minus its control
    (motion average, static), in points."""
    evals = {k: _metric(v, metric) for k, v in evals.items()}

    def point(name: str, key: str) -> float:
        return 100 * (evals[name]["average"] if key == "average" else _static(evals[name]))

    out: dict[str, Any] = {}
    if "vda" in evals:
        controls = [c for c in VDA_CONTROLS if c in evals]
        best = max(controls, key=lambda c: point(c, "average")) if controls else "baseline"
        out["vda"] = {
            "best_control": best,
            "motion_vs_best_control": point("vda", "average") - point(best, "average"),
            "motion_vs_baseline": point("vda", "average") - point("baseline", "average"),
            "static_vs_baseline": point("vda", "static") - point("baseline", "static"),
        }
    if "oracle-ceiling" in evals and "ctrl-no-teacher" in evals:
        out["oracle_ceiling"] = {
            "motion_vs_no_teacher": point("oracle-ceiling", "average") - point("ctrl-no-teacher", "average"),
            "motion_vs_baseline": point("oracle-ceiling", "average") - point("baseline", "average"),
            "static_vs_baseline": point("oracle-ceiling", "static") - point("baseline", "static"),
        }
    if "motionenhancer" in evals and "ctrl-sft-no-align" in evals:
        out["motionenhancer"] = {
            "motion_vs_control": point("motionenhancer", "average") - point("ctrl-sft-no-align", "average"),
            "motion_vs_baseline": point("motionenhancer", "average") - point("baseline", "average"),
            "static_vs_baseline": point("motionenhancer", "static") - point("baseline", "static"),
        }
    return out


def headline_text(h: dict[str, Any]) -> str:
    lines = []
    if "vda" in h:
        v = h["vda"]
        lines.append(
            f"{HEADLINES['vda'][0]} ({HEADERS[v['best_control']]}): "
            f"{v['motion_vs_best_control']:+.1f} points of motion average "
            f"(vs baseline {v['motion_vs_baseline']:+.1f}; static control {v['static_vs_baseline']:+.1f})"
        )
    if "oracle_ceiling" in h:
        o = h["oracle_ceiling"]
        lines.append(
            f"{HEADLINES['oracle_ceiling'][0]}: {o['motion_vs_no_teacher']:+.1f} "
            f"points of motion average (vs baseline {o['motion_vs_baseline']:+.1f}; static "
            f"control {o['static_vs_baseline']:+.1f})"
        )
    if "motionenhancer" in h:
        m = h["motionenhancer"]
        lines.append(
            f"{HEADLINES['motionenhancer'][0]}: {m['motion_vs_control']:+.1f} points of "
            f"motion average (vs baseline {m['motion_vs_baseline']:+.1f}; static control "
            f"{m['static_vs_baseline']:+.1f})"
        )
    return "\n".join(lines)


def _mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def headline_over_seeds(runs: Sequence[dict[str, Any]], seeds: Sequence[int],
                        metric: str = "letter") -> str:
    """Markdown: each headline comparison per seed (points of motion average) and its mean ± sd.

    +VDA's best control is chosen per seed, as one run chooses it; the cell names it.
    """
    lines = ["| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    per_run = [headline(r["evals"], metric) for r in runs]
    for key, (name, field_) in HEADLINES.items():
        if not all(key in h for h in per_run):
            continue
        values = [h[key][field_] for h in per_run]
        cells = [f"{v:+.1f}" + (f" ({HEADERS[h[key]['best_control']]})" if key == "vda" else "")
                 for v, h in zip(values, per_run, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_sd(values)} |")
    return "\n".join(lines) + "\n"


def seeds_summary(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """What ``vidalign demo --seeds`` prints and writes to ``summary.md``: every gate per seed,
    then per metric the headline comparisons per seed and each arm's mean ± sd."""
    from vidalign_cli.diagnostics import Diagnostic, diagnostics_over_seeds

    if len(runs) != len(seeds):
        raise ValueError(f"seeds_summary: {len(runs)} runs for {len(seeds)} seeds")
    gates = diagnostics_over_seeds({
        seed: [Diagnostic.from_dict(d) for d in run.get("diagnostics", [])]
        for seed, run in zip(seeds, runs, strict=True)
    })
    parts = [f"over seeds {' '.join(map(str, seeds))}\n\ndiagnostics:\n\n{gates}"]
    for metric, title in METRICS.items():
        if all(metric == "letter" or all(v.get(metric) for v in r["evals"].values()) for r in runs):
            parts.append(f"{title}:\n\n{headline_over_seeds(runs, seeds, metric)}\n"
                         f"{main_summary(runs, metric)}")
    return "\n".join(parts)


def main_summary(runs: Sequence[dict[str, Any]], metric: str = "letter") -> str:
    """Mean and spread over demo seeds of each column's motion average and static accuracy."""
    lines = ["| run | motion average (mean ± sd) | static control (mean ± sd) | seeds |",
             "|---|---:|---:|---:|"]
    for col in COLUMNS:
        rows = [_metric(r["evals"][col], metric) for r in runs if col in r.get("evals", {})]
        if not rows:
            continue
        motion = [100 * r["average"] for r in rows]
        static = [100 * _static(r) for r in rows]
        lines.append(f"| {HEADERS[col]} | {_mean_sd(motion)} | {_mean_sd(static)} | {len(rows)} |")
    return "\n".join(lines) + "\n"

