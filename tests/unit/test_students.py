"""Student video encoders: the tiny Video-LLaVA preset, loading from checkpoints, plug-ins."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vidalign.errors import InvalidInput, NotFound
from vidalign.students import (
    CLIP_MEAN,
    CLIP_STD,
    STUDENT_MODELS,
    VideoEncoder,
    build_tiny_video_llava,
    load_student,
)


@pytest.fixture(scope="module")
def tiny():
    return load_student("tiny-videollava")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The whole tiny VideoLLM as save_pretrained writes it (one safetensors file)."""
    root = tmp_path_factory.mktemp("tiny-videollava")
    build_tiny_video_llava().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pixels(tiny):
    video = torch.randint(
        0, 256, (2, 12, 40, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return tiny.preprocess(video)


def _rewrite(checkpoint, dest, rename):
    """Copy ``checkpoint`` with every tensor key passed through ``rename`` (None drops it)."""
    dest.mkdir()
    shutil.copy(checkpoint / "config.json", dest / "config.json")
    tensors = {}
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open is not a Mapping
            new = rename(key)
            if new is not None:
                tensors[new] = f.get_tensor(key)
    return dest, tensors


def test_registry_names_and_unknown_name():
    assert STUDENT_MODELS["tiny-videollava"].tiny
    real = STUDENT_MODELS["video-llava-7b"]
    assert (real.family, real.hf_id, real.num_frames) == (
        "video-llava",
        "LanguageBind/Video-LLaVA-7B-hf",
        8,
    )
    with pytest.raises(NotFound, match="tiny-videollava"):
        load_student("no-such-student")


def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone(tiny):
    before = torch.random.get_rng_state()
    again = load_student("tiny-videollava")
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (tiny.d_v, tiny.num_frames, tiny.image_size, tiny.pooling) == (32, 8, 32, "frame")
    assert set(dict(tiny.named_parameters())) == {
        f"tower.{n}" for n, _ in tiny.tower.named_parameters()
    }


def test_preprocess_samples_frames_uniformly_and_normalises():
    tiny = load_student("tiny-videollava")
    for n in (16, 3):
        # Frame k is filled with the value k, so the sampled indices can be read back.
        video = (
            torch.arange(n, dtype=torch.uint8)
            .view(1, n, 1, 1, 1)
            .expand(2, n, 20, 44, 3)
            .contiguous()
        )
        x = tiny.preprocess(video)
        assert x.shape == (2, 8, 3, 32, 32) and x.dtype == torch.float32
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        values = ((x * std + mean) * 255).round()
        expected = np.linspace(0, n - 1, 8).round()
        assert torch.equal(values[0, :, 0, 0, 0], torch.tensor(expected, dtype=torch.float32))
        assert torch.allclose(values, values[..., :1, :1].expand_as(values))
    white = tiny.preprocess(torch.full((1, 8, 32, 32, 3), 255, dtype=torch.uint8))
    assert torch.allclose(
        white[0, 0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    )


@pytest.mark.parametrize(
    ("video", "match"),
    [
        (torch.zeros(1, 8, 32, 32, 3), "uint8"),
        (torch.zeros(8, 32, 32, 3, dtype=torch.uint8), r"\(B, F, H, W, 3\)"),
        (torch.zeros(1, 8, 32, 32, 4, dtype=torch.uint8), r"got \[1, 8, 32, 32, 4\]"),
        (torch.zeros(1, 0, 32, 32, 3, dtype=torch.uint8), "empty"),
        (np.zeros((1, 8, 32, 32, 3), dtype=np.uint8), "torch.Tensor"),
    ],
)
def test_preprocess_rejects_bad_video(tiny, video, match):
    with pytest.raises(InvalidInput, match=match):
        tiny.preprocess(video)


def test_frame_features_are_the_models_own_hidden_states(tiny, pixels):
    features = tiny(pixels)
    assert features.shape == (2, 8, 32) and features.dtype == torch.float32
    model = build_tiny_video_llava()
    assert (
        model.config.vision_feature_layer == -2
        and model.config.vision_feature_select_strategy == "default"
    )
    with torch.no_grad():
        hidden = model.model.get_video_features(pixels, output_hidden_states=True).hidden_states[-2]
    expected = hidden[:, 1:].mean(dim=1).view(2, 8, 32)  # patch tokens only, CLS dropped
    torch.testing.assert_close(features, expected)


def test_grid_pooling_layout(tiny, pixels):
    frame = tiny(pixels)
    full = load_student("tiny-videollava", pooling="grid:4")  # the whole 4x4 patch grid
    tokens = full(pixels)
    assert full.tokens_per_frame == 16 and tokens.shape == (2, 8 * 16, 32)
    # Frame-major order: frame t owns tokens [16t, 16t + 16); their mean is the frame feature.
    torch.testing.assert_close(tokens.view(2, 8, 16, 32).mean(dim=2), frame)
    two = load_student("tiny-videollava", pooling="grid:2")(pixels).view(2, 8, 2, 2, 32)
    grid = tokens.view(2, 8, 4, 4, 32)
    torch.testing.assert_close(two[:, :, 0, 1], grid[:, :, 0:2, 2:4].mean(dim=(2, 3)))


@pytest.mark.parametrize("pooling", ["mean", "grid:0", "grid:x", "grid:5"])
def test_bad_pooling_is_rejected(pooling):
    with pytest.raises(InvalidInput, match="pooling"):
        load_student("tiny-videollava", pooling=pooling)


def test_gradient_reaches_the_tower_and_unused_layers_are_frozen(pixels):
    encoder = load_student("tiny-videollava").train()
    encoder(pixels).square().sum().backward()
    for name, param in encoder.tower.named_parameters():
        # The feature layer is -2 of 2 layers: layer 1 and post_layernorm cannot affect F_V.
        unused = name.startswith(("encoder.layers.1.", "post_layernorm."))
        assert param.requires_grad != unused, name
        if not unused:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_forward_rejects_bad_pixels(tiny):
    with pytest.raises(InvalidInput, match=r"\(B, T, 3, 32, 32\)"):
        tiny(torch.zeros(1, 8, 3, 24, 24))
    with pytest.raises(InvalidInput, match="floating-point"):
        tiny(torch.zeros(1, 8, 3, 32, 32, dtype=torch.uint8))


def test_low_precision_tower_still_returns_float32(pixels):
    encoder = load_student("tiny-videollava", dtype=torch.bfloat16)
    assert next(encoder.parameters()).dtype == torch.bfloat16
    assert encoder(pixels).dtype == torch.float32


def test_loading_from_a_checkpoint_reads_only_the_tower(tiny, pixels, checkpoint):
    expected = tiny(pixels)
    for name in ("tiny-videollava", "video-llava-7b"):
        loaded = load_student(name, path=str(checkpoint))
        assert loaded.spec.name == name
        torch.testing.assert_close(loaded(pixels), expected, rtol=0, atol=0)


def test_sharded_checkpoint(tiny, pixels, tmp_path):
    build_tiny_video_llava().save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    torch.testing.assert_close(
        load_student("video-llava-7b", path=str(tmp_path))(pixels), tiny(pixels), rtol=0, atol=0
    )


def test_hub_download_fetches_only_the_tower_shards(tiny, pixels, tmp_path, monkeypatch):
    import huggingface_hub

    build_tiny_video_llava().save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    tower_shards = {f for k, f in weight_map.items() if k.startswith("video_tower.")}
    requests = []

    def snapshot_download(repo_id, allow_patterns):
        requests.append((repo_id, sorted(allow_patterns)))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    features = load_student("video-llava-7b")(pixels)
    torch.testing.assert_close(features, tiny(pixels), rtol=0, atol=0)
    hf_id = "LanguageBind/Video-LLaVA-7B-hf"
    assert requests == [
        (hf_id, ["config.json", "model.safetensors.index.json"]),
        (hf_id, sorted(tower_shards)),
    ]
    assert len(tower_shards) < len(set(weight_map.values()))


@pytest.mark.parametrize(
    "prefix",
    ["video_tower.vision_model.", "model.video_tower.", "model.video_tower.vision_model."],
    ids=["hub-original", "transformers5-modules", "mixed"],
)
def test_checkpoint_key_namings(tiny, pixels, checkpoint, tmp_path, prefix):
    root, tensors = _rewrite(
        checkpoint,
        tmp_path / "ckpt",
        lambda k: prefix + k.removeprefix("video_tower.") if k.startswith("video_tower.") else k,
    )
    save_file(tensors, root / "model.safetensors")
    torch.testing.assert_close(
        load_student("video-llava-7b", path=str(root))(pixels), tiny(pixels), rtol=0, atol=0
    )


def test_tower_key_mismatches_are_reported(checkpoint, tmp_path):
    root, tensors = _rewrite(
        checkpoint,
        tmp_path / "missing",
        lambda k: None if k == "video_tower.pre_layrnorm.weight" else k,
    )
    save_file(tensors, root / "model.safetensors")
    with pytest.raises(InvalidInput, match=r"missing \(1\): \['pre_layrnorm.weight'\]"):
        load_student("video-llava-7b", path=str(root))

    root, tensors = _rewrite(checkpoint, tmp_path / "unexpected", lambda k: k)
    tensors["video_tower.extra.weight"] = torch.zeros(2)
    tensors["video_tower.pre_layrnorm.bias"] = torch.zeros(7)
    save_file(tensors, root / "model.safetensors")
    with pytest.raises(
        InvalidInput,
        match=r"unexpected \(1\): \['extra.weight'\].*wrong shape \(1\): \['pre_layrnorm.bias \(7,\) != \(32,\)'\]",
    ):
        load_student("video-llava-7b", path=str(root))

    root, tensors = _rewrite(checkpoint, tmp_path / "twice", lambda k: k)
    tensors["model.video_tower.pre_layrnorm.bias"] = tensors[
        "video_tower.pre_layrnorm.bias"
    ].clone()
    save_file(tensors, root / "model.safetensors")
    with pytest.raises(InvalidInput, match="two names"):
        load_student("video-llava-7b", path=str(root))


def test_missing_checkpoint_pieces(checkpoint, tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        load_student("video-llava-7b", path=str(tmp_path / "nowhere"))
    (tmp_path / "no-weights").mkdir()
    shutil.copy(checkpoint / "config.json", tmp_path / "no-weights" / "config.json")
    with pytest.raises(NotFound, match=r"model\.safetensors"):
        load_student("video-llava-7b", path=str(tmp_path / "no-weights"))
    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "config.json").write_text(
        json.dumps({"model_type": "clip_vision_model"})
    )
    with pytest.raises(InvalidInput, match="video_llava"):
        load_student("video-llava-7b", path=str(tmp_path / "other-model"))


class _FrameMeanConv(nn.Module):
    """A plug-in encoder: one conv per frame, averaged over space."""

    def __init__(self, d: int):
        super().__init__()
        self.conv = nn.Conv2d(3, d, kernel_size=3, padding=1)

    def forward(self, pixel_values):
        b, t = pixel_values.shape[:2]
        return self.conv(pixel_values.flatten(0, 1)).mean(dim=(2, 3)).view(b, t, -1)


def test_any_module_can_be_wrapped():
    encoder = VideoEncoder.from_module(
        _FrameMeanConv(16),
        d_v=16,
        num_frames=4,
        image_size=20,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    assert encoder.spec.family == "custom" and encoder.tokens_per_frame == 1
    x = encoder.preprocess(torch.full((3, 10, 24, 24, 3), 255, dtype=torch.uint8))
    assert x.shape == (3, 4, 3, 20, 20)
    assert torch.allclose(x, torch.full_like(x, 2.0))
    features = encoder(x)
    assert features.shape == (3, 4, 16)
    features.sum().backward()
    assert encoder.tower.conv.weight.grad is not None

    wrong = VideoEncoder.from_module(
        _FrameMeanConv(16), d_v=8, num_frames=4, image_size=20, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    with pytest.raises(InvalidInput, match=r"expected shape \(3, 4, 8\).*got \(3, 4, 16\)"):
        wrong(x)
    with pytest.raises(InvalidInput, match="std > 0"):
        VideoEncoder.from_module(
            _FrameMeanConv(4), d_v=4, num_frames=4, image_size=20, mean=(0.5,) * 3, std=(0.0,) * 3
        )
