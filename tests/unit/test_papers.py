"""vidalign.papers: torch-free, and the places that default to a paper's setting read it from there."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import pytest

from vidalign import papers


def test_importing_the_constants_loads_no_torch():
    code = "import sys, vidalign.papers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_values_and_immutability():
    assert (papers.VDA_LR, papers.VDA_LORA_RANK, papers.VDA_DIFFUSION_FRAMES) == (1e-5, 16, 24)
    assert (papers.ME_INVERSION_STEPS, papers.ME_DENOISING_STEPS, papers.ME_DDIM_STEPS) == (5, 5, 5)
    assert (papers.ME_HEAD_RATIO, papers.ME_TOKEN_RATIO, papers.ME_ALIGN_WEIGHT) == (0.5, 0.5, 1.0)
    with pytest.raises(TypeError):
        papers.ME_MHS_WEIGHTS["dfc"] = 2.0  # type: ignore[index]
    assert "VDA_LR" in papers.__all__ and "ME_GUIDANCE" in papers.__all__


def defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_motion_defaults_are_the_papers():
    from vidalign.motionenhancer import extract_priors
    from vidalign.motionenhancer.inversion import ddim_denoise, ddim_invert
    from vidalign.motionenhancer.mhs import DEFAULT_WEIGHTS, select_heads
    from vidalign.motionenhancer.mtti import select_tokens

    got = defaults(extract_priors)
    assert got["steps"] == papers.ME_DDIM_STEPS and got["guidance"] == papers.ME_GUIDANCE
    assert (got["head_ratio"], got["token_ratio"]) == (papers.ME_HEAD_RATIO, papers.ME_TOKEN_RATIO)
    assert got["memory"] is papers.ME_CROSS_STREAM_MEMORY
    assert (got["mean_weight"], got["diff_weight"]) == (
        papers.ME_MTTI_MEAN_WEIGHT, papers.ME_MTTI_DIFF_WEIGHT
    )
    assert defaults(ddim_invert)["steps"] == papers.ME_INVERSION_STEPS
    assert defaults(ddim_denoise)["steps"] == papers.ME_DENOISING_STEPS
    assert defaults(select_heads)["ratio"] == papers.ME_HEAD_RATIO
    assert dict(papers.ME_MHS_WEIGHTS) == DEFAULT_WEIGHTS
    assert defaults(select_tokens)["ratio"] == papers.ME_TOKEN_RATIO


def test_priors_job_defaults_are_the_papers():
    from vidalign_teacher.priors import ExtractConfig
    from vidalign_teacher.priors_args import add_extract_arguments

    config = ExtractConfig(data="d", out="o")
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o"])
    for value in (config, args):
        assert value.steps == papers.ME_DDIM_STEPS and value.guidance == papers.ME_GUIDANCE
        assert (value.head_ratio, value.token_ratio) == (papers.ME_HEAD_RATIO, papers.ME_TOKEN_RATIO)
    assert config.memory is papers.ME_CROSS_STREAM_MEMORY and args.no_memory is False


def test_vda_frames():
    from vidalign.vda.registry import TEACHER_MODELS, VDA_FRAMES

    assert VDA_FRAMES == papers.VDA_DIFFUSION_FRAMES
    assert TEACHER_MODELS["random-animatediff"].frames == papers.VDA_DIFFUSION_FRAMES
