"""VDA feature extraction and stage 1 end to end, on tiny models.

Stage 1 trains W_proj and the UNet LoRA only, its loss falls, a killed run
resumes to the same result, and the teacher service loads the adapter it
commits (by store URI) and serves stage 2 with it, identically on every replica.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vidalign.config import load_config
from vidalign.data.toy import moving_squares
from vidalign.errors import NotFound
from vidalign.run import RunDir
from vidalign.store import materialize, open_store, read_artifact_file, read_manifest
from vidalign.students import load_student
from vidalign.teacher.client import GrpcTeacher
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.vda import Adapter, load_teacher
from vidalign.vda.loss import loss_and_grad
from vidalign.video import sample_frames
from vidalign_teacher.server import ServerConfig, TeacherServer
from vidalign_trainer.features import FeaturesConfig, extract_features, load_features
from vidalign_trainer.stage1 import Stage1Config, run_stage1
from vidalign_trainer.stage2 import Stage2Config, run_stage2

from ..conftest import STUDENT
from ..support.numerics import (
    TINY_TEACHER_GRAD_TERMS,
    TINY_TEACHER_LOSS_TERMS,
    TINY_VLM_TERMS,
    assert_fp32_close,
    assert_same_trajectory_scalars,
)

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "tiny-animatediff"
STEPS = 6
CLIPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on a busy 2-core machine spin on each other's barriers
    # (a UNet forward goes from 0.2 s to 1-3 s); one thread is fast and steady.
    # The killed subprocess runs with the same count, so its losses match bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features_config(out: str, *extra: str) -> FeaturesConfig:
    return load_config(
        FeaturesConfig,
        ROOT / "configs" / "features-tiny.yaml",
        [f"output.dir={out}", f"data.num_clips={CLIPS}", "output.shard_size=3", *extra],
    )


def overrides(features: str, out: str) -> list[str]:
    return [
        f"features={features}", f"output.dir={out}", f"data.num_clips={CLIPS}",
        "train.batch_size=1", f"train.steps={STEPS}", "train.lr=3e-2",
        "output.checkpoint_every=2", f"eval.num_clips={CLIPS}", "eval.timesteps=[300]",
    ]


def stage1_config(features: str, out: str) -> Stage1Config:
    return load_config(Stage1Config, ROOT / "configs" / "stage1-tiny.yaml", overrides(features, out))


@pytest.fixture(scope="module")
def features_uri(tmp_path_factory) -> str:
    return extract_features(features_config(str(tmp_path_factory.mktemp("features"))))


@pytest.fixture(scope="module")
def trained(features_uri, tmp_path_factory):
    """One stage-1 run on a teacher we hold, with its parameters before and after."""
    teacher = load_teacher(TEACHER)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tmp_path_factory.mktemp("stage1")
    result = run_stage1(stage1_config(features_uri, str(out)), teacher=teacher)
    return SimpleNamespace(teacher=teacher, before=before, out=out, result=result)


def test_features_are_the_frozen_encoders_and_extraction_resumes(features_uri):
    features = load_features(features_uri)
    clips = moving_squares(CLIPS, frames=16, size=32, seed=0)
    assert sorted(features.features) == sorted(c.clip_id for c in clips)
    encoder = load_student(STUDENT).eval()
    with torch.no_grad():
        expected = encoder(encoder.preprocess(torch.from_numpy(clips[3].video)[None]))[0]
    assert features.features[clips[3].clip_id].shape == (encoder.num_frames, encoder.d_v)
    # The job encodes clips in batches, this check one clip alone (other BLAS blocking):
    # fp32 u 6e-8 x 2e3 terms (tiny tower depth) x max|feature| -> 1.2e-4 of it; measured 0.
    # Another clip's features (or a wrong frame sampling) differ by O(max|feature|).
    assert_fp32_close(features.features[clips[3].clip_id], expected, terms=TINY_VLM_TERMS, what="features")

    # A rerun keeps committed shards; a shard whose commit was lost is redone alone.
    store = open_store(features_uri)
    created = {name: read_manifest(store, name).created for name in ("shard-00000", "shard-00001")}
    store.delete("shard-00001/MANIFEST.json")
    extract_features(features_config(features_uri))
    assert read_manifest(store, "shard-00000").created == created["shard-00000"]
    assert read_manifest(store, "shard-00001").created > created["shard-00001"]
    again = load_features(features_uri)
    assert all(torch.equal(again.features[k], v) for k, v in features.features.items())


def test_stage1_trains_only_w_proj_and_lora(trained):
    teacher, before = trained.teacher, trained.before
    # Every base weight of the teacher is bit-identical; the LoRA was detached again
    # (peft leaves its wrappers, so a LoRA site's weight is now ``...base_layer.weight``).
    after = {k.replace(".base_layer.", "."): v for k, v in teacher.state_dict().items()}
    assert not any("lora_" in k for k in after)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not any(p.requires_grad for p in teacher.parameters())

    # The committed adapter: W_proj and every LoRA matrix moved from their initialisation.
    path = materialize(trained.result.adapter_uri)
    adapter = Adapter.load(path)
    init = Adapter.create(
        d_v=adapter.d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family,
        lora_rank=16, seed=0, teacher=teacher,
    )
    assert (adapter.lora_rank, adapter.projection) == (16, "linear")
    assert adapter.lora_state.keys() == init.lora_state.keys()
    for key, value in adapter.proj.state_dict().items():
        assert not torch.equal(value, init.proj.state_dict()[key]), key
    unchanged = [k for k, v in adapter.lora_state.items() if torch.equal(v, init.lora_state[k])]
    assert unchanged == []  # lora_B started at zero: the LoRA now acts
    manifest = read_manifest(open_store(str(trained.out)), "adapter")
    assert manifest.meta["adapter_id"] == adapter.digest and manifest.step == STEPS


def test_stage1_loss_falls_on_a_fixed_set(trained):
    evals = trained.result.eval_losses
    assert sorted(evals) == [0, STEPS]
    assert evals[STEPS] < 0.97 * evals[0], evals
    metrics = RunDir(str(trained.out)).metrics()
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["eval_loss"] == round(evals[STEPS], 6)


def test_killed_stage1_resumes_to_the_same_adapter(store_uri, features_uri, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    expected = [m["loss"] for m in RunDir(str(trained.out)).metrics()]
    uri = f"{store_uri}/killed"
    cmd = [sys.executable, "-m", "vidalign_cli.main", "train", "stage1",
           "--config", str(ROOT / "configs" / "stage1-tiny.yaml")]
    for item in overrides(features_uri, uri):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    killed_run = RunDir(uri)
    deadline = time.monotonic() + 120
    try:
        while len(killed_run.metrics()) < 3:  # past the step-2 checkpoint, before the end
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "stage 1 made no progress"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(killed_run.metrics()) < STEPS

    resumed = run_stage1(stage1_config(features_uri, uri), resume=True)
    assert 0 < len(resumed.losses) < STEPS
    assert [m["loss"] for m in RunDir(uri).metrics()] == expected  # no step lost or repeated
    assert resumed.eval_losses == {STEPS: trained.result.eval_losses[STEPS]}
    store = open_store(uri)
    assert read_manifest(store, "latents") is not None  # the killed run's latents were reused
    ours = read_artifact_file(store, "adapter", "adapter.safetensors")
    assert ours == Path(trained.result.adapter_uri).read_bytes()
    assert materialize(resumed.adapter_uri).read_bytes() == ours


def _serve(adapter_uri: str) -> TeacherServer:
    server = TeacherServer(
        ServerConfig(model=TEACHER, host="127.0.0.1", port=0, adapters=[adapter_uri], device="cpu", workers=2)
    )
    server.start()
    return server


def test_teacher_replicas_serve_the_stage1_adapter(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    uri = f"file://{trained.out}/adapter/adapter.safetensors"  # a store object URI
    adapter = Adapter.load(materialize(uri))
    replicas = [_serve(uri), _serve(uri)]
    clients = [GrpcTeacher(f"127.0.0.1:{s.port}") for s in replicas]
    try:
        info = clients[0].info()
        assert [(a.id, a.lora_rank) for a in info.adapters] == [(adapter.digest, 16)]

        # Stage 2 trains against it.
        out = tmp_path / "stage2"
        stage2 = load_config(
            Stage2Config,
            ROOT / "configs" / "stage2-tiny.yaml",
            [f"teacher.address=127.0.0.1:{replicas[0].port}", f"teacher.adapter={uri}",
             f"output.dir={out}", "train.steps=2", "data.num_clips=2", "train.batch_size=1"],
        )
        losses = run_stage2(stage2)
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        assert (out / "encoder" / "MANIFEST.json").is_file()

        # Any replica gives the same answer, bit for bit, and it is the trained adapter's.
        clips = moving_squares(2, frames=8, size=32, seed=9)
        pixels = sample_frames(torch.stack([torch.from_numpy(c.video) for c in clips]), 8, 32)
        request = DenoisingLossRequest(
            sample_ids=[c.clip_id for c in clips],
            features=torch.randn(2, 8, adapter.d_v, generator=torch.Generator().manual_seed(0)),
            pixels=pixels,
            captions=[c.static_caption for c in clips],
            adapter_id=adapter.digest,
            seed=11,
            num_draws=2,
            want_grad=True,
            model=TEACHER,
        )
        first, second = (c.denoising_loss(request) for c in clients)
        assert torch.equal(first.losses, second.losses) and torch.equal(first.grad, second.grad)
        assert torch.equal(first.timesteps, second.timesteps)
        teacher = trained.teacher
        local = loss_and_grad(
            teacher, adapter, teacher.encode_video(pixels), text_emb=teacher.encode_text(request.captions),
            features=request.features, sample_ids=request.sample_ids, seed=11, num_draws=2, want_grad=True,
        )
        # Served vs in-process (other threads, the server's batch layout): losses within
        # u x 1.5e3 (10 sigma of 2e4 roundings) x |loss| ~ 1e-4, two draws' losses being
        # >= 5e-4 apart; dL/dF_V within u x 4e4 (UNet forward + backward) x max|grad|.
        # Measured 0. Another adapter's answer differs by O(1) in both.
        assert_fp32_close(first.losses, local.losses, terms=TINY_TEACHER_LOSS_TERMS, what="served losses")
        assert_fp32_close(first.grad, local.grad, terms=TINY_TEACHER_GRAD_TERMS, what="served grad")
    finally:
        for client in clients:
            client.close()
        for server in replicas:
            server.stop(grace=0)


def test_missing_features_are_reported(tmp_path):
    config = stage1_config(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(NotFound, match=r"no committed index.*features extract"):
        run_stage1(config)


@pytest.mark.slow
def test_two_rank_ddp_matches_one_rank_with_the_global_batch(features_uri, tmp_path):
    """torchrun, 2 gloo ranks x 1 clip == 1 rank x 2 clips: DDP averages exactly the trainable grads."""
    steps = 3
    common = [*overrides(features_uri, ""), f"train.steps={steps}", "eval.num_clips=0", "train.batch_size=2"]
    one = load_config(Stage1Config, ROOT / "configs" / "stage1-tiny.yaml",
                      [*common, f"output.dir={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidalign_cli.main", "train", "stage1", "--config", str(ROOT / "configs" / "stage1-tiny.yaml")]
    for item in [*common, f"output.dir={tmp_path / 'two'}"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        run_stage1(one)  # meanwhile, in this process
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert '"world_size": 2' in stderr.decode()
    two_metrics, one_metrics = RunDir(str(tmp_path / "two")).metrics(), RunDir(str(tmp_path / "one")).metrics()
    assert [m["step"] for m in two_metrics] == list(range(1, steps + 1))  # rank 0 alone writes
    # One AdamW trajectory up to fp32 sum order: per step, u x 1.5e3 x |loss| (recomputation)
    # + 1e-3 of the loss's fall over the run (weights within 1e-3 of the distance travelled,
    # support/numerics.py) + 1e-6 for the 6-decimal metrics. Measured 0 (bound 1.2e-4).
    # Ranks not averaging (each on its own clip) would differ by the clips' loss gap, O(1e-2).
    assert_same_trajectory_scalars(
        [a["loss"] for a in two_metrics], [b["loss"] for b in one_metrics],
        terms=TINY_TEACHER_LOSS_TERMS, decimals=6, what="stage1 ddp losses",
    )
    # Batch 2 vs 2 x batch 1 differ in float rounding, which Adam's normalisation
    # amplifies on near-zero gradients (a LoRA A entry moves ~lr on noise): compare
    # the whole update, which would differ by O(1) if the ranks did not average.
    two = Adapter.load(tmp_path / "two" / "adapter" / "adapter.safetensors")
    ref = Adapter.load(tmp_path / "one" / "adapter" / "adapter.safetensors")
    teacher = load_teacher(TEACHER)
    init = Adapter.create(d_v=ref.d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family,
                          lora_rank=16, seed=0, teacher=teacher)

    def flat(adapter: Adapter) -> torch.Tensor:
        tensors = [*adapter.proj.state_dict().values(), *(adapter.lora_state[k] for k in sorted(init.lora_state))]
        return torch.cat([t.flatten() for t in tensors])

    update = flat(ref) - flat(init)
    assert update.norm() > 0.1
    assert (flat(two) - flat(ref)).norm() < 1e-3 * update.norm()
