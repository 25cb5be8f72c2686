"""GPU smoke test of the teacher and the remote gradient (needs CUDA; not part of `make test`).

1. The teacher on CUDA as a real gRPC server on loopback, the student on CUDA:
   the encoder gradient through gRPC vs in-process autograd on the same GPU.
2. The teacher in float16 and bfloat16: finite losses and gradients.
3. Peak GPU memory of one DenoisingLoss call with want_grad, per teacher.

    python bench/gpu_smoke.py [--teachers tiny-animatediff random-animatediff]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vidalign.data.toy import moving_squares
from vidalign.log import configure_logging
from vidalign.students import load_student
from vidalign.teacher.client import GrpcTeacher, RemoteDenoisingLoss
from vidalign.vda import Adapter, load_teacher
from vidalign.vda.loss import denoising_loss
from vidalign.video import sample_frames
from vidalign_teacher.server import ServerConfig, TeacherServer

STUDENT = "tiny-videollava"
SEED = 11
DEVICE = "cuda"


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def check_exact(name: str, root: Path) -> None:
    teacher = load_teacher(name, device=DEVICE)
    adapter = Adapter.create(d_v=load_student(STUDENT).d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family)
    path = root / f"{name}.safetensors"
    adapter.save(path)
    adapter = Adapter.load(path).to(DEVICE)
    clips = moving_squares(2, frames=teacher.frames, size=64, seed=3)
    video = torch.stack([torch.from_numpy(c.video) for c in clips])
    tvideo = sample_frames(video, teacher.frames, teacher.resolution)
    captions, ids = [c.static_caption for c in clips], [c.clip_id for c in clips]

    enc = load_student(STUDENT, device=DEVICE)
    feats = enc(enc.preprocess(video.to(DEVICE)))
    z0 = teacher.encode_video(tvideo.to(DEVICE))
    losses, _ = denoising_loss(teacher, adapter, z0, text_emb=teacher.encode_text(captions), features=feats,
                               sample_ids=ids, seed=SEED, num_draws=2)
    losses.mean(1).mean().backward()
    ref_loss, ref = losses.mean().item(), grads(enc)
    del teacher, z0
    torch.cuda.empty_cache()

    server = TeacherServer(ServerConfig(model=name, host="127.0.0.1", port=0, adapters=[str(path)], device=DEVICE))
    server.start()
    client = GrpcTeacher(f"127.0.0.1:{server.port}")
    try:
        enc2 = load_student(STUDENT, device=DEVICE)
        crit = RemoteDenoisingLoss(client, adapter_id=adapter.digest, num_draws=2)
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        loss = crit(enc2(enc2.preprocess(video.to(DEVICE))), pixels=tvideo, captions=captions, sample_ids=ids, seed=SEED).mean()
        loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - tic
        got = grads(enc2)
        diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
        scale = max(g.abs().max().item() for g in ref.values())
        print(f"[{name}] {DEVICE} fp32: loss grpc {loss.item():.6f} in-process {ref_loss:.6f}; "
              f"max |grad diff| {diff:.2e} (max |grad| {scale:.2e}); call+backward {took:.3f} s; "
              f"peak GPU memory {peak_gib():.2f} GiB")
        assert abs(loss.item() - ref_loss) <= 1e-5 and diff <= 1e-5 * max(1.0, scale), "remote gradient differs"
    finally:
        client.close()
        server.stop(grace=0)
        del server
        torch.cuda.empty_cache()

    for dtype in ("float16", "bfloat16"):
        server = TeacherServer(ServerConfig(model=name, host="127.0.0.1", port=0, adapters=[str(path)],
                                            device=DEVICE, dtype=dtype))
        server.start()
        client = GrpcTeacher(f"127.0.0.1:{server.port}")
        try:
            enc3 = load_student(STUDENT, device=DEVICE)
            crit = RemoteDenoisingLoss(client, adapter_id=adapter.digest)
            loss = crit(enc3(enc3.preprocess(video.to(DEVICE))), pixels=tvideo, captions=captions, sample_ids=ids, seed=SEED).mean()
            loss.backward()
            g = grads(enc3)
            finite = all(torch.isfinite(v).all() for v in g.values())
            print(f"[{name}] {DEVICE} {dtype}: loss {loss.item():.6f}, grads finite: {finite}")
            assert torch.isfinite(loss) and finite
        finally:
            client.close()
            server.stop(grace=0)
            del server
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["tiny-animatediff", "random-animatediff"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    configure_logging(level="WARNING")
    if DEVICE == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers:
            check_exact(name, Path(tmp))
    print("gpu smoke: OK")


if __name__ == "__main__":
    main()
