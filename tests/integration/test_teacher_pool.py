"""Several teacher replicas: round-robin, failover, identical answers; pipelined micro-batches are exact."""

from __future__ import annotations

import pytest
import torch

from vidalign.teacher.client import PooledTeacher, RemoteDenoisingLoss, connect
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.vda.adapter import file_digest
from vidalign_teacher.server import ServerConfig, TeacherServer
from vidalign_trainer.stage2 import run_stage2

from ..e2e.test_stage2 import config

MODEL = "tiny-animatediff"


@pytest.fixture
def replicas(adapter_paths):
    servers = []
    for _ in range(2):
        server = TeacherServer(ServerConfig(model=MODEL, host="127.0.0.1", port=0, device="cpu",
                                            adapters=[str(adapter_paths[MODEL])]))
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop(grace=0)


def request(adapter_id):
    g = torch.Generator().manual_seed(0)
    return DenoisingLossRequest(
        sample_ids=["a", "b"], features=torch.randn(2, 8, 32, generator=g),
        latents=torch.randn(2, 4, 4, 8, 8, generator=g), captions=["x", "y"],
        adapter_id=adapter_id, seed=9, want_grad=True,
    )


def test_round_robin_failover_and_identical_answers(replicas, adapter_paths):
    adapter_id = file_digest(adapter_paths[MODEL])
    pool = connect(",".join(f"127.0.0.1:{s.port}" for s in replicas), retries=1)
    assert isinstance(pool, PooledTeacher)
    try:
        answers = [pool.denoising_loss(request(adapter_id)) for _ in range(4)]
        assert [s.servicer.engine.requests_served for s in replicas] == [2, 2]
        # Two replicas, same request: bit-identical losses and gradients.
        assert all(torch.equal(a.losses, answers[0].losses) for a in answers)
        assert all(torch.equal(a.grad, answers[0].grad) for a in answers)
        replicas[0].stop(grace=0)
        for _ in range(2):  # the dead replica is skipped
            assert torch.equal(pool.denoising_loss(request(adapter_id)).losses, answers[0].losses)
        assert replicas[1].servicer.engine.requests_served == 4
    finally:
        pool.close()


def test_submit_overlaps_calls_and_matches_forward(replicas, adapter_paths):
    adapter_id = file_digest(adapter_paths[MODEL])
    teacher = connect(f"127.0.0.1:{replicas[1].port}")
    criterion = RemoteDenoisingLoss(teacher, adapter_id=adapter_id)
    req = request(adapter_id)
    try:
        f1 = req.features.clone().requires_grad_(True)
        criterion(f1, latents=req.latents, captions=req.captions, sample_ids=req.sample_ids, seed=9).sum().backward()
        f2 = req.features.clone().requires_grad_(True)
        pending = [
            criterion.submit(f2[i : i + 1], latents=req.latents[i : i + 1], captions=req.captions[i : i + 1],
                             sample_ids=req.sample_ids[i : i + 1], seed=9)
            for i in range(2)
        ]
        torch.cat([p.result() for p in pending]).sum().backward()
    finally:
        teacher.close()
    assert torch.allclose(f1.grad, f2.grad, atol=1e-6)


def test_stage2_micro_batches_equal_whole_batches(adapter_paths, tmp_path):
    adapter = adapter_paths[MODEL]
    whole = run_stage2(config(adapter, tmp_path / "whole", 3))
    cfg = config(adapter, tmp_path / "micro", 3)
    cfg.train.micro_batches = 2
    micro = run_stage2(cfg)
    assert micro == pytest.approx(whole, abs=1e-6)
