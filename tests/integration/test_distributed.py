"""The remote loss under DDP and DeepSpeed gives the updates of in-process autograd.

``RemoteDenoisingLoss``'s backward is a plain ``autograd.Function``, so DDP's
gradient hooks and DeepSpeed's ``engine.backward``/``engine.step`` should see
the encoder's gradients exactly as if the teacher ran in the same graph. Each
distributed run happens in child processes (``_distributed_worker.py``; the
distributed state they set up is process-global) that talk to the session's
teacher server over loopback; the reference is computed here, in-process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vidalign.data.toy import moving_squares
from vidalign.students import load_student
from vidalign.vda import Adapter, load_teacher
from vidalign.vda.adapter import file_digest
from vidalign.vda.loss import denoising_loss
from vidalign.video import sample_frames

from ..conftest import STUDENT
from ..support.numerics import (
    FP32_U,
    TINY_TEACHER_GRAD_TERMS,
    TINY_TEACHER_LOSS_TERMS,
    assert_fp32_close,
    fp32_atol,
    max_abs,
)
from ._distributed_worker import LR, SEED, TIMESTEP_RANGE, shard
from ._distributed_worker import STUDENT as WORKER_STUDENT

# Children run with OMP_NUM_THREADS=1, this process and the teacher server with 2,
# so sums are ordered differently: bounds follow from fp32 (support/numerics.py).
TEACHER = "tiny-animatediff"
BATCH = 4
WORLD_SIZE = 2
WORKER = Path(__file__).with_name("_distributed_worker.py")
REPO = Path(__file__).resolve().parents[2]
# A cold TORCH_EXTENSIONS_DIR makes DeepSpeed compile its CPU shm-comm op (~70 s on 2 cores).
DEEPSPEED_TIMEOUT_S = 400
DDP_TIMEOUT_S = 180

assert WORKER_STUDENT == STUDENT


# --- reference: one process, one autograd graph through encoder and teacher ---


@pytest.fixture(scope="module")
def batch():
    clips = moving_squares(BATCH, frames=12, size=32, seed=5)
    teacher = load_teacher(TEACHER)
    video = torch.stack([torch.from_numpy(c.video) for c in clips])
    return {
        "video": video,
        "teacher_video": sample_frames(video, teacher.frames, teacher.resolution),
        "captions": [c.static_caption for c in clips],
        "ids": [c.clip_id for c in clips],
    }


@pytest.fixture(scope="module")
def inputs_file(batch, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed-inputs") / "batch.pt"
    torch.save(batch, path)
    return path


def _reference(teacher, adapter, encoder, part):
    """Per-sample losses, timesteps and encoder grads of ``mean(losses)`` over ``part``."""
    encoder.zero_grad(set_to_none=True)
    features = encoder(encoder.preprocess(part["video"]))
    losses, timesteps = denoising_loss(
        teacher,
        adapter,
        teacher.encode_video(part["teacher_video"]),
        text_emb=teacher.encode_text(part["captions"]),
        features=features,
        sample_ids=part["ids"],
        seed=SEED,
        num_draws=1,
        timestep_range=TIMESTEP_RANGE,
    )
    per_sample = losses.mean(dim=1)
    per_sample.mean().backward()
    grads = {
        n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None
    }
    encoder.zero_grad(set_to_none=True)
    return per_sample.detach(), timesteps, grads


@pytest.fixture(scope="module")
def reference(batch, adapter_paths):
    teacher = load_teacher(TEACHER)
    adapter = Adapter.load(adapter_paths[TEACHER])
    assert adapter.lora_rank == 0
    encoder = load_student(STUDENT)
    halves = [
        _reference(teacher, adapter, encoder, shard(batch, r, WORLD_SIZE))
        for r in range(WORLD_SIZE)
    ]
    full = _reference(teacher, adapter, encoder, batch)
    initial = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    # Plain torch SGD from the full-batch gradient: what one DeepSpeed step should produce.
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=LR)
    for name, p in encoder.named_parameters():
        p.grad = full[2].get(name)
    optimizer.step()
    updated = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    return {"halves": halves, "full": full, "initial": initial, "updated": updated}


# --- running the children -----------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _launch(mode, world_size, out, inputs, address, adapter_id, timeout, extra=()) -> list[Path]:
    """Start ``world_size`` workers, wait for all (bounded), kill any left; return their logs."""
    port = _free_port()
    procs, logs = [], []
    timed_out = False
    try:
        for rank in range(world_size):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "DS_BUILD_OPS": "0",
                "TORCH_EXTENSIONS_DIR": os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
                ),
                "PYTHONUNBUFFERED": "1",
            }
            # With LOCAL_SIZE == WORLD_SIZE DeepSpeed's CPU comm op maps a /dev/shm segment
            # (for inference all-reduce only) and never unlinks it; training does not need it.
            env.pop("LOCAL_SIZE", None)
            if sys.platform.startswith("linux"):
                # gloo's rank-to-rank connections on loopback, whatever the hostname resolves to.
                env["GLOO_SOCKET_IFNAME"] = "lo"
            logs.append(out / f"{mode}-rank{rank}.log")
            with open(logs[-1], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(WORKER),
                            mode,
                            "--inputs",
                            str(inputs),
                            "--address",
                            address,
                            "--adapter-id",
                            adapter_id,
                            "--out",
                            str(out),
                            *extra,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=out,
                        env=env,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            timed_out = time.monotonic() > deadline
            if timed_out or any(p.returncode not in (None, 0) for p in procs):
                break  # one rank failed: the others would only wait for it
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the worker and anything it started (a compiler)
                p.wait(timeout=30)
    report = "\n".join(
        f"--- {mode} rank {r}: exit {p.returncode} ---\n{_tail(log)}"
        for r, (p, log) in enumerate(zip(procs, logs, strict=True))
    )
    if any(p.returncode for p in procs):
        pytest.fail(
            f"{mode} workers {'timed out' if timed_out else 'failed'} (limit {timeout} s):\n{report}"
        )
    return logs


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- tests ----------------------------------------------------------------------


def test_ddp_gloo_two_ranks_match_in_process_autograd(
    teacher_servers, adapter_paths, inputs_file, reference, tmp_path
):
    _launch(
        "ddp",
        WORLD_SIZE,
        tmp_path,
        inputs_file,
        teacher_servers[TEACHER],
        file_digest(adapter_paths[TEACHER]),
        DDP_TIMEOUT_S,
    )
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in range(WORLD_SIZE)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    # Each rank saw its own half, with the reference's losses and timesteps.
    for rank, (result, (losses, timesteps, _)) in enumerate(
        zip(ranks, reference["halves"], strict=True)
    ):
        assert torch.equal(result["timesteps"], timesteps), rank
        # fp32 u 6e-8 x 1.5e3 (10 sigma of 2e4 roundings) x |loss| 1.1 -> 1e-4 abs; measured 0
        assert_fp32_close(
            result["losses"], losses, terms=TINY_TEACHER_LOSS_TERMS, what=f"DDP rank {rank} losses"
        )

    # DDP averages the ranks' gradients of their own half-means.
    g0, g1 = (grads for _, _, grads in reference["halves"])
    expected = {k: (g0[k] + g1[k]) / 2 for k in g0}
    # Samples are independent, so that is the gradient of the mean over all 4 (batch of 4
    # vs 2 + 2: other BLAS blocking). fp32 u x 4e4 terms (UNet forward + backward, encoder)
    # x max|grad| 2.3e-3 -> 5.5e-6 abs; measured 9e-10
    tol = assert_fp32_close(
        expected, reference["full"][2], terms=TINY_TEACHER_GRAD_TERMS, what="halves vs whole grad"
    )

    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() == expected.keys()
    # Both ranks hold the same all-reduced sum (a + b == b + a in IEEE): exact.
    assert all(torch.equal(ranks[0]["grads"][k], ranks[1]["grads"][k]) for k in expected)
    # Same bound (other process, 1 thread vs 2); measured 9e-11
    assert_fp32_close(
        ranks[0]["grads"], expected, terms=TINY_TEACHER_GRAD_TERMS, what="DDP grad vs in-process"
    )
    # Not vacuous: the all-reduce changed rank 0's gradient (its own half alone is far off:
    # half of g0 - g1: measured 4.0e-4, 73 x the bound).
    assert _max_diff(g0, expected) > 10 * tol


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2], ids=["zero0", "zero2"])
def test_deepspeed_step_matches_torch_sgd_from_in_process_gradient(
    teacher_servers, adapter_paths, inputs_file, reference, tmp_path, stage
):
    _launch(
        "deepspeed",
        1,
        tmp_path,
        inputs_file,
        teacher_servers[TEACHER],
        file_digest(adapter_paths[TEACHER]),
        DEEPSPEED_TIMEOUT_S,
        extra=("--stage", str(stage)),
    )
    result = torch.load(tmp_path / "deepspeed-rank0.pt")
    assert result["world_size"] == 1 and result["zero_stage"] == stage
    assert result["optimizer"] == ("DeepSpeedZeroOptimizer" if stage else "SGD")

    losses, timesteps, _ = reference["full"]
    assert torch.equal(result["timesteps"], timesteps)
    # fp32 u x 1.5e3 (10 sigma of 2e4 roundings) x |loss| 1.1 -> 1e-4 abs; measured 0
    assert_fp32_close(result["losses"], losses, terms=TINY_TEACHER_LOSS_TERMS, what="DeepSpeed losses")

    params, expected, initial = result["params"], reference["updated"], reference["initial"]
    # One SGD step p - lr * g: the gradients differ by <= 4e4 x u x max|g| (above), times lr,
    # plus one rounding of each updated weight (2 u x max|p|). DeepSpeed's flat fp32
    # buffers only reorder the same adds.
    trainable = set(reference["full"][2])
    tol = LR * fp32_atol(max_abs(reference["full"][2]), TINY_TEACHER_GRAD_TERMS) + 2 * FP32_U * max_abs(
        {n: initial[n] for n in trainable}
    )
    worst = _max_diff({n: params[n] for n in trainable}, {n: expected[n] for n in trainable})
    assert worst <= tol, f"DeepSpeed ZeRO-{stage} weights vs torch SGD: max abs diff {worst:.3e} > {tol:.3e}"
    # Not vacuous: the step moved the trainable weights well beyond the tolerance
    # (lr x max|g| = 2.3e-4 vs ~7e-7), and left the frozen ones exactly as they were.
    assert _max_diff(expected, initial) > 100 * tol
    frozen = {n for n, g in initial.items() if n not in reference["full"][2]}
    assert frozen and all(torch.equal(params[n], initial[n]) for n in frozen)
