"""Child process for tests/integration/test_distributed.py: one DDP rank or one DeepSpeed run.

Run as a script, never imported by pytest's process for its ``main`` (DeepSpeed
and ``torch.distributed`` mutate process-global state)::

    python _distributed_worker.py ddp       --inputs IN.pt --address HOST:PORT --adapter-id ID --out DIR
    python _distributed_worker.py deepspeed --inputs IN.pt --address HOST:PORT --adapter-id ID --out DIR --stage S

The rendezvous comes from the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), set by the test. ``IN.pt`` holds the batch the test
built (student video, teacher pixels, captions, sample ids); each DDP rank
takes its contiguous share of it, a DeepSpeed run (world size 1) all of it.
What the run produced is written to ``DIR/<mode>-rank<R>.pt``.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch

STUDENT = "tiny-videollava"
SEED = 1234
TIMESTEP_RANGE = (100, 900)
LR = 0.1


def shard(batch: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s contiguous share of the batch (what a DistributedSampler without shuffling gives)."""
    n = len(batch["ids"])
    if n % world_size:
        raise ValueError(f"batch of {n} does not split over {world_size} ranks")
    per = n // world_size
    part = slice(rank * per, (rank + 1) * per)
    return {key: value[part] for key, value in batch.items()}


def _remote_loss(features, batch, address, adapter_id):
    from vidalign.teacher.client import GrpcTeacher, RemoteDenoisingLoss

    teacher = GrpcTeacher(address, timeout=120.0, wait_s=30)
    teacher.wait_ready(timeout=30.0)
    criterion = RemoteDenoisingLoss(teacher, adapter_id=adapter_id, timestep_range=TIMESTEP_RANGE)
    losses = criterion(
        features,
        pixels=batch["teacher_video"],
        captions=batch["captions"],
        sample_ids=batch["ids"],
        seed=SEED,
    )
    return teacher, losses, criterion.last_result.timesteps


def run_ddp(args) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vidalign.students import load_student

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batch = shard(torch.load(args.inputs), rank, world_size)
    encoder = load_student(STUDENT)
    model = DistributedDataParallel(encoder)
    features = model(encoder.preprocess(batch["video"]))
    teacher, losses, timesteps = _remote_loss(features, batch, args.address, args.adapter_id)
    try:
        losses.mean().backward()  # DDP's hooks all-reduce (average) the gradients here
    finally:
        teacher.close()
    grads = {
        n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None
    }
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": rank,
        "world_size": world_size,
        "losses": losses.detach(),
        "timesteps": timesteps,
        "grads": grads,
    }


def run_deepspeed(args) -> dict:
    import deepspeed

    from vidalign.students import load_student

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    batch = torch.load(args.inputs)
    encoder = load_student(STUDENT)
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": len(batch["ids"]),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        # DeepSpeed only vouches for its own optimizers under ZeRO; SGD is what we test.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=encoder, optimizer=optimizer, config=config
    )
    features = engine(encoder.preprocess(batch["video"]))
    teacher, losses, timesteps = _remote_loss(features, batch, args.address, args.adapter_id)
    try:
        loss = losses.mean()
        engine.backward(loss)
        engine.step()
    finally:
        teacher.close()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    import torch.distributed as dist

    rank = dist.get_rank()
    world_size = dist.get_world_size()
    dist.destroy_process_group()
    return {
        "rank": rank,
        "world_size": world_size,
        "losses": losses.detach(),
        "timesteps": timesteps,
        "params": params,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(ds_optimizer).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ddp", "deepspeed"])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--adapter-id", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = run_ddp(args) if args.mode == "ddp" else run_deepspeed(args)
    torch.save(result, Path(args.out) / f"{args.mode}-rank{result['rank']}.pt")


if __name__ == "__main__":
    main()
