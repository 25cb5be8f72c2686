"""The frozen diffusion teacher: AnimateDiff (SD1.5 + motion module) or SD1.5 alone.

VDA conditions this model on ``[text_emb; W_proj(F_V)]`` (one context for all
frames, or one per frame: ``predict_noise``), or on the text with W_proj(F_V)
added to the UNet's first feature map (``residual``), and back-propagates its
epsilon-prediction loss into the VideoLLM's encoder features F_V. The teacher's
own weights never train here (stage 1 trains W_proj and a UNet LoRA, which live
in an ``Adapter``), so every parameter is frozen and the modules stay in eval mode.

Tensor layout: latents are ``(B, C, F, h, w)`` everywhere in vidalign, the layout
``UNetMotionModel`` takes; the SD1.5 ablation treats the F frames as independent
images.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNetMotionModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from vidalign.errors import InvalidInput, NotFound
from vidalign.pipelines import vae_scale_factor

if TYPE_CHECKING:
    from vidalign.vda.registry import TeacherSpec

FAMILIES = ("animatediff", "sd15")
"""AnimateDiff (SD1.5 UNet + motion module) and SD1.5 alone (VDA's image-only ablation)."""
VAE_CHUNK = 16
"""Frames the VAE encodes at once: bounds activation memory for long, large videos."""


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


@contextmanager
def _peft_quiet() -> Iterator[None]:
    """Hide peft's warnings about several adapters and about deleting the active one.

    Several LoRAs on one UNet is the design here, and the teacher re-applies its
    own choice of active LoRA after every add or delete.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        yield


class DiffusionTeacher(torch.nn.Module):
    """A loaded teacher: UNet, VAE, CLIP text encoder, tokenizer and training scheduler.

    Build it with ``vidalign.vda.load_teacher``. LoRA activation
    (``attach_lora`` / ``lora``) changes shared module state: calls that use
    different LoRAs must not run concurrently on one teacher.
    """

    def __init__(
        self,
        *,
        spec: TeacherSpec,
        unet: UNetMotionModel | UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.family = spec.family
        self.frames = spec.frames
        self.resolution = spec.resolution
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.cond_dim: int = unet.config.cross_attention_dim
        self.spatial_channels: int = unet.conv_in.out_channels
        """Channels of the UNet's first feature map (its input convolution's output)."""
        self.latent_channels: int = vae.config.latent_channels
        self.vae_scale_factor: int = vae_scale_factor(vae.config.block_out_channels)
        self.num_train_timesteps: int = scheduler.config.num_train_timesteps
        self._active_lora: str | None = None
        self._check_consistent()
        self.requires_grad_(False)
        self.eval()

    def _check_consistent(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidInput(f"family: expected one of {FAMILIES}, got {self.family!r}")
        want_unet = UNetMotionModel if self.family == "animatediff" else UNet2DConditionModel
        if not isinstance(self.unet, want_unet):
            raise InvalidInput(
                f"unet: family {self.family!r} needs {want_unet.__name__}, "
                f"got {type(self.unet).__name__}"
            )
        if self.text_encoder.config.hidden_size != self.cond_dim:
            raise InvalidInput(
                f"text_encoder.hidden_size: expected the UNet's cross_attention_dim "
                f"{self.cond_dim}, got {self.text_encoder.config.hidden_size}"
            )
        if self.unet.config.in_channels != self.latent_channels:
            raise InvalidInput(
                f"unet.in_channels: expected the VAE's latent_channels {self.latent_channels}, "
                f"got {self.unet.config.in_channels}"
            )
        # The loss compares the UNet output with the drawn noise: only an
        # epsilon-predicting model is a valid teacher for it.
        if self.scheduler.config.prediction_type != "epsilon":
            raise InvalidInput(
                f"scheduler.prediction_type: expected 'epsilon', "
                f"got {self.scheduler.config.prediction_type!r}"
            )

    def train(self, mode: bool = True) -> DiffusionTeacher:
        """Stay in eval mode whatever a training loop asks: the teacher is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_frames(self) -> int | None:
        """Most frames the motion module's positional encoding covers (None for sd15)."""
        if self.family == "animatediff":
            return self.unet.config.motion_max_seq_length
        return None

    # --- conditioning and latents -------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """CLIP last hidden states ``(B, L, cond_dim)`` float32, padded to the tokenizer's length."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise InvalidInput(f"captions: expected a sequence of str, got {captions!r:.200}")
        if len(captions) == 0:
            raise InvalidInput("captions: expected at least one caption, got none")
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return hidden.float()

    @torch.no_grad()
    def encode_video(self, pixels: Tensor, *, chunk_size: int = VAE_CHUNK) -> Tensor:
        """uint8 frames ``(B, F, H, W, 3)`` -> latents ``(B, C, F, h, w)`` float32.

        Uses the posterior mode, not a sample, so a video's latents are a pure
        function of its pixels and can be cached by content.
        """
        if pixels.dtype != torch.uint8 or pixels.ndim != 5 or pixels.shape[-1] != 3:
            raise InvalidInput(
                f"pixels: expected uint8 (B, F, H, W, 3), got {pixels.dtype} {_shape(pixels)}"
            )
        batch, frames, height, width, _ = pixels.shape
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise InvalidInput(
                f"pixels: expected H and W divisible by {self.vae_scale_factor}, got {height}x{width}"
            )
        images = pixels.reshape(batch * frames, height, width, 3).permute(0, 3, 1, 2)
        latents = []
        for chunk in images.split(chunk_size):
            x = chunk.to(self.vae.device, self.vae.dtype) / 127.5 - 1.0
            latents.append(self.vae.encode(x).latent_dist.mode().float())
        z = torch.cat(latents) * self.vae.config.scaling_factor
        return z.reshape(batch, frames, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def add_noise(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward diffusion ``sqrt(a_t) z0 + sqrt(1 - a_t) eps`` with one t per sample."""
        return self.scheduler.add_noise(z0, eps, t.to(z0.device))

    # --- the denoiser ---------------------------------------------------------------

    def predict_noise(
        self, z_t: Tensor, t: Tensor, cond: Tensor, residual: Tensor | None = None
    ) -> Tensor:
        """eps_theta(z_t, t, cond) as float32 ``(B, C, F, h, w)``; differentiable w.r.t. cond.

        ``cond`` is one cross-attention context per sample, ``(B, L, D)``, that
        every frame sees, or one per frame, ``(B, F, L, D)`` (frame-aligned
        conditioning: frame f attends to ``cond[:, f]``). ``residual``
        ``(B, F, spatial_channels, h, w)``, if given, is added to the output of the
        UNet's input convolution, frame f's map to frame f's (VDA's ``"spatial"``
        conditioning); the result is differentiable w.r.t. it too.
        """
        self._check_predict_inputs(z_t, t, cond, residual)
        batch, channels, frames, height, width = z_t.shape
        sample = z_t.to(self.device, self.dtype)
        cond = cond.to(self.device, self.dtype)
        t = t.to(self.device)
        # Both UNets attend per frame image: the cross-attention context is
        # (B*F, L, D), sample-major as the UNets lay out frames. UNetMotionModel
        # repeats the timestep embedding per frame itself, but not the context --
        # the AnimateDiff pipeline does that.
        if cond.ndim == 4:
            context = cond.reshape(batch * frames, *cond.shape[2:])
        else:
            context = cond.repeat_interleave(frames, dim=0)
        with self._first_map_plus(residual):
            if self.family == "animatediff":
                return self.unet(sample, t, encoder_hidden_states=context).sample.float()
            images = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
            eps = self.unet(images, t.repeat_interleave(frames), encoder_hidden_states=context).sample
        return eps.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4).float()

    @contextmanager
    def _first_map_plus(self, residual: Tensor | None) -> Iterator[None]:
        """While open, the UNet's input convolution returns its output plus ``residual``.

        Both UNets run the convolution on ``(B*F, C, h, w)`` frame images, sample
        major (UNetMotionModel folds the frames into the batch first), so the
        residual is flattened the same way. A forward hook rather than a patched
        module: the teacher's weights and LoRA layers stay as loaded, and callers
        hold the teacher one at a time (the engine's lock), as they do for LoRAs.
        """
        if residual is None:
            yield
            return
        flat = residual.to(self.device, self.dtype).flatten(0, 1)

        def add(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return output + flat

        handle = self.unet.conv_in.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

    def _check_predict_inputs(
        self, z_t: Tensor, t: Tensor, cond: Tensor, residual: Tensor | None = None
    ) -> None:
        if z_t.ndim != 5 or z_t.shape[1] != self.latent_channels:
            raise InvalidInput(
                f"z_t: expected (B, {self.latent_channels}, F, h, w), got {_shape(z_t)}"
            )
        batch, frames = z_t.shape[0], z_t.shape[2]
        if t.shape != (batch,) or t.dtype != torch.int64:
            raise InvalidInput(f"t: expected int64 ({batch},), got {t.dtype} {_shape(t)}")
        shared = cond.ndim == 3 and cond.shape[0] == batch
        per_frame = cond.ndim == 4 and cond.shape[:2] == (batch, frames)
        if not (shared or per_frame) or cond.shape[-1] != self.cond_dim:
            raise InvalidInput(
                f"cond: expected ({batch}, L, {self.cond_dim}) or, one context per frame, "
                f"({batch}, {frames}, L, {self.cond_dim}), got {_shape(cond)}"
            )
        want = (batch, frames, self.spatial_channels, *z_t.shape[3:])
        if residual is not None and tuple(residual.shape) != want:
            raise InvalidInput(f"residual: expected {want}, got {_shape(residual)}")
        if self.max_frames is not None and frames > self.max_frames:
            raise InvalidInput(
                f"z_t: the motion module covers at most {self.max_frames} frames, got {frames}"
            )

    # --- LoRA -----------------------------------------------------------------------

    @property
    def lora_names(self) -> list[str]:
        """Names of the LoRAs attached to the UNet."""
        return list(getattr(self.unet, "peft_config", {}))

    def attach_lora(self, adapter_name: str, config: LoraConfig, state: dict[str, Tensor]) -> None:
        """Inject a LoRA into the UNet under ``adapter_name`` and load its peft-format weights.

        The LoRA is frozen and stays inactive until selected with ``lora()``.
        """
        if adapter_name in self.lora_names:
            raise InvalidInput(f"adapter_name: {adapter_name!r} is already attached")
        # add_adapter writes into the config it is given; keep the caller's intact.
        with _peft_quiet():
            self.unet.add_adapter(copy.deepcopy(config), adapter_name=adapter_name)
        try:
            self._load_lora_state(adapter_name, config, state)
        except InvalidInput:
            with _peft_quiet():
                self.unet.delete_adapters(adapter_name)
            raise
        finally:
            # add_adapter activated the new LoRA; put back the one that was active.
            self._activate_lora(self._active_lora)

    def _load_lora_state(
        self, adapter_name: str, config: LoraConfig, state: dict[str, Tensor]
    ) -> None:
        try:
            result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)
        except RuntimeError as e:  # a size mismatch
            raise InvalidInput(f"state: LoRA weights do not fit the UNet: {e}") from e
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
        if unexpected or missing:
            raise InvalidInput(
                f"state: LoRA weights do not fit the UNet's {sorted(config.target_modules)} "
                f"layers: unexpected keys {unexpected[:3]}, missing keys {missing[:3]}"
            )
        for param in self.lora_parameters(adapter_name):
            param.requires_grad_(False)

    def lora_parameters(self, adapter_name: str) -> list[torch.nn.Parameter]:
        """An attached LoRA's weights inside the UNet (frozen until the caller unfreezes them)."""
        self._check_lora_name(adapter_name)
        return [p for n, p in self.unet.named_parameters() if f".{adapter_name}." in n]

    def lora_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """An attached LoRA's current weights, in peft format (``Adapter.lora_state``'s)."""
        self._check_lora_name(adapter_name)
        state = get_peft_model_state_dict(self.unet, adapter_name=adapter_name)
        return {k: v.detach().clone() for k, v in state.items()}

    def detach_lora(self, adapter_name: str) -> None:
        """Remove an attached LoRA and free its weights."""
        self._check_lora_name(adapter_name)
        with _peft_quiet():
            self.unet.delete_adapters(adapter_name)
        self._activate_lora(None if self._active_lora == adapter_name else self._active_lora)

    @contextmanager
    def lora(self, adapter_name: str | None) -> Iterator[None]:
        """Run the block with only ``adapter_name``'s LoRA active (None: no LoRA); restore after."""
        if adapter_name is not None:
            self._check_lora_name(adapter_name)
        previous = self._active_lora
        self._activate_lora(adapter_name)
        try:
            yield
        finally:
            self._activate_lora(previous)

    def _check_lora_name(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_names:
            raise NotFound(
                f"LoRA {adapter_name!r} is not attached to teacher {self.spec.name!r}; "
                f"attached: {self.lora_names}"
            )

    def _activate_lora(self, adapter_name: str | None) -> None:
        self._active_lora = adapter_name
        if not self.lora_names:
            return
        # peft makes the adapter it activates trainable; whether LoRA weights train
        # is the caller's choice (stage 1 trains them), not a side effect of switching.
        lora_params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        requires_grad = [p.requires_grad for p in lora_params]
        if adapter_name is None:
            self.unet.disable_adapters()
        else:
            self.unet.set_adapter(adapter_name)
            self.unet.enable_adapters()
        for param, flag in zip(lora_params, requires_grad, strict=True):
            param.requires_grad_(flag)

    # --- persistence ------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the pipeline layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/).

        ``load_teacher(directory)`` (or a registry name with ``base=directory``)
        loads it back; an AnimateDiff UNet is saved whole, motion module included.
        Used to ship teachers trained here, such as the demo's tiny one.
        """
        if self.lora_names:
            raise InvalidInput(
                f"teacher: detach LoRAs {self.lora_names} before saving the base weights"
            )
        directory = Path(directory)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(self, name).save_pretrained(directory / name)
