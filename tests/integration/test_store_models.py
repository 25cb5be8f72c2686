"""Weights, adapters and cached latents come from store URIs (both backends)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vidalign.errors import NotFound
from vidalign.hub import pull, weights_component
from vidalign.store import list_artifacts, open_store
from vidalign.students import load_student
from vidalign.students.video_llava import build_tiny_video_llava
from vidalign.teacher.denoising import TeacherEngine
from vidalign.teacher.protocol import DenoisingLossRequest
from vidalign.vda import load_teacher, tiny_components
from vidalign.vda.adapter import file_digest
from vidalign_teacher.server import ServerConfig, TeacherServer


@pytest.fixture
def staged_dirs(tmp_path):
    """Local copies of tiny weights in the layouts the real hub repos use."""
    src = tmp_path / "src"
    for name, component in tiny_components("animatediff").items():
        component.save_pretrained(src / "motion_adapter" if name == "motion_adapter" else src / "base" / name)
    build_tiny_video_llava().save_pretrained(src / "model")
    return src


def test_pull_and_serve_from_the_store(store_uri, staged_dirs, adapter_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    uri = f"{store_uri}/models/animatediff-v1-5-2"
    staged = pull("animatediff-v1-5-2", uri, source_dir=str(staged_dirs))
    assert set(staged) == {"base", "motion_adapter"}
    assert list_artifacts(open_store(uri)) == ["base", "motion_adapter"]

    # The adapter travels through the store too.
    adapter_uri = f"{store_uri}/adapters/a.safetensors"
    open_store(f"{store_uri}/adapters").put_file("a.safetensors", adapter_paths["tiny-animatediff"])

    server = TeacherServer(ServerConfig(
        model="animatediff-v1-5-2", weights=uri, adapters=[adapter_uri], host="127.0.0.1", port=0,
        device="cpu",
    ))
    server.start()
    try:
        engine = server.servicer.engine
        assert [a.id for a in engine.info().adapters] == [file_digest(adapter_paths["tiny-animatediff"])]
        assert engine.info().adapters[0].source == adapter_uri
        reference = load_teacher("tiny-animatediff")
        z, t, c = torch.randn(1, 4, 8, 16, 16), torch.tensor([500]), torch.randn(1, 5, reference.cond_dim)
        assert torch.equal(engine.teacher.predict_noise(z, t, c), reference.predict_noise(z, t, c))
    finally:
        server.stop(grace=0)


def test_pull_a_student_and_load_its_encoder(store_uri, staged_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    uri = f"{store_uri}/models/video-llava-7b"
    assert set(pull("video-llava-7b", uri, source_dir=str(staged_dirs))) == {"model"}
    encoder = load_student("video-llava-7b", path=weights_component(uri, "model"))
    tiny = load_student("tiny-videollava")
    video = torch.randint(0, 256, (1, 8, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(encoder(encoder.preprocess(video)), tiny(tiny.preprocess(video)))


def test_pull_errors():
    with pytest.raises(NotFound, match="not in the registry"):
        pull("no-such-model", "/tmp/x")
    proc = subprocess.run(
        [sys.executable, "-m", "vidalign_cli.main", "models", "pull", "tiny-animatediff", "--out", "/tmp/x"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "random-init preset" in proc.stderr


def test_latents_are_cached_in_the_store(store_uri):
    teacher = load_teacher("tiny-animatediff")
    latent_store = open_store(f"{store_uri}/latents")
    pixels = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    request = DenoisingLossRequest(sample_ids=["a", "b"], pixels=pixels, captions=["x", "y"], seed=1)
    first = TeacherEngine(teacher, latent_store=latent_store).denoising_loss(request)
    assert len(latent_store.list()) == 2  # one object per video

    # A new replica (empty memory) reads them back instead of running the VAE.
    replica = TeacherEngine(load_teacher("tiny-animatediff"), latent_store=latent_store)

    def no_vae(_):
        raise AssertionError("the VAE ran although the latents were in the store")

    replica.teacher.encode_video = no_vae
    again = replica.denoising_loss(request)
    assert torch.equal(first.losses, again.losses)
