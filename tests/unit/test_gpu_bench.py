"""bench/gpu_bench.py (`make gpu-bench`) must not rot without a GPU.

Its `--device cpu --tiny` mode runs the same code on the tiny presets; these tests run
exactly that and check the JSON, the budget's skipping, a failing section's record, and
that the real-size configs build (on the meta device) at the real parameter counts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_bench.py"
SECTIONS = ["teacher", "load", "priors", "student"]


def run(*args: str, code: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_tiny_run_measures_every_section(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = run("--device", "cpu", "--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["tiny"] is True and report["meta"]["device"] == "cpu"
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert positive(section["seconds"]) and positive(section["results"]["construct_s"])

    teacher = report["sections"]["teacher"]["results"]
    assert set(teacher["paths"]) == {
        "in_process_cached",
        "grpc_cached",
        "in_process_new_clip",
        "grpc_new_clip",
    }
    for path in teacher["paths"].values():
        assert (
            positive(path["samples_per_s"])
            and positive(path["s_per_call_median"])
            and path["calls"] >= 1
        )
    assert positive(teacher["grpc_over_in_process_time_cached"])
    # Same engine, same request: the gRPC answer is the in-process one.
    assert teacher["grpc_vs_in_process_max_abs_diff"] == {"loss": 0.0, "grad": 0.0}
    assert teacher["dtype"] == "bfloat16" and teacher["video"] == [8, 32, 32]

    load = report["sections"]["load"]["results"]
    # Every client count, batching off and on, unless the budget's share ran out first.
    measured = {(row["clients"], row["batching"]) for row in load["rows"]}
    counts = [1, 2, 4, 8]
    assert measured == {(n, b) for n in counts if n not in load["skipped_clients"] for b in ("off", "on")}
    assert (1, "off") in measured
    for row in load["rows"]:
        assert positive(row["samples_per_s"]) and row["p50_s"] <= row["p99_s"]
        # Off: one sample per model run; on: never more than max_batch, never fewer than one.
        if row["batching"] == "off":
            assert row["samples_per_run"] == 1.0
        else:
            assert 1.0 <= row["samples_per_run"] <= row["max_batch"] == 8
    assert set(load["speedup"]) == {str(n) for n, _ in measured}

    priors = report["sections"]["priors"]["results"]
    assert positive(priors["s_per_sample_first"]) and positive(priors["video_tokens"])
    assert priors["inversion_steps"] == priors["denoising_steps"] == 5 and priors["guidance"] == 6.0
    # Attention is captured in the 5 denoising forwards, on every layer (tiny: 2).
    assert priors["captured_forwards"] == 5 and priors["layer_calls_captured"] == 5 * 2
    assert priors["selected_heads"] >= 1 and priors["selected_tokens"] >= 1

    student = report["sections"]["student"]["results"]
    assert positive(student["s_per_step"]) and positive(student["first_step_s"])
    assert student["optimizer"] == "AdamW" and math.isfinite(student["loss"])
    assert positive(report["meta"]["peak_rss_gib"]) and positive(report["meta"]["wall_s"])
    # The markdown table on stdout: a row per measurement.
    assert "| section | measure | value | peak GPU GiB | notes |" in proc.stdout
    assert proc.stdout.count("| teacher |") == 5 and "| student | train step" in proc.stdout
    assert proc.stdout.count("| load |") == len(load["rows"]) + bool(load["skipped_clients"])


def test_spent_budget_skips_sections_with_a_message(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = run("--device", "cpu", "--tiny", "--budget-s", "0.01", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "skipped"
        assert (
            "time budget is spent" in section["message"]
            and f"--sections {name}" in section["message"]
        )
    assert proc.stdout.count("| skipped |") == len(SECTIONS)


def test_failing_section_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "gpu_bench.json"
    code = (
        "import sys; sys.path.insert(0, 'bench'); import gpu_bench as g\n"
        "def boom(ctx): raise RuntimeError('boom')\n"
        "g.BENCHES['teacher'] = boom\n"
        "sys.exit(g.main(sys.argv[1:]))\n"
    )
    proc = run(
        "--device",
        "cpu",
        "--tiny",
        "--sections",
        "teacher",
        "student",
        "--json",
        str(out),
        code=code,
    )
    # A section's error fails the run, after the other sections ran.
    assert proc.returncode == 1, proc.stderr[-4000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["teacher", "student"]
    assert (
        sections["teacher"]["status"] == "error"
        and sections["teacher"]["message"] == "RuntimeError: boom"
    )
    assert sections["student"]["status"] == "ok" and positive(
        sections["student"]["results"]["s_per_step"]
    )


def test_cuda_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run("--device", "cuda", "--json", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_real_size_models_have_the_real_parameter_counts():
    """The real-size configs build (on the meta device: no memory, no time) at the published sizes."""
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["gpu_bench"]
    meta = torch.device("meta")
    ctx = bench.Ctx(device=meta, tiny=False, dtype=torch.bfloat16, budget=bench.Budget(480.0))
    cog = bench.build_cogvideox15_5b(ctx)
    assert 5.5 < bench.params_b(cog.transformer) < 5.7  # CogVideoX-5B's transformer
    assert 4.7 < bench.params_b(cog.text_encoder) < 4.8  # T5 v1.1 XXL encoder
    assert cog.transformer.config.num_layers == 42 and cog.transformer.config.patch_size_t == 2
    assert cog.dtype == torch.bfloat16

    from transformers import VideoLlavaForConditionalGeneration

    config = bench._student_config(tiny=False)
    with bench.build_on(meta, torch.bfloat16):
        model = VideoLlavaForConditionalGeneration(config)
    assert 7.3 < bench.params_b(model) < 7.4  # 7B Llama + two CLIP ViT-L/14 towers + projector
    vision = config.vision_config
    # 8 frames x (16 x 16 patches + CLS): the video tokens of one clip.
    assert config.video_seq_length == bench.STUDENT_FRAMES * (
        (vision.image_size // vision.patch_size) ** 2 + 1
    )
