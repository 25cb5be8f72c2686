"""Shared fixtures: tiny models, adapters and teacher servers on loopback.

Servers are real gRPC servers bound to 127.0.0.1 on a free port, started once
per test session; tests never reach the network and never download weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

TEACHERS = ("tiny-animatediff", "tiny-sd15")
STUDENT = "tiny-videollava"

# Small limits so that "over the limit" tests stay cheap.
MAX_MESSAGE_BYTES = 4 << 20
MAX_REQUEST_BYTES = 32 << 20


@pytest.fixture(scope="session")
def adapter_paths(tmp_path_factory) -> dict[str, Path]:
    """A W_proj-only adapter and a W_proj + LoRA adapter (non-zero LoRA) per teacher."""
    from vidalign.students import load_student
    from vidalign.vda import Adapter, load_teacher

    d_v = load_student(STUDENT).d_v
    root = tmp_path_factory.mktemp("adapters")
    paths: dict[str, Path] = {}
    for name in TEACHERS:
        teacher = load_teacher(name)
        plain = Adapter.create(d_v=d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family, seed=1)
        paths[name] = root / f"{name}.safetensors"
        plain.save(paths[name])
        lora = Adapter.create(
            d_v=d_v, cond_dim=teacher.cond_dim, teacher_family=teacher.family, seed=2,
            lora_rank=4, teacher=teacher,
        )
        # peft initialises B = 0 (a no-op LoRA); make it act so the test can see it.
        g = torch.Generator().manual_seed(3)
        for value in lora.lora_state.values():
            value.copy_(0.05 * torch.randn(value.shape, generator=g))
        paths[f"{name}+lora"] = root / f"{name}-lora.safetensors"
        lora.save(paths[f"{name}+lora"])
    return paths


def _start(model: str, adapters: list[Path]):
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(
        ServerConfig(
            model=model,
            host="127.0.0.1",
            port=0,
            adapters=[str(a) for a in adapters],
            device="cpu",
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_request_bytes=MAX_REQUEST_BYTES,
            workers=4,
        )
    )
    server.start()
    return server


@pytest.fixture(scope="session")
def teacher_servers(adapter_paths) -> Iterator[dict[str, str]]:
    """model name -> "127.0.0.1:port" of a running teacher with both adapters loaded."""
    servers = {
        name: _start(name, [adapter_paths[name], adapter_paths[f"{name}+lora"]]) for name in TEACHERS
    }
    yield {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}
    for server in servers.values():
        server.stop(grace=0)


# --- object stores ---------------------------------------------------------

S3_BUCKET = "vidalign-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback with access-key authentication."""
    from minio import Minio

    from tests.support.s3server import WeedS3

    server = WeedS3(tmp_path_factory.mktemp("weed"))
    server.start()
    env = server.env()
    Minio(
        server.endpoint.split("//")[1],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    ).make_bucket(S3_BUCKET)
    yield server
    server.stop()


def _s3_root(request, monkeypatch) -> str:
    server = request.getfixturevalue("s3_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VIDALIGN_S3_RETRIES", "1")
    return f"s3://{S3_BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{os.getpid()}"


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch) -> str:
    """A fresh, empty store root on each backend: the same tests run against both."""
    if request.param == "local":
        return str(tmp_path / "store")
    return _s3_root(request, monkeypatch)


@pytest.fixture
def s3_uri(request, monkeypatch) -> str:
    """A fresh, empty root on the test S3 server, its credentials in the environment."""
    return _s3_root(request, monkeypatch)
