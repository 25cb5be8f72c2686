"""The remote gradient is the chain rule, exactly (docs/design.md, decision 1).

Same tiny models, same seed: the encoder's parameter gradients obtained
through the gRPC teacher equal in-process autograd through teacher and
encoder together, and so do the losses.
"""

from __future__ import annotations

import pytest
import torch

from vidalign.data.toy import moving_squares
from vidalign.students import load_student
from vidalign.teacher.client import GrpcTeacher, LocalTeacher, RemoteDenoisingLoss
from vidalign.vda import Adapter, load_teacher
from vidalign.vda.adapter import CONDITIONINGS, file_digest
from vidalign.vda.loss import denoising_loss
from vidalign.video import sample_frames

from ..conftest import STUDENT, _start
from ..support.numerics import (
    TINY_TEACHER_GRAD_TERMS,
    TINY_TEACHER_LOSS_TERMS,
    assert_fp32_close,
    max_abs,
)

BATCH = 2
SEED = 1234


@pytest.fixture(scope="module")
def clips():
    return moving_squares(BATCH, frames=12, size=32, seed=5)


def _inputs(clips, teacher_name):
    teacher = load_teacher(teacher_name)
    video = torch.stack([torch.from_numpy(c.video) for c in clips])
    return (
        teacher,
        video,
        sample_frames(video, teacher.frames, teacher.resolution),
        [c.static_caption for c in clips],
        [c.clip_id for c in clips],
    )


def _grads(encoder):
    return {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _in_process(teacher, adapter, encoder, video, teacher_video, captions, ids, draws, t_range, latents=None):
    """Reference: one autograd graph through the encoder, W_proj and the UNet."""
    features = encoder(encoder.preprocess(video))
    z0 = teacher.encode_video(teacher_video) if latents is None else latents
    text = teacher.encode_text(captions) if captions is not None else None
    losses, timesteps = denoising_loss(
        teacher, adapter, z0, text_emb=text, features=features, sample_ids=ids, seed=SEED,
        num_draws=draws, timestep_range=t_range,
    )
    loss = losses.mean(dim=1).mean()
    loss.backward()
    return loss.detach(), timesteps, _grads(encoder)


def _through(teacher_client, adapter_id, encoder, video, teacher_video, captions, ids, draws, t_range, latents=None):
    criterion = RemoteDenoisingLoss(teacher_client, adapter_id=adapter_id, num_draws=draws, timestep_range=t_range)
    features = encoder(encoder.preprocess(video))
    kwargs = {"latents": latents} if latents is not None else {"pixels": teacher_video}
    loss = criterion(features, captions=captions, sample_ids=ids, seed=SEED, **kwargs).mean()
    loss.backward()
    return loss.detach(), criterion.last_result.timesteps, _grads(encoder)


def _assert_same(a, b):
    loss_a, t_a, g_a = a
    loss_b, t_b, g_b = b
    assert torch.equal(t_a, t_b)
    # The server runs the teacher in its own threads, with another batch layout (features
    # received over the wire, the teacher's graph cut at F_V): sum order differs.
    # fp32 u 6e-8 x 1.5e3 (10 sigma of 2e4 roundings: VAE, UNet, mean) x |loss| 1.1
    # -> 1e-4 abs (losses of two draws differ by >= 5e-4); measured 0
    assert_fp32_close(loss_b, loss_a, terms=TINY_TEACHER_LOSS_TERMS, what="remote loss")
    assert g_a.keys() == g_b.keys() and g_a
    # fp32 u x 4e4 terms (UNet forward + backward, W_proj, encoder) x max|grad|
    # -> 2.4e-3 of max|grad|; measured <= 1.2e-7 of it. A chain-rule defect (a draw or sample
    # dropped, a 1/K or 1/B factor wrong) moves the gradient by >= 1/3 of itself.
    assert_fp32_close(g_b, g_a, terms=TINY_TEACHER_GRAD_TERMS, what="remote grad")
    # The check is not vacuous: the gradient actually moves the encoder.
    assert max_abs(g_a) > 1e-8


CASES = [
    pytest.param("tiny-animatediff", "", True, 1, id="animatediff-text-K1"),
    pytest.param("tiny-animatediff", "", False, 1, id="animatediff-notext-K1"),
    pytest.param("tiny-animatediff", "", True, 3, id="animatediff-text-K3"),
    pytest.param("tiny-animatediff", "+lora", True, 2, id="animatediff-lora-K2"),
    pytest.param("tiny-sd15", "", True, 1, id="sd15-text-K1"),
    pytest.param("tiny-sd15", "", False, 3, id="sd15-notext-K3"),
]


@pytest.mark.parametrize("teacher_name,variant,text,draws", CASES)
def test_grpc_gradient_equals_in_process_autograd(
    teacher_servers, adapter_paths, clips, teacher_name, variant, text, draws
):
    teacher, video, teacher_video, captions, ids = _inputs(clips, teacher_name)
    path = adapter_paths[teacher_name + variant]
    adapter = Adapter.load(path)
    if adapter.lora_rank:
        teacher.attach_lora(adapter.digest, adapter.lora_config(), adapter.lora_state)
    captions = captions if text else None
    t_range = (100, 900)

    reference = _in_process(teacher, adapter, load_student(STUDENT), video, teacher_video, captions, ids, draws, t_range)
    client = GrpcTeacher(teacher_servers[teacher_name])
    try:
        remote = _through(client, file_digest(path), load_student(STUDENT), video, teacher_video, captions, ids, draws, t_range)
    finally:
        client.close()
    _assert_same(remote, reference)


@pytest.fixture(scope="module")
def conditioning_server(tmp_path_factory):
    """A tiny-animatediff teacher serving one adapter per conditioning mode.

    The session's adapters (conftest) have the default mode; these cover each one.
    frame_pos gets a non-zero position table (a fresh one is zero and would
    condition exactly as "context"), so the positions take part in the gradient;
    spatial gets a non-zero W_proj (a fresh one is zero: no gradient would reach F_V).
    """
    name = "tiny-animatediff"
    teacher = load_teacher(name)
    d_v = load_student(STUDENT).d_v
    root = tmp_path_factory.mktemp("conditioning-adapters")
    paths = {}
    for mode in CONDITIONINGS:
        adapter = Adapter.create(
            d_v=d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family, seed=4, conditioning=mode,
            teacher=teacher,
        )
        if mode == "frame_pos":
            with torch.no_grad():
                adapter.proj.frame_pos.normal_(generator=torch.Generator().manual_seed(6))
        if mode == "spatial":
            with torch.no_grad():
                adapter.proj.weight.normal_(generator=torch.Generator().manual_seed(6))
        paths[mode] = root / f"{mode}.safetensors"
        adapter.save(paths[mode])
    server = _start(name, list(paths.values()))
    yield name, paths, f"127.0.0.1:{server.port}"
    server.stop(grace=0)


@pytest.mark.parametrize("mode", CONDITIONINGS)
def test_grpc_gradient_equals_in_process_autograd_in_every_conditioning_mode(conditioning_server, clips, mode):
    """Per-frame ("frame") or position-tagged ("frame_pos") contexts are the chain rule too.

    12 teacher frames over the student's 8, so "frame" maps frames unevenly (some student
    frames condition one teacher frame, some two) on both sides of the wire.
    """
    name, paths, address = conditioning_server
    teacher, video, _, captions, ids = _inputs(clips, name)
    teacher_video = sample_frames(video, 12, teacher.resolution)
    adapter = Adapter.load(paths[mode])
    assert adapter.conditioning == mode
    reference = _in_process(teacher, adapter, load_student(STUDENT), video, teacher_video, captions, ids, 2, (100, 900))
    client = GrpcTeacher(address)
    try:
        remote = _through(client, file_digest(paths[mode]), load_student(STUDENT), video, teacher_video, captions,
                          ids, 2, (100, 900))
    finally:
        client.close()
    _assert_same(remote, reference)


def test_local_teacher_matches_grpc_and_inline_latents(teacher_servers, adapter_paths, clips):
    """The in-process teacher answers exactly as the service does; inline latents equal pixels."""
    name = "tiny-animatediff"
    teacher, video, teacher_video, captions, ids = _inputs(clips, name)
    path = adapter_paths[name]
    latents = teacher.encode_video(teacher_video)
    local = LocalTeacher(name, adapters=[path])
    client = GrpcTeacher(teacher_servers[name])
    try:
        a = _through(local, file_digest(path), load_student(STUDENT), video, teacher_video, captions, ids, 2, None)
        b = _through(client, file_digest(path), load_student(STUDENT), video, teacher_video, captions, ids, 2, None)
        c = _through(client, file_digest(path), load_student(STUDENT), video, None, captions, ids, 2, None, latents=latents)
    finally:
        client.close()
    _assert_same(a, b)
    _assert_same(b, c)


def test_randomness_is_a_function_of_seed_and_sample_id(teacher_servers, adapter_paths, clips):
    """Same (seed, sample id, draw) -> same timesteps and loss; another seed -> different."""
    name = "tiny-animatediff"
    _, video, teacher_video, captions, ids = _inputs(clips, name)
    client = GrpcTeacher(teacher_servers[name])
    criterion = RemoteDenoisingLoss(client, adapter_id=file_digest(adapter_paths[name]), num_draws=4)
    encoder = load_student(STUDENT)
    with torch.no_grad():
        features = encoder(encoder.preprocess(video))
    try:
        runs = []
        for seed in (7, 7, 8):
            loss = criterion(features, pixels=teacher_video, captions=captions, sample_ids=ids, seed=seed)
            runs.append((loss, criterion.last_result.timesteps))
        swapped = criterion(features.flip(0), pixels=teacher_video.flip(0), captions=captions[::-1],
                            sample_ids=ids[::-1], seed=7)
    finally:
        client.close()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    # A sample's draws do not depend on its position in the batch (same shapes, rows
    # swapped: BLAS may block rows differently). u x 1.5e3 x |loss| 1.1 -> 1e-4; measured 0.
    # The other row's draws move a loss by >= 5e-4 (draws' losses: 1.1 +- 0.03).
    assert_fp32_close(swapped.flip(0), runs[0][0], terms=TINY_TEACHER_LOSS_TERMS, what="swapped rows")
