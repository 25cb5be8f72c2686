"""The ``vidalign`` command line.

One grammar across commands: the same flag means the same thing everywhere.

    --teacher ADDRESS     a running teacher service: host:port or dns:///name:port (configs:
                          teacher.address); `local` where a command can load the model itself
    --teacher-model NAME  a diffusion (or CogVideoX) model: registry name or dir (configs:
                          teacher.model)
    --student NAME        a VideoLLM (configs: student)
    --out URI             where a command writes: a directory or a store URI (s3://...)
    --config, --set, --print-config, --resume   the config-driven jobs (train, features, vda)

Old spellings (--model, --address, --to) still parse, hidden from the help,
with a warning on stderr.

Errors that a user can fix (bad config, unknown model, unreachable teacher)
print one line and exit with status 2; bugs keep their traceback.

Building the parser imports nothing heavy (no torch): a config-driven job's
key listing imports its config class only when its own ``--help`` is shown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vidalign import __version__
from vidalign.config import (
    ConfigError,
    HelpFormatter,
    add_config_arguments,
    add_option,
    config_from_args,
    describe_config,
)
from vidalign.errors import InvalidInput, VidalignError

EXAMPLES = """\
examples:
  vidalign models list
  vidalign teacher serve --teacher-model tiny-animatediff --port 50051 --adapter A.safetensors
  vidalign teacher info --teacher 127.0.0.1:50051
  vidalign teacher gap --teacher local --teacher-model tiny-animatediff
  vidalign adapter init --teacher-model tiny-animatediff --student tiny-videollava --out A.safetensors
  vidalign features extract --config configs/features-tiny.yaml
  vidalign train stage1 --config configs/stage1-tiny.yaml [--resume]
  vidalign train stage2 --config configs/stage2-tiny.yaml --set train.steps=10 --print-config
  vidalign vda run --config configs/vda/tiny-videollava.yaml
  vidalign plan --config configs/paper/sft-qwen2.5-vl-7b.yaml --ranks 8
  vidalign models pull animatediff-v1-5-2 --out s3://vidalign/models/animatediff-v1-5-2
  vidalign priors extract --data data/synth --out s3://vidalign/priors/synth [--teacher HOST:PORT]
  vidalign priors show --priors s3://vidalign/priors/synth --clip synth-0-00000 --out png/
  vidalign eval --bench motionbench --data DIR --student tiny-videollava --out runs/eval
  vidalign probe --weights assets/demo/videollm/model [--encoder runs/vda/stage2] --out probe.json
  vidalign demo

`vidalign COMMAND [ACTION] --help` lists each option with its default; the
config-driven jobs also list every config key that --set takes."""

BENCHMARKS = ("favor", "motionbench", "msrvtt-qa", "msvd-qa", "seedbench-video", "videomme")
"""``vidalign eval --bench`` choices: ``vidalign.data.benchmarks.QA_BENCHMARKS``, named here so
that building the parser imports no data code (numpy)."""
PROBE_FEATURES = ("fv", "llm", "both")
"""``vidalign probe --features`` choices: ``vidalign.probe.FEATURES``, named here so that building
the parser imports no torch."""
ANSWERERS = ("first-option", "oracle")
"""Model-free answerers of ``vidalign eval``: ``vidalign.eval.BASELINES``, named here so that
building the parser imports no evaluation code (torch)."""


# --- the grammar's building blocks -------------------------------------------------------


def _teacher_address(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    """``--teacher ADDRESS`` (was ``--address``); required without a default, else ``local``."""
    where = "local (load the model in this process), " if default == "local" else ""
    add_option(parser, "--teacher", old=("--address",), metavar="ADDRESS", default=default,
               required=default is None,
               help=f"the teacher service: {where}host:port or dns:///name:port "
                    "(configs: teacher.address)")


def _teacher_credentials(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--token-file``: how to reach a secured teacher."""
    from vidalign.teacher.credential_args import add_client_credential_arguments

    add_client_credential_arguments(parser)


# --- commands ---------------------------------------------------------------------------


def _teacher_serve(args: argparse.Namespace) -> None:
    from vidalign_teacher.limit_args import limit_settings
    from vidalign_teacher.server import ServerConfig, TeacherServer, serve

    config = ServerConfig(
        model=args.teacher_model,
        host=args.host,
        port=args.port,
        adapters=args.adapter,
        weights=args.weights or "",
        latent_store=args.latent_store or "",
        device=args.device or ServerConfig.__dataclass_fields__["device"].default,
        dtype=args.dtype,
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        workers=args.workers,
        grace_s=args.grace_s,
        **limit_settings(args),  # checks every ranged flag first
        tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "",
        tls_client_ca=args.tls_client_ca or "",
        token_file=args.token_file or "",
        health_port=args.health_port,
    )
    if args.port_file:
        # Tests and the demo use --port 0; they learn the port from this file.
        server = TeacherServer(config)
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(str(server.port))
        tmp.replace(args.port_file)
        serve(config, server=server)
    else:
        serve(config)


def _teacher_info(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from vidalign.teacher.client import GrpcTeacher
    from vidalign.teacher.credential_args import client_credentials

    teacher = GrpcTeacher(args.teacher, timeout=args.timeout, wait_s=args.timeout,
                          credentials=client_credentials(args))
    try:
        print(json.dumps(asdict(teacher.info()), indent=2))
    finally:
        teacher.close()


def _teacher_gap(args: argparse.Namespace) -> None:
    from vidalign.data.toy import moving_squares
    from vidalign.gap import conditioning_gap
    from vidalign.teacher.client import connect
    from vidalign.teacher.credential_args import client_credentials

    teacher = connect(args.teacher, model=args.teacher_model,
                      credentials=None if args.teacher == "local" else client_credentials(args))
    try:
        clips = moving_squares(args.n, frames=args.frames, size=args.size, seed=args.seed)
        gaps = conditioning_gap(teacher, clips, timesteps=args.timesteps, seed=args.seed,
                                draws=args.draws)
    finally:
        teacher.close()
    print(f"conditioning gap of {args.teacher_model or args.teacher} on {args.n} clips "
          "(true vs opposite direction, same noise)")
    print(f"{'timestep':>8} {'true loss':>10} {'wrong loss':>11} {'gap':>8}")
    for gap in gaps:
        print(f"{gap.timestep:>8} {gap.true_loss:>10.5f} {gap.wrong_loss:>11.5f} {gap.relative:>+8.2%}")


def _train_stage1(args: argparse.Namespace) -> None:
    from vidalign_trainer.stage1 import run_stage1

    config = config_from_args(args.config_class, args)
    try:
        run_stage1(config, resume=args.resume)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # under torchrun: leave the process group
            dist.destroy_process_group()


def _train_stage2(args: argparse.Namespace) -> None:
    from vidalign_trainer.stage2 import run_stage2

    run_stage2(config_from_args(args.config_class, args), resume=args.resume)


def _train_stage3(args: argparse.Namespace) -> None:
    from vidalign_trainer.stage3 import run_stage3

    run_stage3(config_from_args(args.config_class, args), resume=args.resume)


def _train_sft(args: argparse.Namespace) -> None:
    from vidalign_trainer.sft import run_sft

    run_sft(config_from_args(args.config_class, args), resume=args.resume)


def _features_extract(args: argparse.Namespace) -> None:
    from vidalign_trainer.features import extract_features

    extract_features(config_from_args(args.config_class, args))


def _vda_run(args: argparse.Namespace) -> None:
    from vidalign_trainer.vda import run_vda, summary

    config = config_from_args(args.config_class, args)
    for step, status in run_vda(config).items():
        print(f"{step}: {status}")
    if config.eval is not None:
        print(summary(config))


PLAN_JOBS = {
    "stage1": "vidalign_trainer.stage1:Stage1Config",
    "stage2": "vidalign_trainer.stage2:Stage2Config",
    "stage3": "vidalign_trainer.stage3:Stage3Config",
    "sft": "vidalign_trainer.sft:SFTConfig",
    "features": "vidalign_trainer.features:FeaturesConfig",
    "priors": "vidalign_teacher.priors:ExtractConfig",
}
"""``vidalign plan --job``: the config class of each job (``vidalign.plan.JOBS``)."""


def _plan(args: argparse.Namespace) -> None:
    from vidalign.config import load_config, resolve_config_class
    from vidalign.plan import Inputs, detect_job, format_plan, plan

    job = args.job
    if job == "auto":
        import yaml

        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise InvalidInput(f"--config {args.config}: {err}") from None
        job = detect_job(data if isinstance(data, dict) else {})
    config = load_config(resolve_config_class(PLAN_JOBS[job]), args.config, args.set)
    inputs = Inputs(text_tokens=args.text_tokens)
    print(format_plan(plan(job, config, ranks=args.ranks, inputs=inputs)))


def _priors_extract(args: argparse.Namespace) -> None:
    from vidalign_teacher.priors import run_extract

    run_extract(args)


def _priors_show(args: argparse.Namespace) -> None:
    from vidalign_teacher.priors import run_show

    run_show(args)


def _adapter_init(args: argparse.Namespace) -> None:
    from vidalign.store import is_store_uri, split_uri
    from vidalign.students import load_student
    from vidalign.vda import Adapter, load_teacher

    if "://" in args.out and not is_store_uri(args.out):
        raise InvalidInput(
            f"--out {args.out}: unsupported scheme; give a file path, file:///abs/path or "
            "s3://bucket/key (what `teacher serve --adapter` loads)"
        )
    teacher = load_teacher(args.teacher_model)
    # The student gives d_v and F_V's tokens per frame under --pooling; with --feature-dim
    # and per-frame pooling (one token per frame by definition) it is not needed.
    encoder = None
    if not args.feature_dim or args.pooling != "frame":
        encoder = load_student(args.student, pooling=args.pooling)
    adapter = Adapter.create(
        d_v=args.feature_dim or encoder.d_v,
        cond_dim=teacher.cond_dim,
        projection=args.projection,
        lora_rank=args.lora_rank,
        teacher_family=teacher.family,
        seed=args.seed,
        teacher=teacher,
        conditioning=args.conditioning,
        frame_tokens=1 if encoder is None else encoder.tokens_per_frame,
        max_frames=args.max_frames,
    )
    if is_store_uri(args.out):
        # One object in the store, which `teacher serve --adapter URI` materializes.
        import tempfile

        parent, name = split_uri(args.out)
        with tempfile.TemporaryDirectory() as tmp:
            digest = adapter.save(Path(tmp) / name)
            parent.put_file(name, Path(tmp) / name)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        digest = adapter.save(args.out)
    print(digest)


def _models_list(args: argparse.Namespace) -> None:
    from vidalign.motionenhancer import COGVIDEOX_MODELS
    from vidalign.students import STUDENT_MODELS
    from vidalign.vda import TEACHER_MODELS

    print("teachers (--teacher-model NAME; configs: teacher.model):")
    for spec in TEACHER_MODELS.values():
        print(f"  {spec.name:24s} {spec.family:17s} {spec.description}")
    for spec in COGVIDEOX_MODELS.values():  # MotionEnhancer's: attention priors
        print(f"  {spec.name:24s} {'cogvideox':17s} {spec.description}")
    print("students (--student NAME; configs: student):")
    for spec in STUDENT_MODELS.values():
        print(f"  {spec.name:24s} {spec.family:17s} {spec.description}")


def _models_pull(args: argparse.Namespace) -> None:
    from vidalign.hub import pull

    for component, uri in pull(args.name, args.out, source_dir=args.source).items():
        print(f"{component}: {uri}")


def _data_synth(args: argparse.Namespace) -> None:
    from vidalign.data.synth import generate, write_dataset

    clips = generate(args.n, seed=args.seed, frames=args.frames, size=args.size)
    print(write_dataset(clips, args.out, fps=args.fps))


def _data_prepare(args: argparse.Namespace) -> None:
    import json

    from vidalign.data.prepare import prepare

    report = prepare(args.csv, args.n, args.out, rewriter=args.rewriter, seed=args.seed,
                     bins=args.bins, video_dir=args.video_dir)
    print(json.dumps({"subset": f"{args.out.rstrip('/')}/subset", "ks": report}, indent=2))


def _data_shard(args: argparse.Namespace) -> None:
    import json

    from vidalign.data.shardset import write_shards
    from vidalign.data.videoset import SOURCES

    sources = []
    for spec in args.source:
        kind, sep, location = spec.partition(":")
        if not sep or kind not in SOURCES or kind == "shards" or not location:
            raise InvalidInput(
                f"--source {spec!r}: expected KIND:LOCATION with KIND one of "
                f"{[k for k in SOURCES if k != 'shards']}"
            )
        sources.append((kind, location))
    meta = write_shards(sources, args.out, clips_per_shard=args.clips_per_shard,
                        video_dir=args.video_dir or "")
    print(json.dumps({"shards": args.out, "clips": meta["clips"], "files": meta["shards"],
                      "skipped": len(meta["skipped"])}, indent=2))


def _what_to_score(args: argparse.Namespace) -> None:
    """``vidalign eval`` scores exactly one thing, named explicitly: never a default answerer."""
    given = [flag for flag, value in (("--student", args.student),
                                      ("--predictions", args.predictions),
                                      ("--answerer", args.answerer)) if value]
    choices = (f"--student NAME (a VideoLLM), --predictions FILE (saved outputs) or --answerer "
               f"{{{','.join(ANSWERERS)}}} (a model-free baseline; oracle reads the answer key)")
    if not given:
        raise InvalidInput(f"eval: nothing to score; give one of {choices}")
    if len(given) > 1:
        raise InvalidInput(f"eval: {' and '.join(given)} both given; give only one of {choices}")
    for flag, value in (("--encoder", args.encoder), ("--lora", args.lora),
                        ("--likelihood", args.likelihood)):
        if value and not args.student:
            raise InvalidInput(f"eval: {flag} goes into a --student VideoLLM; give --student NAME")
    if args.substitute and args.predictions:
        raise InvalidInput("eval: --substitute asks the questions again with other videos; saved "
                           "--predictions cannot be asked again: give --student or --answerer")


def _eval(args: argparse.Namespace) -> None:
    _what_to_score(args)

    import json
    import tempfile

    from vidalign.data.benchmarks import load_benchmark
    from vidalign.eval import (
        BASELINES,
        ExactMatchJudge,
        LLMJudge,
        comparison_table,
        evaluate,
        markdown_table,
        read_outputs,
        result_dict,
        score_outputs,
        write_result,
    )
    from vidalign.store import commit_artifact, is_store_uri, open_store

    scorer = None
    bench = load_benchmark(args.bench, args.data, video_dir=args.video_dir)
    judge = LLMJudge.from_env() if args.judge == "llm" else ExactMatchJudge()
    name = args.name or args.bench
    remote = bool(args.out) and is_store_uri(args.out)
    local_out = Path(tempfile.mkdtemp(prefix="vidalign-eval-")) if remote else args.out
    judge_dir = args.judge_dir or (Path(local_out) / f"{name}.judged" if local_out else None)
    if args.predictions:
        result = score_outputs(bench.items, read_outputs(args.predictions), judge=judge,
                               judge_dir=judge_dir, progress=True)
        run = Path(args.predictions).stem
    else:
        if args.student:
            from vidalign.students.answerer import load_trained_videollm, videollm_answerer

            llm = load_trained_videollm(args.student, encoder=args.encoder or "",
                                        lora=args.lora or "", device=args.device)
            answerer = videollm_answerer(llm, max_new_tokens=args.max_new_tokens)
            if args.likelihood:
                from vidalign.eval.likelihood import videollm_option_scorer

                scorer = videollm_option_scorer(llm, normalize=args.likelihood_norm)
            run = args.student
        else:
            answerer, run = BASELINES[args.answerer], args.answerer
        result = evaluate(bench.items, answerer, batch_size=args.batch_size,
                          frames=args.frames, fps=args.fps, skip_missing=args.skip_missing,
                          judge=judge, judge_dir=judge_dir, option_scorer=scorer,
                          substitute=args.substitute, substitute_seed=args.substitute_seed)
    if local_out:
        write_result(result, local_out, name=name, model=run)
    if remote:
        files = {p.name: p for p in Path(local_out).iterdir() if p.is_file()}
        commit_artifact(open_store(args.out), name, files, producer="vidalign eval",
                        meta={"bench": args.bench, "model": run})
    print(markdown_table({run: result.score}), end="")
    if result.likelihood is not None or result.substitution is not None:
        print(comparison_table(result), end="")
    print(json.dumps(result_dict(result, model=run)))


def _probe(args: argparse.Namespace) -> None:
    import json

    from vidalign.probe import probe_student
    from vidalign.store import open_store, split_uri

    train, held_out = args.clips
    report = probe_student(
        args.student, weights=args.weights, encoder=args.encoder, features=args.features,
        train_clips=train, held_out_clips=held_out, seed=args.seed, grid=args.grid,
        pool=args.pool, frames=args.frames, size=args.size, batch_size=args.batch_size,
        device=args.device,
    )
    print(report.table(), end="")
    if args.out:
        # A .json path (local or store URI) is the file; anything else a directory for probe.json.
        store, key = (split_uri(args.out) if args.out.endswith(".json")
                      else (open_store(args.out), "probe.json"))
        store.put_bytes(key, json.dumps(report.to_dict(), indent=2).encode())
        print(f"wrote {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_cli.demo import DemoConfig, run_demo, seeds_summary

    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        config = load_config(DemoConfig, None, [*args.set, f"seed={seed}", f"assets={args.assets}"])
        out = Path(args.out) if len(seeds) == 1 else Path(args.out) / f"seed-{seed}"
        runs.append(run_demo(out, config))
    if len(seeds) > 1:
        summary = seeds_summary(runs, seeds)
        (Path(args.out) / "summary.md").write_text(summary)
        print(f"\n{summary}")


# --- the parser ---------------------------------------------------------------------------


def _group(sub, name: str, help: str, dest: str = "action"):
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    return parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())


def _command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _add_teacher(sub) -> None:
    teacher = _group(sub, "teacher", "the diffusion teacher service")

    serve = _command(teacher, "serve", "serve a diffusion model over gRPC", _teacher_serve)
    add_option(serve, "--teacher-model", old=("--model",), required=True, metavar="NAME",
            help="model to serve: registry name (vidalign models list) or local dir")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind; 0.0.0.0 or [::] for every interface")
    serve.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one")
    serve.add_argument("--port-file", metavar="FILE",
                       help="write the bound port to FILE once listening")
    serve.add_argument("--adapter", action="append", default=[], metavar="URI",
                       help="adapter file or store URI to load (repeatable)")
    serve.add_argument("--weights", metavar="URI",
                       help="store URI (or dir) where `vidalign models pull` staged the weights "
                            "(default: the registry's sources)")
    serve.add_argument("--latent-store", metavar="URI",
                       help="store URI caching VAE latents across replicas")
    serve.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    serve.add_argument("--dtype", default="fp32",
                       choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                       help="weights' dtype, the trainers' train.precision names (the loss is "
                            "reduced in float32)")
    serve.add_argument("--grace-s", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM: health NOT_SERVING and new calls refused at once, calls "
                            "in flight may finish for this long, then the process exits")
    serve.add_argument("--max-message-mb", type=float, default=16, help="per-message limit (MiB)")
    serve.add_argument("--max-request-mb", type=float, default=1024, help="per-request limit (MiB)")
    serve.add_argument("--workers", type=int, default=8,
                       help="gRPC threads for health, GetInfo and refusals, beyond the model calls'")
    from vidalign_teacher.limit_args import add_limit_arguments

    add_limit_arguments(serve)
    from vidalign.teacher.credential_args import add_server_security_arguments

    add_server_security_arguments(serve)

    info = _command(teacher, "info", "describe a running teacher", _teacher_info)
    _teacher_address(info, default=None)
    _teacher_credentials(info)
    info.add_argument("--timeout", type=float, default=30.0,
                      help="deadline of the call, and how long to wait for an unavailable teacher (s)")

    gap = _command(
        teacher, "gap", "the teacher's loss with the true vs a wrong motion description "
        "(check first)", _teacher_gap,
    )
    _teacher_address(gap, default="local")
    _teacher_credentials(gap)
    add_option(gap, "--teacher-model", old=("--model",), metavar="NAME", default="tiny-animatediff",
            help="diffusion model: loaded here for local, checked against the service otherwise")
    gap.add_argument("--n", type=int, default=16, help="toy clips")
    gap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900],
                     help="diffusion timesteps to compare at")
    gap.add_argument("--draws", type=int, default=4, help="noise draws per clip and timestep")
    gap.add_argument("--frames", type=int, default=16, help="frames per clip")
    gap.add_argument("--size", type=int, default=32, help="frame side in pixels")
    gap.add_argument("--seed", type=int, default=0, help="clips and noise")


def _add_jobs(sub) -> None:
    train = _group(sub, "train", "training stages", dest="stage")
    for name, cls, example, help, func in (
        ("stage1", "vidalign_trainer.stage1:Stage1Config", "configs/stage1-tiny.yaml",
         "VDA stage 1: train W_proj + UNet LoRA (encoder frozen)", _train_stage1),
        ("stage2", "vidalign_trainer.stage2:Stage2Config", "configs/stage2-tiny.yaml",
         "VDA stage 2: train the video encoder via the teacher", _train_stage2),
        ("stage3", "vidalign_trainer.stage3:Stage3Config", "configs/stage3-tiny.yaml",
         "VDA stage 3: LoRA on the student's LLM, encoder frozen", _train_stage3),
        ("sft", "vidalign_trainer.sft:SFTConfig", "configs/sft-tiny.yaml",
         "MotionEnhancer SFT: CE + lambda * L_align, whole VLM trainable", _train_sft),
    ):
        add_config_arguments(
            _command(train, name, help, func), cls, resume=True,
            example=f"vidalign train {name} --config {example} --set train.steps=10",
        )

    vda = _group(sub, "vda", "the whole VDA recipe")
    add_config_arguments(
        _command(vda, "run", "features -> stage 1 -> stage 2 -> stage 3 -> eval, skipping "
                 "committed steps", _vda_run),
        "vidalign_trainer.vda:VDAConfig", config_required=True,
        example="vidalign vda run --config configs/vda/tiny-videollava.yaml --set store=runs/vda",
    )

    features = _group(sub, "features", "encoder features F_V for stage 1")
    add_config_arguments(
        _command(features, "extract", "frozen encoder over a dataset -> sharded F_V in the store "
                 "(resumable)", _features_extract),
        "vidalign_trainer.features:FeaturesConfig",
        example="vidalign features extract --config configs/features-tiny.yaml "
                "--set batch_size=4",
    )


def _add_plan(sub) -> None:
    from vidalign.plan import DEFAULT_TEXT_TOKENS

    plan = _command(sub, "plan", "parameters and per-GPU memory (weights, gradients, optimizer "
                    "state, activations) of a job's config", _plan)
    plan.add_argument("--config", required=True, metavar="YAML",
                      help="the job's config (a train, features extract or priors config)")
    plan.add_argument("--ranks", type=int, default=1,
                      help="data-parallel ranks (GPUs) the job runs on")
    plan.add_argument("--job", default="auto", choices=["auto", *PLAN_JOBS],
                      help="the config's job; auto: told from its keys")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one config key, dotted, VALUE in YAML; repeatable "
                           "(default: none)")
    plan.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                      help="text tokens per training example (template, prompt, reply) beside "
                           "the video tokens")


def _add_models(sub) -> None:
    adapter = _group(sub, "adapter", "conditioning adapters (W_proj + LoRA)")
    init = _command(adapter, "init", "write a freshly initialised adapter", _adapter_init)
    init.add_argument("--teacher-model", required=True, metavar="NAME",
                      help="the diffusion model it conditions (vidalign models list)")
    init.add_argument("--student", default="tiny-videollava", metavar="NAME",
                      help="VideoLLM whose encoder width d_v the adapter takes")
    init.add_argument("--feature-dim", type=int, default=0,
                      help="d_v, overriding --student's; 0: --student's")
    init.add_argument("--projection", default="linear", choices=["linear", "mlp"],
                      help="W_proj: linear (paper) or mlp (appendix B)")
    init.add_argument("--lora-rank", type=int, default=0, help="UNet LoRA rank; 0: none")
    init.add_argument("--conditioning", default="frame",
                      choices=["frame", "frame_pos", "context", "spatial"],
                      help="how W_proj(F_V) reaches the teacher's frames: frame (each frame the "
                           "tokens of the student frame at its time), frame_pos (all tokens plus "
                           "a learned frame-position embedding), context (all tokens, unordered), "
                           "spatial (each frame's tokens, on their grid, added to the UNet's first "
                           "feature map)")
    init.add_argument("--pooling", default="frame", metavar="POOLING",
                      help="F_V's pooling, as `features extract` used: frame or grid:G; sets the "
                           "adapter's tokens per frame")
    init.add_argument("--max-frames", type=int, default=64,
                      help="student frames the frame_pos embedding covers")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--out", required=True, metavar="URI",
                      help="the adapter file to write: a path, file:///abs/path or s3://bucket/key")

    models = _group(sub, "models", "model registry")
    _command(models, "list", "list teacher and student models", _models_list)
    pull = _command(models, "pull", "stage a model's weights into the store", _models_pull)
    pull.add_argument("name", help="registry name (vidalign models list)")
    add_option(pull, "--out", old=("--to",), required=True, metavar="URI",
            help="store URI to stage into, e.g. s3://vidalign/models/NAME")
    pull.add_argument("--from", dest="source", metavar="DIR",
                      help="local dir with one subdir per component "
                           "(default: none: download from the hub)")


def _add_data(sub) -> None:
    data = _group(sub, "data", "datasets")
    synth = _command(data, "synth", "write a SynthMotion dataset (MotionBench layout)", _data_synth)
    synth.add_argument("--n", type=int, required=True, help="number of clips")
    synth.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    synth.add_argument("--seed", type=int, default=0, help="the clips' seed")
    synth.add_argument("--frames", type=int, default=16, help="frames per clip")
    synth.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    synth.add_argument("--fps", type=int, default=8, help="mp4 frame rate")

    prep = _command(
        data, "prepare", "VDA training subset: stratified sample of an OpenVid-style CSV + static "
        "captions", _data_prepare,
    )
    prep.add_argument("--csv", required=True, help="OpenVid-1M-style CSV")
    prep.add_argument("--n", type=int, required=True, help="clips in the subset (VDA: 10000)")
    prep.add_argument("--out", required=True, metavar="URI",
                      help="store URI; the subset is committed as OUT/subset")
    prep.add_argument("--rewriter", default="rule", choices=["rule", "llm"],
                      help="static captions: offline rules, or VDA's prompt on the endpoint in "
                           "VIDALIGN_REWRITER_{BASE_URL,MODEL,API_KEY}")
    prep.add_argument("--seed", type=int, default=0, help="sampling seed")
    prep.add_argument("--bins", type=int, default=4, help="quantile bins per stratification column")
    prep.add_argument("--video-dir", help="where the videos are, a directory or store URI "
                                           "(default: beside the CSV)")

    shard = _command(
        data, "shard", "pack clips (encoded bytes) and their records into WebDataset tar shards on "
        "a store, for every trainer's data.kind: shards (resumable)", _data_shard,
    )
    shard.add_argument("--source", action="append", required=True, metavar="KIND:LOCATION",
                       help="records:URI (a `data prepare` subset or records JSONL), "
                            "motionbench:DIR, motionvid:FILE or synth:DIR; repeat to join sets")
    shard.add_argument("--out", required=True, metavar="URI", help="directory or store URI of the set")
    shard.add_argument("--clips-per-shard", type=int, default=256,
                       help="clips per tar shard")
    shard.add_argument("--video-dir", help="where the sources' relative video paths resolve "
                                           "(default: beside each annotation file)")


def _add_priors(sub) -> None:
    from vidalign_teacher.priors_args import add_extract_arguments, add_show_arguments

    priors = _group(sub, "priors", "MotionEnhancer attention priors (CogVideoX teacher)")
    add_extract_arguments(_command(
        priors, "extract", "priors of a dataset's clips -> store (sharded, resumable)",
        _priors_extract,
    ))
    add_show_arguments(_command(
        priors, "show", "PNG overlays of selected tokens + head-score chart", _priors_show,
    ))


def _add_eval(sub) -> None:
    ev = _command(sub, "eval", "score a benchmark: a VideoLLM, its saved outputs or a baseline",
                  _eval)
    ev.description = (
        "Score a benchmark. Say what to score, exactly one of:\n"
        "  --student NAME       a VideoLLM (with --encoder and --lora: after VDA)\n"
        "  --predictions FILE   saved outputs\n"
        "  --answerer NAME      a model-free baseline (oracle reads the answer key: 100%)"
    )
    ev.add_argument("--bench", required=True, choices=BENCHMARKS, help="the benchmark")
    ev.add_argument("--data", required=True, help="the benchmark's annotation file or directory")
    ev.add_argument("--video-dir", help="where the videos are (default: beside the annotations)")
    add_option(ev, "--student", old=("--model",), metavar="NAME",
            help="VideoLLM to evaluate (vidalign models list)")
    ev.add_argument("--predictions", metavar="FILE",
                    help="JSONL of {uid, output} or {id, pred} to score")
    ev.add_argument("--answerer", choices=ANSWERERS,
                    help="model-free baseline to score")
    ev.add_argument("--encoder", metavar="URI",
                    help="stage-2 encoder artifact to put into --student")
    ev.add_argument("--lora", metavar="URI",
                    help="stage-3 LoRA artifact (peft format) to apply to --student")
    ev.add_argument("--device", default="cpu", help="device of --student")
    ev.add_argument("--max-new-tokens", type=int, default=16, help="--student's answer length")
    ev.add_argument("--judge", default="exact", choices=["exact", "llm"],
                    help="open-ended judge; llm reads VIDALIGN_JUDGE_{BASE_URL,MODEL,API_KEY}")
    ev.add_argument("--judge-dir", metavar="DIR",
                    help="one result file per judged item, to restart from "
                         "(default: OUT/NAME.judged with --out, else none)")
    ev.add_argument("--frames", type=int, default=16, help="uniform frames per video")
    ev.add_argument("--fps", type=float,
                    help="sample at this rate instead of --frames (default: none: use --frames)")
    ev.add_argument("--batch-size", type=int, default=8, help="videos per answerer call")
    ev.add_argument("--skip-missing", action="store_true",
                    help="score missing videos as unanswered instead of failing")
    ev.add_argument("--likelihood", action="store_true",
                    help="also score --student by option likelihood (argmax of each option's "
                         "log-probability as the answer), beside the letter rule")
    ev.add_argument("--likelihood-norm", default="mean", choices=["mean", "sum"],
                    help="with --likelihood: the per-token mean of the option's log-probabilities "
                         "(options differ in length) or their sum")
    ev.add_argument("--substitute", action="store_true",
                    help="ask every question again with another clip's video (a seeded "
                         "derangement): accuracy and same-choice rate show whether answers "
                         "depend on the video (doubles the cost)")
    ev.add_argument("--substitute-seed", type=int, default=0, help="the derangement's seed")
    ev.add_argument("--out", metavar="URI",
                    help="directory or store URI for NAME.json, NAME.md, predictions "
                         "(default: none: print only)")
    ev.add_argument("--name", help="result file name (default: the benchmark)")


def _add_probe(sub) -> None:
    probe = _command(sub, "probe", "linear probes: how much object position and motion a "
                     "student's features carry (SynthMotion ground truth)", _probe)
    probe.description = (
        "Ridge probes from a student's video features to SynthMotion ground truth, scored on\n"
        "held-out clips, beside chance and a Gaussian-noise control: each object's grid cell per\n"
        "frame (position) and its direction between consecutive frames (still/left/right/up/\n"
        "down). Sources: F_V as the VDA teacher sees it (frame-mean and grid-pooled) and the\n"
        "projected video tokens the LLM reads."
    )
    probe.add_argument("--student", default="tiny-videollava", metavar="NAME",
                       help="VideoLLM (vidalign models list); a tiny preset without --weights "
                            "is its random init")
    probe.add_argument("--weights", metavar="URI",
                       help="the student's checkpoint: a VideoLLM directory or store URI (e.g. "
                            "assets/demo/videollm/model), or a root holding it as model/ "
                            "(default: none: the registry's weights)")
    probe.add_argument("--encoder", metavar="URI",
                       help="stage-2 encoder to put into the student: its artifact (store URI, "
                            "directory or encoder.safetensors) or the stage-2 output.dir "
                            "(default: none: the student's own)")
    probe.add_argument("--features", default="both", choices=PROBE_FEATURES,
                       help="fv: F_V only (reads only the video tower); llm: the LLM's video "
                            "tokens; both")
    probe.add_argument("--clips", type=int, nargs=2, default=[256, 128],
                       metavar=("TRAIN", "HELD_OUT"),
                       help="SynthMotion clips that fit the probes, then clips that score them")
    probe.add_argument("--seed", type=int, default=0,
                       help="SynthMotion seed, validation split and noise control")
    probe.add_argument("--grid", type=int, default=4,
                       help="position cells: a GRID x GRID partition of the frame")
    probe.add_argument("--pool", type=int, default=4,
                       help="patch tokens average-pooled to POOL x POOL per frame (F_V grid:POOL "
                            "and the LLM tokens); at most the student's patch grid")
    probe.add_argument("--frames", type=int, default=16, help="frames per clip (the demo's)")
    probe.add_argument("--size", type=int, default=64, help="frame side in pixels (the demo's)")
    probe.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    probe.add_argument("--device", default="cpu", help="device of the student")
    probe.add_argument("--out", metavar="URI",
                       help="where the JSON goes: a .json path or store URI, else a directory "
                            "or store URI for probe.json (default: none: print only)")


def _add_demo(sub) -> None:
    demo = _command(
        sub, "demo", "baseline vs +VDA vs +MotionEnhancer (and controls) on SynthMotion, "
        "tiny models", _demo,
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="where results go")
    demo.add_argument("--seed", type=int, default=0, help="post-training data and training seed")
    demo.add_argument("--seeds", type=int, nargs="+",
                      help="run once per seed (OUT/seed-S) and summarise (default: --seed only)")
    demo.add_argument("--assets", default="assets/demo", help="what `make demo-assets` made")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set stage2_steps=30; repeatable")
    describe_config(demo, "vidalign_cli.demo:DemoConfig",
                    example="vidalign demo --seeds 0 1 2 --set stage2_steps=30")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidalign",
        description="Post-train VideoLLMs for fine-grained motion with a video diffusion teacher.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vidalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_teacher(sub)
    _add_jobs(sub)
    _add_plan(sub)
    _add_models(sub)
    _add_data(sub)
    _add_priors(sub)
    _add_eval(sub)
    _add_probe(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vidalign.log import configure_logging

    configure_logging()
    try:
        args.func(args)
    except (VidalignError, ConfigError) as err:
        print(f"vidalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
