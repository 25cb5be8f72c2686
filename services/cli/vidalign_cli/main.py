"""The ``vidalign`` command line.

    vidalign teacher serve --model tiny-animatediff --port 50051 --adapter A.safetensors
    vidalign teacher info --address 127.0.0.1:50051
    vidalign features extract --config configs/features-tiny.yaml
    vidalign train stage1 --config configs/stage1-tiny.yaml [--resume]
    vidalign train stage2 --config configs/stage2-tiny.yaml [--set train.steps=10] [--resume]
    vidalign train stage3 --config configs/stage3-tiny.yaml [--resume]
    vidalign train sft --config configs/sft-tiny.yaml [--resume]
    vidalign vda run --config configs/vda/tiny-videollava.yaml
    vidalign adapter init --teacher-model tiny-animatediff --student tiny-videollava --out A.safetensors
    vidalign models list
    vidalign models pull animatediff-v1-5-2 --to s3://vidalign/models/animatediff-v1-5-2
    vidalign priors extract --data data/synth --out s3://vidalign/priors/synth [--teacher HOST:PORT]
    vidalign priors show --priors s3://vidalign/priors/synth --clip synth-0-00000 --out png/
    vidalign demo

Errors that a user can fix (bad config, unknown model, unreachable teacher)
print one line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vidalign.config import ConfigError
from vidalign.errors import VidalignError
from vidalign.log import configure_logging, get_logger

log = get_logger("vidalign.cli")


def _teacher_serve(args: argparse.Namespace) -> None:
    from vidalign_teacher.server import ServerConfig, TeacherServer, serve

    config = ServerConfig(
        model=args.model,
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

    from vidalign.client import GrpcTeacher

    teacher = GrpcTeacher(args.address, timeout=args.timeout)
    try:
        print(json.dumps(asdict(teacher.info()), indent=2))
    finally:
        teacher.close()


def _teacher_gap(args: argparse.Namespace) -> None:
    from vidalign.client import connect
    from vidalign.data.toy import moving_squares
    from vidalign.gap import conditioning_gap

    teacher = connect(args.address, model=args.model)
    try:
        clips = moving_squares(args.n, frames=args.frames, size=args.size, seed=args.seed)
        gaps = conditioning_gap(teacher, clips, timesteps=args.timesteps, seed=args.seed,
                                draws=args.draws)
    finally:
        teacher.close()
    print(f"conditioning gap of {args.model or args.address} on {args.n} clips "
          "(true vs opposite direction, same noise)")
    print(f"{'timestep':>8} {'true loss':>10} {'wrong loss':>11} {'gap':>8}")
    for gap in gaps:
        print(f"{gap.timestep:>8} {gap.true_loss:>10.5f} {gap.wrong_loss:>11.5f} {gap.relative:>+8.2%}")


def _train_stage2(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_trainer.stage2 import Stage2Config, run_stage2

    config = load_config(Stage2Config, args.config, args.set)
    run_stage2(config, resume=args.resume)


def _train_stage1(args: argparse.Namespace) -> None:
    from vidalign_trainer.stage1 import run_from_args

    run_from_args(args)  # load_config + run_stage1; leaves the process group under torchrun


def _features_extract(args: argparse.Namespace) -> None:
    from vidalign_trainer.features import run_from_args

    run_from_args(args)


def _train_stage3(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_trainer.stage3 import Stage3Config, run_stage3

    config = load_config(Stage3Config, args.config, args.set)
    run_stage3(config, resume=args.resume)


def _train_sft(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_trainer.sft import SFTConfig, run_sft

    config = load_config(SFTConfig, args.config, args.set)
    run_sft(config, resume=args.resume)


def _vda_run(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_trainer.vda import VDAConfig, run_vda, summary

    config = load_config(VDAConfig, args.config, args.set)
    for step, status in run_vda(config).items():
        print(f"{step}: {status}")
    if config.eval is not None:
        print(summary(config))


def _priors_extract(args: argparse.Namespace) -> None:
    from vidalign_teacher.priors import run_extract

    run_extract(args)


def _priors_show(args: argparse.Namespace) -> None:
    from vidalign_teacher.priors import run_show

    run_show(args)


def _adapter_init(args: argparse.Namespace) -> None:
    from vidalign.diffusion import Adapter, load_teacher
    from vidalign.students import load_student

    teacher = load_teacher(args.teacher_model)
    d_v = args.feature_dim or load_student(args.student).d_v
    adapter = Adapter.create(
        d_v=d_v,
        cond_dim=teacher.cond_dim,
        projection=args.projection,
        lora_rank=args.lora_rank,
        teacher_family=teacher.family,
        seed=args.seed,
        teacher=teacher,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    digest = adapter.save(args.out)
    print(digest)


def _models_list(args: argparse.Namespace) -> None:
    from vidalign.diffusion import TEACHER_MODELS
    from vidalign.students import STUDENT_MODELS

    print("teachers (vidalign teacher serve --model NAME):")
    for spec in TEACHER_MODELS.values():
        print(f"  {spec.name:24s} {spec.family:12s} {spec.description}")
    print("students (stage2 config: student: NAME):")
    for spec in STUDENT_MODELS.values():
        print(f"  {spec.name:24s} {spec.family:12s} {spec.description}")


def _models_pull(args: argparse.Namespace) -> None:
    from vidalign.hub import pull

    for component, uri in pull(args.name, args.to, source_dir=args.source).items():
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


def _eval(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from vidalign.data.benchmarks import load_benchmark
    from vidalign.eval import (
        BASELINES,
        ExactMatchJudge,
        LLMJudge,
        evaluate,
        markdown_table,
        read_outputs,
        result_dict,
        score_outputs,
        write_result,
    )
    from vidalign.store import commit_artifact, is_store_uri, open_store

    bench = load_benchmark(args.bench, args.data, video_dir=args.video_dir)
    judge = LLMJudge.from_env() if args.judge == "llm" else ExactMatchJudge()
    name = args.name or args.bench
    remote = bool(args.out) and is_store_uri(args.out)
    local_out = Path(tempfile.mkdtemp(prefix="vidalign-eval-")) if remote else args.out
    judge_dir = args.judge_dir or (Path(local_out) / f"{name}.judged" if local_out else None)
    if args.predictions:
        result = score_outputs(bench.items, read_outputs(args.predictions), judge=judge,
                               judge_dir=judge_dir, progress=True)
    else:
        answerer = BASELINES[args.answerer]
        if args.model:
            from vidalign.students.answerer import load_trained_videollm, videollm_answerer

            llm = load_trained_videollm(args.model, encoder=args.encoder or "", lora=args.lora or "",
                                        device=args.device)
            answerer = videollm_answerer(llm, max_new_tokens=args.max_new_tokens)
        result = evaluate(bench.items, answerer, batch_size=args.batch_size,
                          frames=args.frames, fps=args.fps, skip_missing=args.skip_missing,
                          judge=judge, judge_dir=judge_dir)
    run = args.model or args.answerer
    if local_out:
        write_result(result, local_out, name=name, model=run)
    if remote:
        files = {p.name: p for p in Path(local_out).iterdir() if p.is_file()}
        commit_artifact(open_store(args.out), name, files, producer="vidalign eval",
                        meta={"bench": args.bench, "model": run})
    print(markdown_table({run: result.score}), end="")
    print(json.dumps(result_dict(result, model=run)))


def _demo(args: argparse.Namespace) -> None:
    from vidalign.config import load_config
    from vidalign_cli.demo import DemoConfig, main_summary, run_demo

    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        config = load_config(DemoConfig, None, [*args.set, f"seed={seed}", f"assets={args.assets}"])
        out = Path(args.out) if len(seeds) == 1 else Path(args.out) / f"seed-{seed}"
        runs.append(run_demo(out, config))
    if len(seeds) > 1:
        table = "".join(
            f"\n{title}:\n\n{main_summary(runs, metric)}"
            for metric, title in (("letter", "by letter (MotionBench's rule)"),
                                  ("named", "by the option text named"))
        )
        (Path(args.out) / "summary.md").write_text(f"over seeds {seeds}\n{table}")
        print(f"\nover seeds {seeds}:\n{table}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidalign",
        description="Post-train VideoLLMs for fine-grained motion with a video diffusion teacher.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = sub.add_parser("teacher", help="the diffusion teacher service").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    serve = teacher.add_parser("serve", help="serve a diffusion model over gRPC")
    serve.add_argument("--model", required=True, help="registry name (vidalign models list) or local dir")
    serve.add_argument("--host", default="[::]", help="address to bind (default: all interfaces)")
    serve.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one")
    serve.add_argument("--port-file", help="write the bound port to this file once listening")
    serve.add_argument(
        "--adapter", action="append", default=[],
        help="adapter file or store URI to load (repeatable)",
    )
    serve.add_argument(
        "--weights", help="store URI (or dir) where `vidalign models pull` staged the weights"
    )
    serve.add_argument("--latent-store", help="store URI caching VAE latents across replicas")
    serve.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    serve.add_argument("--max-message-mb", type=float, default=16, help="per-message limit (MiB)")
    serve.add_argument("--max-request-mb", type=float, default=1024, help="per-request limit (MiB)")
    serve.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    serve.set_defaults(func=_teacher_serve)

    info = teacher.add_parser("info", help="describe a running teacher")
    info.add_argument("--address", required=True, help="host:port or dns:///name:port")
    info.add_argument("--timeout", type=float, default=30.0)
    info.set_defaults(func=_teacher_info)

    gap = teacher.add_parser(
        "gap", help="the teacher's loss with the true vs a wrong motion description (check first)"
    )
    gap.add_argument("--address", default="local", help="local, host:port or dns:///name:port")
    gap.add_argument("--model", default="tiny-animatediff", help="the model (loaded here for local)")
    gap.add_argument("--n", type=int, default=16, help="toy clips")
    gap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    gap.add_argument("--draws", type=int, default=4, help="noise draws per clip and timestep")
    gap.add_argument("--frames", type=int, default=16)
    gap.add_argument("--size", type=int, default=32)
    gap.add_argument("--seed", type=int, default=0)
    gap.set_defaults(func=_teacher_gap)

    train = sub.add_parser("train", help="training stages").add_subparsers(
        dest="stage", required=True, metavar="STAGE"
    )
    stage1 = train.add_parser("stage1", help="VDA stage 1: train W_proj + UNet LoRA (encoder frozen)")
    stage1.add_argument("--config", help="YAML config (see configs/stage1-tiny.yaml)")
    stage1.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    stage1.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    stage1.set_defaults(func=_train_stage1)

    stage2 = train.add_parser("stage2", help="VDA stage 2: train the video encoder via the teacher")
    stage2.add_argument("--config", help="YAML config (see configs/)")
    stage2.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    stage2.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    stage2.set_defaults(func=_train_stage2)

    stage3 = train.add_parser("stage3", help="VDA stage 3: LoRA on the student's LLM, encoder frozen")
    stage3.add_argument("--config", help="YAML config (see configs/)")
    stage3.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    stage3.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    stage3.set_defaults(func=_train_stage3)

    sft = train.add_parser("sft", help="MotionEnhancer SFT: CE + lambda * L_align, whole VLM trainable")
    sft.add_argument("--config", help="YAML config (see configs/sft-tiny.yaml)")
    sft.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    sft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    sft.set_defaults(func=_train_sft)

    vda = sub.add_parser("vda", help="the whole VDA recipe").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    vda_run = vda.add_parser(
        "run", help="features -> stage 1 -> stage 2 -> stage 3 -> eval, skipping committed steps"
    )
    vda_run.add_argument("--config", required=True, help="YAML config (see configs/vda/)")
    vda_run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    vda_run.set_defaults(func=_vda_run)

    features = sub.add_parser("features", help="encoder features F_V for stage 1").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    extract = features.add_parser(
        "extract", help="frozen encoder over a dataset -> sharded F_V in the store (resumable)"
    )
    extract.add_argument("--config", help="YAML config (see configs/features-tiny.yaml)")
    extract.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    extract.set_defaults(func=_features_extract)

    adapter = sub.add_parser("adapter", help="conditioning adapters (W_proj + LoRA)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    init = adapter.add_parser("init", help="write a freshly initialised adapter")
    init.add_argument("--teacher-model", required=True)
    init.add_argument("--student", default="tiny-videollava", help="student whose d_v to use")
    init.add_argument("--feature-dim", type=int, default=0, help="d_v (overrides --student)")
    init.add_argument("--projection", default="linear", choices=["linear", "mlp"])
    init.add_argument("--lora-rank", type=int, default=0)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True)
    init.set_defaults(func=_adapter_init)

    models = sub.add_parser("models", help="model registry").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    models.add_parser("list", help="list teacher and student models").set_defaults(func=_models_list)
    pull = models.add_parser("pull", help="stage a model's weights into the store")
    pull.add_argument("name", help="registry name (vidalign models list)")
    pull.add_argument("--to", required=True, help="store URI, e.g. s3://vidalign/models/NAME")
    pull.add_argument(
        "--from", dest="source", help="local dir with one subdir per component, instead of the hub"
    )
    pull.set_defaults(func=_models_pull)

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    synth = data.add_parser("synth", help="write a SynthMotion dataset (MotionBench layout)")
    synth.add_argument("--n", type=int, required=True, help="number of clips")
    synth.add_argument("--out", required=True, help="directory to write")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--frames", type=int, default=16)
    synth.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    synth.add_argument("--fps", type=int, default=8, help="mp4 frame rate")
    synth.set_defaults(func=_data_synth)

    prep = data.add_parser(
        "prepare", help="VDA training subset: stratified sample of an OpenVid-style CSV + static captions"
    )
    prep.add_argument("--csv", required=True, help="OpenVid-1M-style CSV")
    prep.add_argument("--n", type=int, required=True, help="clips in the subset (VDA: 10000)")
    prep.add_argument("--out", required=True, help="store URI; the subset is committed as OUT/subset")
    prep.add_argument("--rewriter", default="rule", choices=["rule", "llm"],
                      help="static captions: offline rules, or VDA's prompt on the endpoint in "
                           "VIDALIGN_REWRITER_{BASE_URL,MODEL,API_KEY}")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--bins", type=int, default=4, help="quantile bins per stratification column")
    prep.add_argument("--video-dir", help="where the videos are (default: beside the CSV)")
    prep.set_defaults(func=_data_prepare)

    from vidalign_teacher.priors_args import add_extract_arguments, add_show_arguments

    priors = sub.add_parser(
        "priors", help="MotionEnhancer attention priors (CogVideoX teacher)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    priors_extract = priors.add_parser(
        "extract", help="priors of a dataset's clips -> store (sharded, resumable)"
    )
    add_extract_arguments(priors_extract)
    priors_extract.set_defaults(func=_priors_extract)
    priors_show = priors.add_parser("show", help="PNG overlays of selected tokens + head-score chart")
    add_show_arguments(priors_show)
    priors_show.set_defaults(func=_priors_show)

    from vidalign.data.benchmarks import QA_BENCHMARKS
    from vidalign.eval import BASELINES

    ev = sub.add_parser("eval", help="score a benchmark: saved model outputs or a baseline")
    ev.add_argument("--bench", required=True, choices=sorted(QA_BENCHMARKS))
    ev.add_argument("--data", required=True, help="the benchmark's annotation file or directory")
    ev.add_argument("--video-dir", help="where the videos are (default: beside the annotations)")
    ev.add_argument("--predictions", help="JSONL of {uid, output} or {id, pred} to score")
    ev.add_argument("--answerer", default="oracle", choices=sorted(BASELINES),
                    help="model-free answerer when no --predictions (oracle must score 100%%)")
    ev.add_argument("--model", help="student VideoLLM to evaluate (vidalign models list); "
                    "without it, --answerer scores a model-free baseline")
    ev.add_argument("--encoder", help="stage-2 encoder artifact URI to put into --model")
    ev.add_argument("--lora", help="stage-3 LoRA artifact URI (peft format) to apply to --model")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--judge", default="exact", choices=["exact", "llm"],
                    help="open-ended judge; llm reads VIDALIGN_JUDGE_{BASE_URL,MODEL,API_KEY}")
    ev.add_argument("--judge-dir", help="one result file per judged item (restartable)")
    ev.add_argument("--frames", type=int, default=16, help="uniform frames per video")
    ev.add_argument("--fps", type=float, help="sample at this rate instead of --frames")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--skip-missing", action="store_true", help="score missing videos as unanswered")
    ev.add_argument("--out", help="directory or store URI for NAME.json, NAME.md, predictions")
    ev.add_argument("--name", help="result file name (default: the benchmark)")
    ev.set_defaults(func=_eval)

    demo = sub.add_parser(
        "demo", help="baseline vs +VDA vs +MotionEnhancer (and controls) on SynthMotion, tiny models"
    )
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0, help="post-training data and training seed")
    demo.add_argument("--seeds", type=int, nargs="+", help="run once per seed (OUT/seed-S) and summarise")
    demo.add_argument("--assets", default="assets/demo", help="what `make demo-assets` made")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a DemoConfig field, e.g. --set stage2_steps=30")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
