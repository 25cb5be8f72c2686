"""The adapter file's UNet LoRA in diffusers' and peft's layout, read back by their own loaders."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AnimateDiffPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open

from vidalign.errors import InvalidInput
from vidalign.vda import Adapter, DiffusionTeacher, load_teacher
from vidalign.vda.adapter import METADATA_KEY

D_V = 12
# alpha != rank: a loader that ignores the file's LoRA config scales the LoRA by 1, not 2.
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module", autouse=True)
def _tokenizer_cache(tmp_path_factory):
    """Generate the tiny tokenizer's files in a temporary cache, not in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIDALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### The stage-1 LoRA in diffusers and peft"


def _readme_code(call: str) -> str:
    """The README section's python block that contains ``call``: the tests run what users read."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    end = re.search(r"\n#{2,3} ", section[len(SECTION) :])  # the next (sub)section
    section = section[: len(SECTION) + end.start()] if end else section
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if call in b]
    return block


def _inputs(teacher: DiffusionTeacher):
    g = torch.Generator().manual_seed(7)
    z_t = torch.randn(1, teacher.latent_channels, 4, 8, 8, generator=g)
    return z_t, torch.tensor([500]), torch.randn(1, 5, teacher.cond_dim, generator=g)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Both sides run the same fp32 UNet with the same LoRA weights and scale; at
    # most the summation order of a few adds may differ, i.e. a few ulps of the
    # output's magnitude: 16 * eps(fp32) * max|ref| (~2e-6 here, while the LoRA
    # moves the output by ~1e-1, see the `lora` fixture).
    tol = 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol


@pytest.fixture(scope="module", params=["tiny-animatediff", "tiny-sd15"])
def lora(request, tmp_path_factory):
    """A saved adapter with a non-zero LoRA, and the teacher's output through vidalign's attach path."""
    teacher = load_teacher(request.param)
    adapter = Adapter.create(
        d_v=D_V,
        cond_dim=teacher.cond_dim,
        teacher_family=teacher.family,
        seed=2,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        teacher=teacher,
    )
    g = torch.Generator().manual_seed(3)
    for value in adapter.lora_state.values():  # peft's init has B = 0: make the LoRA act
        value.copy_(0.05 * torch.randn(value.shape, generator=g))
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    adapter.save(path)
    inputs = _inputs(teacher)
    base = teacher.predict_noise(*inputs)
    teacher.attach_lora(adapter.lora_name, adapter.lora_config(), adapter.lora_state)
    with teacher.lora(adapter.lora_name), torch.no_grad():
        ref = teacher.predict_noise(*inputs)
    assert (ref - base).abs().max().item() > 1e-2  # the LoRA changes the output
    return {"name": request.param, "adapter": adapter, "path": path, "ref": ref}


def test_adapter_file_holds_the_lora_in_diffusers_layout(lora):
    adapter, path = lora["adapter"], lora["path"]
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {f"proj.{k}" for k in adapter.proj.state_dict()} | {
        f"unet.{k}" for k in adapter.lora_state
    }
    assert all(
        k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys if k.startswith("unet.")
    )
    assert json.loads(metadata["lora_adapter_metadata"]) == {
        "unet.r": RANK,
        "unet.lora_alpha": ALPHA,
        "unet.target_modules": adapter.lora_targets,
    }
    assert json.loads(metadata[METADATA_KEY])["format_version"] == 2
    # The header lists its metadata in sorted order, so the bytes (the adapter id)
    # do not depend on the order safetensors' hash map happens to iterate in.
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert list(header["__metadata__"]) == sorted(metadata)
    digests = {adapter.save(path.with_name(f"again-{i}.safetensors")) for i in range(16)}
    assert digests == {"sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}


def test_unet_load_lora_adapter_as_documented_matches_the_attach_path(lora, tmp_path, monkeypatch):
    fresh = load_teacher(lora["name"])  # a UNetMotionModel or a UNet2DConditionModel
    unet = fresh.unet
    shutil.copyfile(lora["path"], tmp_path / "adapter.safetensors")
    monkeypatch.chdir(tmp_path)
    code = _readme_code("unet.load_lora_adapter(")
    assert 'prefix="unet"' in code
    exec(code, {"unet": unet})
    assert (unet.peft_config["vda"].r, unet.peft_config["vda"].lora_alpha) == (RANK, ALPHA)
    with torch.no_grad():
        out = fresh.predict_noise(*_inputs(fresh))
    _close(out, lora["ref"])


def test_pipeline_load_lora_weights_matches_the_attach_path(lora, tmp_path, monkeypatch):
    if lora["name"] != "tiny-animatediff":
        pytest.skip("the AnimateDiff pipeline needs the motion UNet")
    fresh = load_teacher(lora["name"])
    pipe = AnimateDiffPipeline(
        vae=fresh.vae,
        text_encoder=fresh.text_encoder,
        tokenizer=fresh.tokenizer,
        unet=fresh.unet,
        motion_adapter=None,
        scheduler=fresh.scheduler,
    )
    # README: the LoRA alone, as diffusers' training scripts write it, then the pipeline's loader.
    shutil.copyfile(lora["path"], tmp_path / "adapter.safetensors")
    monkeypatch.chdir(tmp_path)
    exec(_readme_code("pipe.load_lora_weights("), {"pipe": pipe})
    assert [p.name for p in (tmp_path / "vda-lora").iterdir()] == [
        "pytorch_lora_weights.safetensors"
    ]
    assert pipe.unet is fresh.unet and pipe.unet.peft_config["vda"].lora_alpha == ALPHA
    with torch.no_grad():
        out = fresh.predict_noise(*_inputs(fresh))
    _close(out, lora["ref"])


def test_peft_loads_the_file_without_vidalign(lora):
    fresh = load_teacher(lora["name"])
    tensors = safetensors.torch.load_file(lora["path"])
    with safe_open(lora["path"], framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    config = LoraConfig(**{k.removeprefix("unet."): v for k, v in meta.items()})
    state = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    inject_adapter_in_model(config, fresh.unet, adapter_name="vda")
    result = set_peft_model_state_dict(fresh.unet, state, adapter_name="vda")
    assert not result.unexpected_keys
    with torch.no_grad():
        out = fresh.predict_noise(*_inputs(fresh))
    _close(out, lora["ref"])


def test_format_version_1_files_still_load(lora, tmp_path):
    """Version 1 kept the LoRA under ``lora.``: such files load, with the digest of their bytes."""
    adapter = lora["adapter"]
    tensors = {f"proj.{k}": v for k, v in adapter.proj.state_dict().items()}
    tensors |= {f"lora.{k}": v for k, v in adapter.lora_state.items()}
    fields = {"format_version": 1, **adapter._fields()}
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(fields)})
    old = tmp_path / "v1.safetensors"
    old.write_bytes(data)
    loaded = Adapter.load(old)
    assert loaded.digest == loaded.lora_name == "sha256:" + hashlib.sha256(data).hexdigest()
    assert loaded.lora_state.keys() == adapter.lora_state.keys()
    assert all(torch.equal(loaded.lora_state[k], v) for k, v in adapter.lora_state.items())
    # Re-saved, it is a version-2 file with the same weights.
    assert loaded.save(tmp_path / "v2.safetensors") == adapter.digest

    fresh = load_teacher(lora["name"])
    fresh.attach_lora(loaded.lora_name, loaded.lora_config(), loaded.lora_state)
    with fresh.lora(loaded.lora_name), torch.no_grad():
        out = fresh.predict_noise(*_inputs(fresh))
    _close(out, lora["ref"])


def test_unknown_format_versions_and_stray_tensors_are_rejected(lora, tmp_path):
    adapter = lora["adapter"]
    tensors = {f"proj.{k}": v for k, v in adapter.proj.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in adapter.lora_state.items()}
    for version, name in ((3, "v3"), (1, "v1-with-v2-keys")):
        path = tmp_path / f"{name}.safetensors"
        fields = {"format_version": version, **adapter._fields()}
        safetensors.torch.save_file(tensors, path, metadata={METADATA_KEY: json.dumps(fields)})
        with pytest.raises(InvalidInput, match=str(path)):
            Adapter.load(path)
    plain = Adapter.create(
        d_v=D_V, cond_dim=adapter.cond_dim, teacher_family=adapter.teacher_family
    )
    with pytest.raises(InvalidInput, match="no LoRA"):
        plain.save_lora_weights(tmp_path / "none")
