"""Student video encoders: the tiny Video-LLaVA preset, loading from checkpoints, plug-ins."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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

from ..support.numerics import assert_fp32_close, max_abs


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
        # Exact: integers after round(); the normalise/denormalise round trip (~6 roundings of
        # <= 255: < 1e-4) stays far inside the 0.5 that rounding absorbs.
        assert torch.equal(values, values[..., :1, :1].expand_as(values))
    white = tiny.preprocess(torch.full((1, 8, 32, 32, 3), 255, dtype=torch.uint8))
    # Exact: 32 px needs no resize, 255 / 255 is 1, and (1 - mean) / std is the same float32
    # expression on both sides.
    assert torch.equal(white[0, 0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


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
    # Exact: the same tower forward on the same (B * T) frames, then the same slice and mean.
    assert torch.equal(features, expected)


def test_grid_pooling_layout(tiny, pixels):
    frame = tiny(pixels)
    full = load_student("tiny-videollava", pooling="grid:4")  # the whole 4x4 patch grid
    tokens = full(pixels)
    assert full.tokens_per_frame == 16 and tokens.shape == (2, 8 * 16, 32)
    # Frame-major order: frame t owns tokens [16t, 16t + 16); their mean is the frame feature.
    # Both sides are means of the same n tokens summed in their own order (strided vs
    # contiguous): each within (n + 2) u max|token| (sum, division), so 2(n + 2) roundings
    # (worst case), max|token| 3.95. n = 16: bound 8.5e-6, measured 0; n = 4 (grid:2 cells):
    # 2.8e-6, measured 1.2e-7. A token in the wrong frame or cell moves a mean by O(|token| / n).
    top = max_abs(tokens)
    assert_fp32_close(tokens.view(2, 8, 16, 32).mean(dim=2), frame, terms=2 * (16 + 2),
                      magnitude=top, what="grid:4 means")
    two = load_student("tiny-videollava", pooling="grid:2")(pixels).view(2, 8, 2, 2, 32)
    grid = tokens.view(2, 8, 4, 4, 32)
    assert_fp32_close(two[:, :, 0, 1], grid[:, :, 0:2, 2:4].mean(dim=(2, 3)), terms=2 * (4 + 2),
                      magnitude=top, what="grid:2 cells")


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
    # 24 -> 20 px: the antialiased bilinear resize of a constant 1 rounds its <= 4 normalised
    # weights and their sum per axis (<= 8 u each, 2 passes), then (x - 0.5) / 0.25 scales the
    # error by 4: 64 u = 32 roundings of 2.0, 3.8e-6; measured 9.5e-7. A wrong mean or std: O(1).
    assert_fp32_close(x, torch.full_like(x, 2.0), terms=32, what="normalised constant")
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


# --- other families: Qwen2.5-VL, InternVL3, LLaVA-NeXT-Video ------------------------------

FAMILIES = {
    # name: (builder, F_V steps for 8 frames, d_v, module of the full model that is E_phi)
    "tiny-qwen2.5-vl": ("build_tiny_qwen2_5_vl", 4, 32, "visual"),
    "tiny-internvl3": ("build_tiny_internvl", 8, 32, "vision_tower"),
    "tiny-llava-next-video": ("build_tiny_llava_next_video", 8, 32, "vision_tower"),
}


def _family_video():
    return torch.randint(
        0, 256, (2, 12, 40, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_feature_shape_gradient_and_determinism(name):
    import vidalign.students as students

    builder, steps, d_v, module = FAMILIES[name]
    encoder = load_student(name).train()
    x = encoder.preprocess(_family_video())
    assert x.shape[:2] == (2, 8)
    features = encoder(x)
    assert features.shape == (2, steps, d_v) and features.dtype == torch.float32
    grid = load_student(name, pooling="grid:2")(x)
    assert grid.shape == (2, steps * 4, d_v)
    # Frame-major: the mean of a step's 2 x 2 grid is its frame feature. Both are means of the
    # same n tokens (the tower's own grid, read with grid:g), in one stage or two: 2(n + 2)
    # roundings of max|token| (as in test_grid_pooling_layout). Measured <= 1.8e-7 (bounds
    # 6.4e-8 (Qwen, measured 0)..8.4e-6). A step's cells from another frame move the mean by
    # O(|token| / n).
    g = getattr(encoder, "patch_grid", None) or encoder.merged_grid
    tokens = load_student(name, pooling=f"grid:{g}")(x)
    assert_fp32_close(grid.view(2, steps, 4, d_v).mean(dim=2), features, terms=2 * (g * g + 2),
                      magnitude=max_abs(tokens), what=f"{name} grid:2 means")

    features.square().sum().backward()
    trainable = [(n, p) for n, p in encoder.tower.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, n

    before = torch.random.get_rng_state()
    again = load_student(name)
    assert torch.equal(torch.random.get_rng_state(), before)
    full = getattr(students, builder)()
    tower = full.model.get_submodule(module).state_dict()
    for (k, a), b in zip(again.tower.state_dict().items(), tower.values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_checkpoint_round_trip(name, tmp_path):
    import vidalign.students as students

    builder = FAMILIES[name][0]
    getattr(students, builder)().save_pretrained(tmp_path)
    tiny = load_student(name)
    x = tiny.preprocess(_family_video())
    loaded = load_student(name, path=str(tmp_path))
    torch.testing.assert_close(loaded(x), tiny(x), rtol=0, atol=0)


def test_qwen_odd_frame_count_repeats_the_last_frame():
    encoder = load_student("tiny-qwen2.5-vl")
    x = encoder.preprocess(_family_video())[:, :7]
    padded = torch.cat([x, x[:, -1:]], dim=1)
    torch.testing.assert_close(encoder(x), encoder(padded), rtol=0, atol=0)
    assert encoder(x).shape == (2, 4, 32)


def test_registry_has_the_real_families():
    expected = {
        "qwen2.5-vl-7b": ("qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
        "internvl3-8b": ("internvl", "OpenGVLab/InternVL3-8B-hf"),
        "llava-next-video-7b": ("llava-next-video", "llava-hf/LLaVA-NeXT-Video-7B-hf"),
    }
    for name, (family, hf_id) in expected.items():
        spec = STUDENT_MODELS[name]
        assert (spec.family, spec.hf_id, spec.tiny) == (family, hf_id, False)


# --- the whole VideoLLM (stage 3 and evaluation) ------------------------------------------

VIDEOLLMS = ["tiny-videollava", "tiny-llava-next-video", "tiny-qwen2.5-vl", "tiny-internvl3"]
PROMPTS = ["Describe the video.", "Which direction does the square move?"]
TARGETS = ["a red square on a gray background moves left", "up"]


def test_tiny_tokenizer_and_chat_template_need_no_download():
    from vidalign.students.videollm import tiny_tokenizer

    tok = tiny_tokenizer("tiny-videollava")
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi?"}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": "up"}]}
    assert tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "USER: <video>\nHi? ASSISTANT: "
    )
    assert tok.apply_chat_template([user, reply], tokenize=False) == "USER: <video>\nHi? ASSISTANT: up</s>"
    ids = tok("<video>ab</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 127 and ids[-1] == tok.eos_token_id == 2 and len(ids) == 4
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    qwen = tiny_tokenizer("tiny-qwen2.5-vl")
    assert qwen.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert qwen.convert_tokens_to_ids("<|video_pad|>") == 126


@pytest.mark.parametrize("name", VIDEOLLMS)
def test_videollm_loss_is_cross_entropy_on_the_targets_only(name):
    from vidalign.students.videollm import IGNORE_INDEX, load_videollm

    llm = load_videollm(name)
    video = _family_video()
    inputs = llm.build_inputs(video, PROMPTS, TARGETS)
    labels = inputs.pop("labels")
    # Labels are exactly the reply tokens (+ end of turn), right-aligned with padding after.
    for row, target in zip(labels, TARGETS, strict=True):
        reply = llm.tokenizer.decode(row[row != IGNORE_INDEX], skip_special_tokens=True)
        assert reply.strip() == target
    assert (inputs["input_ids"] == llm.video_token_id).sum() > 0
    logits = llm.model(**inputs).logits
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    loss = llm.loss(video, PROMPTS, TARGETS)
    # Same logits (same forward); the two cross-entropies differ in reduction order only:
    # a logsumexp over the V-token vocabulary (<= V + 4 roundings of a nat) and a mean of N
    # per-token losses (N roundings of |loss|), each side: 2(V + N + 4) roundings of |loss|
    # (4.9): 1.1e-4 for V = 128, N = 50; measured 0. Loss on the prompt tokens or labels not
    # shifted: O(0.1).
    vocab, targets = logits.shape[-1], int((labels != IGNORE_INDEX).sum())
    assert_fp32_close(loss, expected, terms=2 * (vocab + targets + 4), what=f"{name} loss")
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in llm.encoder.tower.parameters())


@pytest.mark.parametrize("name", VIDEOLLMS)
def test_videollm_batched_greedy_generation_matches_one_by_one(name):
    from vidalign.students.videollm import load_videollm

    llm = load_videollm(name)
    video = _family_video()
    batched = llm.generate(video, PROMPTS, max_new_tokens=5)
    single = [llm.generate(video[i : i + 1], [p], max_new_tokens=5)[0] for i, p in enumerate(PROMPTS)]
    assert batched == single and len(batched) == 2


@pytest.mark.parametrize("name", VIDEOLLMS)
def test_videollm_tower_is_the_stage2_encoder(name):
    from vidalign.students.videollm import load_videollm

    llm = load_videollm(name)
    encoder = load_student(name)
    x = encoder.preprocess(_family_video())
    torch.testing.assert_close(llm.encoder(x), encoder(x), rtol=0, atol=0)
    # A stage-2 state dict (keys tower.*) lands in the model's own tower.
    state = {k: v + 0.01 for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)
    llm.load_encoder_state(state)
    torch.testing.assert_close(llm.encoder(x), encoder(x), rtol=0, atol=0)
    assert llm.encoder.tower is llm.model.model.get_submodule(FAMILY_TOWER[name])
    with pytest.raises(InvalidInput, match="do not fit"):
        llm.load_encoder_state({"tower.nope": torch.zeros(1)})


FAMILY_TOWER = {
    "tiny-videollava": "video_tower",
    "tiny-llava-next-video": "vision_tower",
    "tiny-qwen2.5-vl": "visual",
    "tiny-internvl3": "vision_tower",
}


def test_qwen_patches_follow_qwens_own_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    encoder = load_student("tiny-qwen2.5-vl")
    frame = encoder.preprocess(_family_video())[:1, :1]  # (1, 1, 3, 16, 16)
    patches, grid_thw = encoder.patchify(frame)  # one frame, repeated to a temporal patch
    # An image is a temporal patch of two equal frames in Qwen's image processor.
    expected, gh, gw = Qwen2VLImageProcessorPil().patchify(
        frame[0, 0].numpy(), patch_size=4, merge_size=2, temporal_patch_size=2
    )
    assert grid_thw.tolist() == [[1, gh, gw]] == [[1, 4, 4]]
    # Exact: both are the same float32 values permuted (reshape and transpose only).
    assert torch.equal(patches, torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.parametrize(
    ("name", "hub_prefix", "module_prefix"),
    [
        ("tiny-qwen2.5-vl", "visual.", "model.visual."),
        ("tiny-internvl3", "vision_tower.", "model.vision_tower."),
        ("tiny-llava-next-video", "vision_tower.", "model.vision_tower.vision_model."),
    ],
)
def test_family_checkpoint_key_namings(name, hub_prefix, module_prefix, tmp_path):
    import vidalign.students as students

    getattr(students, FAMILIES[name][0])().save_pretrained(tmp_path / "saved")
    root, tensors = _rewrite(
        tmp_path / "saved",
        tmp_path / "renamed",
        lambda k: module_prefix + k.removeprefix(hub_prefix) if k.startswith(hub_prefix) else k,
    )
    assert any(k.startswith(module_prefix) for k in tensors)
    save_file(tensors, root / "model.safetensors")
    tiny = load_student(name)
    x = tiny.preprocess(_family_video())
    torch.testing.assert_close(load_student(name, path=str(root))(x), tiny(x), rtol=0, atol=0)


# --- the family interface: one module per family -----------------------------------------

FAMILY_MODULES = {
    "video-llava": "vidalign.students.video_llava",
    "qwen2.5-vl": "vidalign.students.qwen2_5_vl",
    "internvl": "vidalign.students.internvl",
    "llava-next-video": "vidalign.students.llava_next_video",
}


def _legacy_param_groups(model):
    """Parameter groups by module-name substrings, the rule the families' declarations replace."""
    groups = {"vision": [], "projector": [], "llm": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "merger" in name or "multi_modal_projector" in name:
            groups["projector"].append(name)
        elif any(k in name for k in ("visual", "video_tower", "vision_tower", "image_tower")):
            groups["vision"].append(name)
        else:
            groups["llm"].append(name)
    return groups


def test_every_family_module_provides_the_whole_interface():
    import dataclasses
    import importlib

    from vidalign.students import FAMILIES as REGISTERED
    from vidalign.students import StudentFamily, get_family

    assert list(REGISTERED) == list(FAMILY_MODULES)
    for name, module_name in FAMILY_MODULES.items():
        family = importlib.import_module(module_name).FAMILY
        assert isinstance(family, StudentFamily) and REGISTERED[name] is family
        for f in dataclasses.fields(StudentFamily):
            if f.name != "projector_modules":
                assert getattr(family, f.name), (name, f.name)
        assert {s.tiny for s in family.students} == {True, False}
        for spec in family.students:
            assert STUDENT_MODELS[spec.name] is spec and spec.family == name
            assert get_family(spec) is get_family(spec.name) is get_family(name) is family
    assert sorted(STUDENT_MODELS) == sorted(s.name for f in REGISTERED.values() for s in f.students)


@pytest.mark.parametrize("name", VIDEOLLMS)
def test_param_groups_follow_the_family_modules(name):
    from peft import LoraConfig, get_peft_model

    from vidalign.students import param_groups
    from vidalign.students.videollm import load_videollm

    llm = load_videollm(name)
    llm.model.requires_grad_(True)
    next(llm.model.model.get_submodule(FAMILY_TOWER[name]).parameters()).requires_grad_(False)

    def names(groups):
        return {k: [n for n, _ in v] for k, v in groups.items()}

    groups = param_groups(llm.model, llm.spec.family)
    assert names(groups) == _legacy_param_groups(llm.model)
    assert all(groups[k] for k in ("vision", "projector", "llm"))
    params = dict(llm.model.named_parameters())
    assert all(params[n] is p and p.requires_grad for v in groups.values() for n, p in v)
    assert names(llm.param_groups()) == names(param_groups(llm.model, name)) == names(groups)
    # Under a peft wrapper (LoRA on the LLM and on vision/projector linears) too.
    targets = ["q_proj", "v_proj", "fc1", "qkv", "linear_1", "linear_2", "mlp.0"]
    wrapped = get_peft_model(llm.model, LoraConfig(r=2, target_modules=targets))
    assert names(param_groups(wrapped, llm.spec)) == _legacy_param_groups(wrapped)


FAKE_FAMILY_MODULE = '''
"""A whole new student family in one module: a Video-LLaVA model read as one token per
frame with its own name, tiny preset and grid."""

from vidalign.students import StudentFamily, StudentSpec, VisionGrid, register_family
from vidalign.students.video_llava import (
    LLAVA_SPECIALS,
    VIDEO_LLAVA_CHAT_TEMPLATE,
    VideoLlavaEncoder,
    build_tiny_video_llava,
)

FAMILY = register_family(
    StudentFamily(
        name="fake-llava",
        students=(
            StudentSpec(
                name="tiny-fake-llava", family="fake-llava", hf_id=None, tiny=True,
                num_frames=4, description="a test family",
            ),
        ),
        model_class="VideoLlavaForConditionalGeneration",
        build_tiny=lambda seed: build_tiny_video_llava(seed + 1),
        tower="model.video_tower",
        make_encoder=lambda spec, tower, config, pooling: VideoLlavaEncoder(
            spec=spec, tower=tower, config=config, pooling=pooling
        ),
        model_type="video_llava",
        checkpoint_prefixes=("model.video_tower.", "video_tower."),
        tiny_specials=LLAVA_SPECIALS,
        tiny_eos="</s>",
        chat_template=VIDEO_LLAVA_CHAT_TEMPLATE,
        placeholder="<video>",
        video_token="<video>",
        inputs=lambda enc, config, pixels: (
            {"pixel_values_videos": pixels},
            "<video>" * (pixels.shape[1] * (enc.patch_grid**2 + 1)),
        ),
        vision_grid=lambda enc, config: VisionGrid(
            enc.num_frames, 1, 1, enc.num_frames * (enc.patch_grid**2 + 1),
            tuple(f * (enc.patch_grid**2 + 1) for f in range(enc.num_frames)), 1, enc.num_frames,
        ),
        vision_modules=("model.video_tower",),
        projector_modules=("model.multi_modal_projector",),
    )
)
'''


@pytest.fixture
def registries():
    """The family and student registries, restored after the test."""
    from vidalign.students import FAMILIES as REGISTERED

    families, students = dict(REGISTERED), dict(STUDENT_MODELS)
    yield
    REGISTERED.clear()
    REGISTERED.update(families)
    STUDENT_MODELS.clear()
    STUDENT_MODELS.update(students)


def test_a_new_family_is_one_module(registries, tmp_path, monkeypatch):
    import importlib
    import sys

    from vidalign.motionenhancer.align import vision_grid
    from vidalign.students import get_family, param_groups, register_family
    from vidalign.students.videollm import load_videollm

    (tmp_path / "fake_family.py").write_text(FAKE_FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fake_family")
    try:
        assert get_family("tiny-fake-llava") is module.FAMILY
        assert STUDENT_MODELS["tiny-fake-llava"].family == "fake-llava"
        encoder = load_student("tiny-fake-llava")
        x = encoder.preprocess(_family_video())
        assert encoder(x).shape == (2, 4, 32)
        llm = load_videollm("tiny-fake-llava")
        assert torch.isfinite(llm.loss(_family_video(), PROMPTS, TARGETS))
        grid = vision_grid(llm)
        assert (grid.frames, grid.size, grid.n_tokens) == (4, 4, 4 * 17)
        groups = param_groups(llm.model, "fake-llava")
        assert [n for n, _ in groups["projector"]] == [
            n for n, _ in llm.model.named_parameters() if "multi_modal_projector" in n
        ]
        with pytest.raises(InvalidInput):
            register_family(module.FAMILY)
    finally:
        sys.modules.pop("fake_family", None)


def test_unknown_family_is_reported():
    from vidalign.students import get_family

    with pytest.raises(NotFound, match="not registered"):
        get_family("no-such-family")
