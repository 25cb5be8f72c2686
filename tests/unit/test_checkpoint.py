"""Local checkpoints: atomic, verified on load, pruned to the newest k."""

import pytest
import torch

from vidalign.checkpoint import LocalCheckpointer
from vidalign.errors import InvalidInput


def save(ckpt, step):
    return ckpt.save(
        step,
        weights={"encoder": {"w": torch.full((3,), float(step))}},
        state={"optimizer": {"lr": 0.1, "step": step}},
        meta={"stage": "test"},
    )


def test_round_trip_and_latest(tmp_path):
    ckpt = LocalCheckpointer(tmp_path, keep_latest_k=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        save(ckpt, step)
    assert ckpt.steps() == [20, 30]  # pruned to 2
    latest = ckpt.latest()
    assert latest.step == 30 and latest.meta == {"stage": "test"}
    assert torch.equal(latest.weights("encoder")["w"], torch.full((3,), 30.0))
    assert latest.state("optimizer") == {"lr": 0.1, "step": 30}


def test_directory_without_manifest_does_not_exist(tmp_path):
    ckpt = LocalCheckpointer(tmp_path)
    path = save(ckpt, 5)
    (path / "manifest.json").unlink()
    assert ckpt.latest() is None


def test_corruption_is_detected(tmp_path):
    ckpt = LocalCheckpointer(tmp_path)
    path = save(ckpt, 5)
    data = bytearray((path / "encoder.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match=r"encoder\.safetensors.*sha256"):
        ckpt.load(5)
