"""``vidalign vda run``: the whole VDA recipe from one config, resumable step by step.

    features -> stage 1 -> stage 2 -> stage 3 -> eval (baseline and +VDA)

Every step writes under ``store`` (a local dir or ``s3://``) and ends by
committing an artifact; a step whose artifact is committed is skipped, and a
step that was interrupted resumes from its newest checkpoint. The ablations of
the paper are switches of the config: ``text`` (static caption or none),
``teacher`` (an AnimateDiff or an SD1.5 registry name), ``projection``
(linear or mlp), ``teacher_frames`` (frames for the diffusion model),
``skip_stage3``. The per-stage sections (``features``,
``stage1``, ``stage2``, ``stage3``) are merged into each stage's own config
(see configs/*-tiny.yaml for their fields); the wiring between stages (data,
URIs, student, teacher, ablations) is set here and wins.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidalign.config import from_dict
from vidalign.log import get_logger
from vidalign.papers import VDA_PROJECTION
from vidalign.store import commit_artifact, open_store, read_manifest

log = get_logger("vidalign.vda")


@dataclass(kw_only=True)
class VDAEvalConfig:
    bench: str = "motionbench"
    data: str = ""
    """Benchmark directory/file; empty with ``synth_n > 0``: a SynthMotion set made for the run."""
    synth_n: int = 0
    frames: int = 8
    batch_size: int = 4
    max_new_tokens: int = 8
    baseline: bool = True
    """Also evaluate the student before VDA (``eval/baseline``)."""


@dataclass(kw_only=True)
class VDAConfig:
    store: str = "runs/vda"
    """Root URI of the run: features/, stage1/, stage2/, stage3/, eval/ go below it."""
    student: str = "tiny-videollava"
    student_weights: str = ""
    """Store URI (or dir) of the student's weights (``<uri>/model``); empty: the registry's."""
    teacher: str = "tiny-animatediff"
    """Diffusion backbone (ablation: an SD1.5 name such as tiny-sd15 or sd15)."""
    teacher_weights: str = ""
    """Store URI (or dir) of the teacher's weights for stage 1; empty: the registry's. Stage 2
    uses what the teacher service at ``stage2.teacher.address`` was started with."""
    device: str = "cpu"
    text: bool = True
    """Condition the teacher on the static caption (false: the no-text ablation)."""
    projection: str = VDA_PROJECTION
    """W_proj: linear (paper) or mlp (appendix B)."""
    pooling: str = "frame"
    """F_V's pooling (``frame`` or ``grid:G``), for the features and stage 2 alike."""
    conditioning: str = ""
    """How W_proj(F_V) reaches the teacher (``vidalign.vda.adapter.CONDITIONINGS``); empty:
    stage 1's default."""
    teacher_frames: int = 0
    """Frames fed to the diffusion model in stages 1 and 2 (VDA: 24); 0: the teacher's default."""
    skip_stage3: bool = False
    """Stages 1+2 only (appendix C)."""
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "toy", "num_clips": 16})
    features: dict[str, Any] = field(default_factory=dict)
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    stage3: dict[str, Any] = field(default_factory=dict)
    eval: VDAEvalConfig | None = None

    def __post_init__(self) -> None:
        if self.projection not in ("linear", "mlp"):
            raise ValueError(f"projection must be linear or mlp, got {self.projection!r}")
        for section in ("features", "stage2"):
            given = getattr(self, section).get("pooling", self.pooling)
            if given != self.pooling:
                raise ValueError(
                    f"{section}.pooling {given!r} differs from pooling {self.pooling!r}: set the "
                    "top-level pooling, which the features and stage 2 share"
                )


def _merge(base: dict[str, Any], wiring: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in wiring.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def stage_configs(config: VDAConfig) -> dict[str, Any]:
    """Each stage's config, wired to the others through the run's store."""
    from vidalign_trainer.features import FeaturesConfig
    from vidalign_trainer.stage1 import Stage1Config
    from vidalign_trainer.stage2 import Stage2Config
    from vidalign_trainer.stage3 import Stage3Config

    root = config.store
    data = dict(config.data)
    student = {"student": config.student, "student_weights": config.student_weights}
    configs: dict[str, Any] = {
        "features": from_dict(FeaturesConfig, _merge(config.features, {
            **student, "device": config.device, "data": data, "pooling": config.pooling,
            "output": {"dir": _uri(root, "features")},
        })),
        "stage1": from_dict(Stage1Config, _merge(config.stage1, {
            "device": config.device, "features": _uri(root, "features"),
            "teacher": {"model": config.teacher, "frames": config.teacher_frames,
                        "weights": config.teacher_weights},
            "adapter": {"projection": config.projection,
                        **({"conditioning": config.conditioning} if config.conditioning else {})},
            "data": data, "train": {"text": config.text}, "output": {"dir": _uri(root, "stage1")},
        })),
        "stage2": from_dict(Stage2Config, _merge(config.stage2, {
            **student, "device": config.device, "pooling": config.pooling,
            "teacher": {"address": config.stage2.get("teacher", {}).get("address", "local"),
                        "model": config.teacher, "frames": config.teacher_frames,
                        "adapter": _uri(root, "stage1", "adapter", "adapter.safetensors")},
            "data": data, "train": {"text": config.text}, "output": {"dir": _uri(root, "stage2")},
        })),
    }
    if not config.skip_stage3:
        configs["stage3"] = from_dict(Stage3Config, _merge(config.stage3, {
            **student, "device": config.device, "encoder": _uri(root, "stage2", "encoder"),
            "data": data, "output": {"dir": _uri(root, "stage3")},
        }))
    return configs


def _done(root: str, name: str) -> bool:
    return read_manifest(open_store(root), name) is not None


def run_vda(config: VDAConfig) -> dict[str, str]:
    """Run every step not yet committed; returns step -> status ("done", "ran", "skipped")."""
    from vidalign_trainer.features import extract_features
    from vidalign_trainer.stage1 import run_stage1
    from vidalign_trainer.stage2 import run_stage2
    from vidalign_trainer.stage3 import run_stage3

    configs = stage_configs(config)
    root = config.store
    steps = [
        ("features", "features/index", lambda: extract_features(configs["features"])),
        ("stage1", "stage1/adapter", lambda: run_stage1(configs["stage1"], resume=True)),
        ("stage2", "stage2/encoder", lambda: run_stage2(configs["stage2"], resume=True)),
    ]
    if not config.skip_stage3:
        steps.append(("stage3", "stage3/lora", lambda: run_stage3(configs["stage3"], resume=True)))
    status: dict[str, str] = {}
    for name, artifact, run in steps:
        if _done(root, artifact):
            log.info("vda_step_skipped", step=name, artifact=_uri(root, artifact))
            status[name] = "done"
            continue
        log.info("vda_step", step=name)
        run()
        status[name] = "ran"
    if config.eval is not None:
        status.update(_evaluate(config))
    return status


def _evaluate(config: VDAConfig) -> dict[str, str]:
    """The benchmark on the baseline student and on +VDA, each committed as eval/<variant>."""
    import tempfile

    from vidalign.data.benchmarks import load_benchmark
    from vidalign.eval import evaluate, result_dict, write_result
    from vidalign.hub import weights_component
    from vidalign.students.answerer import load_trained_videollm, videollm_answerer

    ev = config.eval
    assert ev is not None
    data = ev.data
    if not data:
        from vidalign.data.synth import generate, write_dataset

        data = str(Path(tempfile.mkdtemp(prefix="vidalign-synth-")))
        write_dataset(generate(ev.synth_n or 8, seed=1), data)
    items = load_benchmark(ev.bench, data).items
    variants = {"baseline": {}} if ev.baseline else {}
    variants["vda"] = {"encoder": _uri(config.store, "stage2", "encoder")}
    if not config.skip_stage3:
        variants["vda"]["lora"] = _uri(config.store, "stage3", "lora")
    status = {}
    store = open_store(config.store)
    for variant, parts in variants.items():
        name = f"eval/{variant}"
        if read_manifest(store, name) is not None:
            status[name] = "done"
            continue
        path = weights_component(config.student_weights, "model") if config.student_weights else None
        llm = load_trained_videollm(config.student, path=path, device=config.device, **parts)
        result = evaluate(items, videollm_answerer(llm, max_new_tokens=ev.max_new_tokens),
                          batch_size=ev.batch_size, frames=ev.frames)
        with tempfile.TemporaryDirectory() as tmp:
            write_result(result, tmp, name=ev.bench, model=variant)
            files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
            commit_artifact(store, name, files, producer="vidalign vda run",
                            meta={"variant": variant, **parts})
        log.info("vda_eval", variant=variant, **{k: v for k, v in result_dict(result, model=variant).items()
                                                 if k in ("overall", "average", "n")})
        status[name] = "ran"
    return status


def summary(config: VDAConfig) -> str:
    """A JSON line per committed eval variant (overall, average, n)."""
    store = open_store(config.store)
    lines = []
    for variant in ("baseline", "vda"):
        if read_manifest(store, f"eval/{variant}") is None:
            continue
        from vidalign.store import read_artifact_file

        assert config.eval is not None
        result = json.loads(read_artifact_file(store, f"eval/{variant}", f"{config.eval.bench}.json"))
        lines.append(json.dumps({"variant": variant, **{k: result.get(k) for k in ("overall", "average", "n")}}))
    return "\n".join(lines)
