"""Checkpoints on both store backends: atomic, verified on load, pruned to the newest k."""

import pytest
import torch

from vidalign.checkpoint import Checkpointer, rng_state, set_rng_state
from vidalign.store import ArtifactCorrupted, open_store


def save(ckpt, step):
    return ckpt.save(
        step,
        weights={"encoder": {"w": torch.full((3,), float(step))}},
        state={"optimizer": {"lr": 0.1, "step": step}, "rng": rng_state()},
        trainer_state={"samples_seen": step * 2},
        producer="test",
        config_digest="sha256:cfg",
        meta={"stage": "test"},
        extra_files={"metrics.jsonl": b'{"step": 1}\n'},
    )


def test_round_trip_latest_and_prune(store_uri, tmp_path):
    ckpt = Checkpointer(open_store(store_uri), keep_latest_k=2, cache_dir=tmp_path / "cache")
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        save(ckpt, step)
    latest = ckpt.latest()
    assert latest.step == 30 and latest.meta == {"stage": "test"}
    assert torch.equal(latest.weights("encoder")["w"], torch.full((3,), 30.0))
    assert latest.state("optimizer") == {"lr": 0.1, "step": 30}
    assert latest.trainer_state() == {"step": 30, "samples_seen": 60}
    assert latest.file("metrics.jsonl").read_bytes() == b'{"step": 1}\n'
    names = {k.split("/")[0] for k in open_store(store_uri).list()}
    assert names == {"step-00000020", "step-00000030"}  # pruned to 2


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_corruption_is_detected(store_uri, tmp_path):
    store = open_store(store_uri)
    ckpt = Checkpointer(store, cache_dir=tmp_path / "cache")
    save(ckpt, 5)
    data = bytearray(store.get_bytes("step-00000005/encoder.safetensors"))
    data[-1] ^= 0xFF
    store.put_bytes("step-00000005/encoder.safetensors", bytes(data))
    with pytest.raises(ArtifactCorrupted, match=r"encoder\.safetensors"):
        ckpt.latest()
