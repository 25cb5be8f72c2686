"""CogVideoX teacher backend, DDIM inversion and end-to-end prior extraction (tiny preset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from vidalign.data.toy import moving_squares
from vidalign.errors import InvalidInput, NotFound
from vidalign.motionenhancer import inversion
from vidalign.motionenhancer.cogvideox import (
    COGVIDEOX_MODELS,
    CogVideoXTeacher,
    load_cogvideox,
    tiny_t5_tokenizer,
)
from vidalign.motionenhancer.inversion import ddim_denoise, ddim_invert, extract_priors

from ..support.numerics import assert_fp32_close


@pytest.fixture(scope="module")
def teacher():
    return load_cogvideox("tiny-cogvideox")


@pytest.fixture(scope="module")
def clip():
    return moving_squares(1, frames=10, size=32, seed=3)[0]


def test_registry_holds_real_ids_and_facts() -> None:
    assert COGVIDEOX_MODELS["cogvideox-5b"].repo == "THUDM/CogVideoX-5b"
    assert COGVIDEOX_MODELS["cogvideox1.5-5b"].repo == "THUDM/CogVideoX1.5-5B"
    for name in ("cogvideox-5b", "cogvideox1.5-5b"):
        spec = COGVIDEOX_MODELS[name]
        assert not spec.tiny and spec.max_text_len == 226 and spec.frames % 4 == 1
    assert (COGVIDEOX_MODELS["cogvideox-5b"].height, COGVIDEOX_MODELS["cogvideox-5b"].width) == (
        480,
        720,
    )
    assert COGVIDEOX_MODELS["tiny-cogvideox"].repo is None
    with pytest.raises(NotFound, match="known"):
        load_cogvideox("no-such-model")


def test_tiny_preset_structure(teacher) -> None:
    config = teacher.transformer.config
    assert config.use_rotary_positional_embeddings
    assert (config.num_attention_heads, config.attention_head_dim, config.num_layers) == (2, 16, 2)
    assert config.text_embed_dim == 32 == teacher.text_encoder.config.d_model
    assert (teacher.vae_scale_spatial, teacher.vae_scale_temporal) == (4, 4)
    assert not any(p.requires_grad for p in teacher.transformer.parameters())


def test_tokenizer_offsets_are_word_or_character_spans() -> None:
    tok = tiny_t5_tokenizer(24)
    prompt = "a red square zooms"
    enc = tok(prompt, padding="max_length", max_length=24, return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    # Caption words (vidalign.data.synth_vocab) are one token each; "zooms" is not one:
    # it falls back to one token per character, its first marked as a word start.
    assert pieces[:9] == ["▁a", "▁red", "▁square", "▁z", "o", "o", "m", "s", "</s>"]
    assert pieces[-1] == "<pad>" and sum(enc["attention_mask"]) == 9
    spans = enc["offset_mapping"][:8]
    assert [prompt[a:b] for a, b in spans] == ["a", "red", "square", "z", "o", "o", "m", "s"]


def test_save_and_load_round_trip(teacher, clip, tmp_path) -> None:
    teacher.save_pretrained(tmp_path)
    loaded = load_cogvideox(str(tmp_path))
    assert loaded.spec.max_text_len == teacher.spec.max_text_len
    assert (loaded.spec.height, loaded.spec.frames) == (32, 9)
    again = load_cogvideox("tiny-cogvideox", repo=str(tmp_path))
    latents = teacher.encode_video(clip.video)
    assert latents.shape == (1, 3, 4, 8, 8)  # 10 frames -> 9 used -> 3 latent frames
    # Exact: safetensors stores the float32 weights bit for bit, and the reloaded modules run
    # the same CPU kernels on the same inputs in this process (fixed thread count: the same
    # reduction order). A weight lost or re-initialised on load changes outputs by O(1).
    assert torch.equal(again.encode_video(clip.video), latents)
    a, b = teacher.encode_prompt(clip.caption), loaded.encode_prompt(clip.caption)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.embeds, b.embeds)
    t = torch.tensor([500])
    outs = [
        m.transformer(
            hidden_states=latents,
            encoder_hidden_states=a.embeds,
            timestep=t,
            image_rotary_emb=m.rotary_emb(latents),
        ).sample
        for m in (teacher, loaded)
    ]
    assert torch.equal(outs[0], outs[1])  # exact, as above
    with pytest.raises(NotFound):
        load_cogvideox(str(tmp_path / "vae"))


def test_video_validation(teacher) -> None:
    with pytest.raises(InvalidInput, match="uint8"):
        teacher.encode_video(np.zeros((9, 32, 32, 3), dtype=np.float32))
    with pytest.raises(InvalidInput, match="multiples of 8"):
        teacher.encode_video(np.zeros((9, 30, 32, 3), dtype=np.uint8))


def test_inversion_is_exact_with_a_consistent_predictor(teacher, monkeypatch) -> None:
    """With the ideal v-predictor of a point mass at x0, DDIM inversion + denoising is exact:
    checks the scheduler pairing (copied alphas_cumprod, clip_sample=False, timesteps)."""
    x0 = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    alphas = teacher.scheduler.alphas_cumprod

    def oracle(_teacher, latents, _embeds, t):
        a = alphas[int(t)].to(latents.dtype)
        target = x0.repeat(len(latents) // len(x0), 1, 1, 1, 1)
        eps = (latents - a.sqrt() * target) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * target

    monkeypatch.setattr(inversion, "_predict", oracle)
    trajectory = ddim_invert(teacher, x0, torch.zeros(1, 4, 32), steps=5)
    assert len(trajectory) == 5
    assert (trajectory[-1] - x0).abs().max() > 0.5  # the inversion moved
    recon = ddim_denoise(teacher, trajectory[-1], torch.zeros(1, 4, 32), steps=5, guidance=1.0)
    # Exact in real arithmetic; in fp32, 10 DDIM steps of ~10 roundings each on values up to
    # max|x0| (4.1), the oracle's 1/sqrt(1 - alpha) amplifying them <= 2x (alpha <= 0.74 at
    # t >= 199): 200 x u x 4.1 = 4.9e-5. Measured 2.4e-7 (1 ulp at 4). The walk moved 5.1:
    # a step that does not undo its inverse (an x0 prediction clipped to [-1, 1] while
    # |x0| reaches 4.1, a step lost) leaves errors of O(1), 1e4x the bound.
    assert_fp32_close(recon, x0, terms=200, what="DDIM inversion round trip")


def test_tiny_model_reconstruction_improves_with_steps(teacher, clip) -> None:
    latents = teacher.encode_video(clip.video)
    embeds = teacher.encode_prompt(clip.caption).embeds
    errors = {}
    for steps in (5, 15):  # measured: rmse 0.25 and 0.096 for a latent rms of 0.35
        trajectory = ddim_invert(teacher, latents, embeds, steps)
        recon = ddim_denoise(teacher, trajectory[-1], embeds, steps=steps, guidance=1.0)
        errors[steps] = float((recon - latents).pow(2).mean().sqrt())
    rms = float(latents.pow(2).mean().sqrt())
    # a random model is not a consistent denoiser, so DDIM inversion is only approximate
    assert errors[5] < rms and errors[15] < 0.6 * errors[5]


def test_extract_priors_end_to_end(teacher, clip) -> None:
    priors = extract_priors(teacher, clip.video, clip.caption, steps=2, guidance=6.0, chunk_size=29)
    heads = teacher.transformer.config.num_attention_heads
    assert priors.head_scores.shape == (heads,) and len(priors.selected_heads) == 1
    words = clip.caption.split()  # word-level: one token per caption word (no punctuation here)
    n_real = len(words)
    assert priors.token_scores.shape == (teacher.spec.max_text_len,)
    assert torch.isfinite(priors.token_scores).sum() == n_real  # padding and </s> excluded
    assert len(priors.selected_tokens) == (n_real + 1) // 2
    for token in priors.selected_tokens:
        start, end = token.span
        assert token.text == clip.caption[start:end] == words[token.index]
    assert priors.prior.shape == (len(priors.selected_tokens), 3, 4, 4)
    assert priors.prior.dtype == torch.float32 and (priors.prior >= 0).all()
    meta = priors.metadata
    assert meta["frames_used"] == 9 and meta["layer_calls"] == 2 * 2 and meta["memory"]
    assert meta["token_grid"] == {"text": 96, "frames": 3, "height": 4, "width": 4}
    assert np.isfinite(meta["reconstruction_rmse"])
    assert all(
        type(p).__name__ != "StreamingAttnProcessor"
        for p in teacher.transformer.attn_processors.values()
    )
    with pytest.raises(InvalidInput, match="prompt"):
        extract_priors(teacher, clip.video, "  ")


def test_extract_priors_with_temporal_patches(teacher, clip) -> None:
    """CogVideoX 1.5 style (patch_size_t=2): 3 latent frames are padded to 4 -> 2 token frames."""
    config = {k: v for k, v in teacher.transformer.config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CogVideoXTransformer3DModel(**{**config, "patch_size_t": 2})
    cogvideox15 = CogVideoXTeacher(
        spec=teacher.spec,
        transformer=transformer,
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        scheduler=teacher.scheduler,
    )
    priors = extract_priors(cogvideox15, clip.video, clip.caption, steps=1, chunk_size=13)
    assert priors.metadata["latent_shape"] == (1, 4, 4, 8, 8)
    assert priors.metadata["frames_used"] == 9
    assert priors.prior.shape == (len(priors.selected_tokens), 2, 4, 4)
