"""The teacher's request logic, shared by the gRPC service and the in-process teacher.

``TeacherEngine`` owns one loaded ``DiffusionTeacher``, the adapters loaded on
it, and a cache of VAE latents. It validates every request before touching
the model, so a bad request raises a ``vidalign.errors`` exception that names
the problem, and the same request gets the same error whether it came over
gRPC or from the same process. It holds no training state (docs/design.md,
decision 3): any replica with the same model and adapters gives the same
answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import vidalign
from vidalign.errors import FailedPrecondition, InvalidInput, NotFound, require_finite
from vidalign.log import get_logger
from vidalign.store import Store, materialize
from vidalign.teacher.protocol import (
    AdapterInfo,
    AttentionPriorsRequest,
    DenoisingLossRequest,
    TeacherInfo,
)
from vidalign.vda import Adapter, DiffusionTeacher
from vidalign.vda.loss import DenoisingLossResult, loss_and_grad

log = get_logger(__name__)

MAX_DRAWS = 64
"""Upper bound on K per request: more draws belong in more requests."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LatentCache:
    """LRU cache of per-video latents keyed by content digest, bounded in bytes.

    A video's latents depend only on its pixels and the VAE (which runs
    deterministically, ``latent_dist.mode()``), so the digest of the pixel bytes
    and shape is a complete key within one model; the store level is keyed
    under the model's name by the server.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(video: torch.Tensor) -> str:
        digest = hashlib.sha256(str(tuple(video.shape)).encode())
        digest.update(video.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        latents = self._entries.get(key)
        if latents is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return latents

    def put(self, key: str, latents: torch.Tensor) -> None:
        size = latents.numel() * latents.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            return
        self._entries[key] = latents
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()


class TeacherEngine:
    """Validates and answers DenoisingLoss requests against one diffusion teacher."""

    def __init__(
        self,
        teacher: DiffusionTeacher,
        *,
        model_name: str | None = None,
        max_message_bytes: int = 0,
        max_request_bytes: int = 0,
        latent_cache_bytes: int = 1 << 30,
        latent_store: Store | None = None,
    ) -> None:
        self.teacher = teacher
        self.model_name = model_name or teacher.spec.name
        self.max_message_bytes = max_message_bytes
        self.max_request_bytes = max_request_bytes
        self.latents = LatentCache(latent_cache_bytes)
        # Second level behind the memory LRU, shared by replicas and restarts.
        self.latent_store = latent_store
        self._adapters: dict[str, tuple[Adapter, str]] = {}
        self.requests_served = 0
        # One model, one device: requests take turns (GPU work serialises anyway),
        # and LoRA activation is model state that must not interleave.
        self._lock = threading.Lock()
        down_blocks = len(teacher.unet.config.block_out_channels)
        self._latent_multiple = 2 ** (down_blocks - 1)

    # -- adapters -------------------------------------------------------------

    def load_adapter(self, path: str | Path) -> AdapterInfo:
        """Load an adapter (a file, or a store URI); it is then addressed by its content digest."""
        adapter = Adapter.load(materialize(str(path)))
        if adapter.cond_dim != self.teacher.cond_dim:
            raise InvalidInput(
                f"adapter {path}: projects to {adapter.cond_dim} dims, but {self.model_name} "
                f"conditions on {self.teacher.cond_dim}"
            )
        if adapter.conditioning == "spatial" and adapter.spatial_channels != self.teacher.spatial_channels:
            raise InvalidInput(
                f"adapter {path}: adds {adapter.spatial_channels} channels to the UNet's first "
                f"feature map, but {self.model_name}'s has {self.teacher.spatial_channels}"
            )
        if adapter.lora_rank and adapter.teacher_family != self.teacher.family:
            raise InvalidInput(
                f"adapter {path}: its LoRA was trained for a {adapter.teacher_family} UNet, "
                f"this teacher is {self.teacher.family}"
            )
        assert adapter.digest is not None
        with self._lock:
            if adapter.digest not in self._adapters:
                device = next(self.teacher.unet.parameters()).device
                adapter = adapter.to(device).eval().requires_grad_(False)
                if adapter.lora_rank:
                    config = adapter.lora_config()
                    assert config is not None
                    self.teacher.attach_lora(adapter.lora_name, config, adapter.lora_state)
                self._adapters[adapter.digest] = (adapter, str(path))
                log.info("adapter_loaded", adapter_id=adapter.digest, source=str(path))
        return self._adapter_info(adapter.digest)

    def _adapter_info(self, adapter_id: str) -> AdapterInfo:
        adapter, source = self._adapters[adapter_id]
        return AdapterInfo(
            id=adapter_id,
            feature_dim=adapter.d_v,
            projection=adapter.projection,
            lora_rank=adapter.lora_rank,
            source=source,
        )

    def info(self) -> TeacherInfo:
        t = self.teacher
        return TeacherInfo(
            model=self.model_name,
            family=t.family,
            cond_dim=t.cond_dim,
            frames=t.frames,
            resolution=t.resolution,
            latent_channels=t.latent_channels,
            vae_scale_factor=t.vae_scale_factor,
            num_train_timesteps=t.num_train_timesteps,
            adapters=[self._adapter_info(a) for a in self._adapters],
            max_message_bytes=self.max_message_bytes,
            max_request_bytes=self.max_request_bytes,
            version=vidalign.__version__,
            height=t.resolution,
            width=t.resolution,
        )

    def attention_priors(self, request: AttentionPriorsRequest | None = None):
        raise FailedPrecondition(
            f"AttentionPriors needs a CogVideoX teacher; this one serves '{self.model_name}' "
            f"({self.teacher.family}); point the client at a CogVideoX teacher pool "
            "(e.g. `vidalign teacher serve --teacher-model tiny-cogvideox`)"
        )

    # -- the loss -------------------------------------------------------------

    def denoising_loss(self, request: DenoisingLossRequest) -> DenoisingLossResult:
        """Validate, encode pixels if needed, and compute losses (and dL/dF_V)."""
        return self.run_batch([self.prepare(request)])[0]

    def prepare(self, request: DenoisingLossRequest) -> PreparedRequest:
        """Validate ``request`` (the ``vidalign.errors`` exception naming the problem if it
        is bad) and say which other requests it can share one model run with."""
        request, adapter = self._validate(request)
        return PreparedRequest(request=request, adapter=adapter, key=batch_key(request))

    def run_batch(self, batch: list[PreparedRequest]) -> list[DenoisingLossResult]:
        """The results of prepared requests with one ``key``, computed as ONE batch: one
        UNet forward (and backward) per draw for all their samples, split back per request.

        Each sample keeps its own request's seed, so it draws the timesteps and noise it
        would draw alone (``vidalign.vda.loss``): only the order of fp32 sums inside
        batch-size-dependent kernels differs from running the requests one by one.
        """
        if not batch:
            return []
        keys = {p.key for p in batch}
        if len(keys) != 1:
            raise InvalidInput(f"requests with different batch keys cannot share a run: {sorted(map(str, keys))}")
        first, adapter = batch[0].request, batch[0].adapter
        requests = [p.request for p in batch]
        sizes = [len(r.sample_ids) for r in requests]
        sample_ids = [s for r in requests for s in r.sample_ids]
        seeds = [r.seed for r in requests for _ in r.sample_ids]
        device = next(self.teacher.unet.parameters()).device
        # enable_grad: an in-process caller may be inside autograd.Function.forward,
        # where grad mode is off, and dL/dF_V needs it on.
        with self._lock, torch.enable_grad():
            if first.latents is not None:
                latents = _cat([r.latents for r in requests], torch.float32).to(device)
            else:
                latents = self._encode_pixels(_cat([r.pixels for r in requests]))
            captions = None if first.captions is None else [c for r in requests for c in r.captions]
            text_emb = self.teacher.encode_text(captions) if captions is not None else None
            features = None
            if first.features is not None:
                features = _cat([r.features for r in requests], torch.float32).to(device)
                if first.want_grad:
                    features.requires_grad_(True)
            result = loss_and_grad(
                self.teacher,
                adapter,
                latents,
                text_emb=text_emb,
                features=features,
                sample_ids=sample_ids,
                seed=first.seed,
                seeds=None if len(batch) == 1 else seeds,
                num_draws=first.num_draws,
                timestep_range=first.timestep_range,
                timesteps=first.timesteps,
                want_grad=first.want_grad,
            )
            self.requests_served += len(batch)
        losses = result.losses.detach().cpu()
        timesteps = result.timesteps.cpu()
        grad = None if result.grad is None else result.grad.detach().float().cpu()
        results, lo = [], 0
        for n in sizes:
            part = slice(lo, lo + n)
            results.append(DenoisingLossResult(
                losses=losses[part].contiguous(),
                timesteps=timesteps[part].contiguous(),
                grad=None if grad is None else grad[part].contiguous(),
            ))
            lo += n
        return results

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.teacher.unet.parameters()).device
        keys = [LatentCache.key(video) for video in pixels]
        cached = [self.latents.get(k) for k in keys]
        for i, key in enumerate(keys):
            if cached[i] is None and (stored := self._stored_latents(key)) is not None:
                cached[i] = stored.to(device)
                self.latents.put(key, cached[i])
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            encoded = self.teacher.encode_video(pixels[missing])
            for j, i in enumerate(missing):
                cached[i] = encoded[j]
                self.latents.put(keys[i], encoded[j])
                if self.latent_store is not None:
                    self.latent_store.put_bytes(
                        f"{keys[i]}.safetensors",
                        safetensors_save({"latents": encoded[j].detach().cpu().contiguous()}),
                    )
        return torch.stack(cached)  # type: ignore[arg-type]

    def _stored_latents(self, key: str) -> torch.Tensor | None:
        if self.latent_store is None:
            return None
        try:
            data = self.latent_store.get_bytes(f"{key}.safetensors")
        except NotFound:
            return None
        try:
            return safetensors_load(data)["latents"]
        except Exception:  # a torn or foreign object: re-encode rather than fail the request
            log.warning("latent_cache_unreadable", key=key, store=self.latent_store.uri)
            return None

    def _validate(
        self, request: DenoisingLossRequest
    ) -> tuple[DenoisingLossRequest, Adapter | None]:
        t = self.teacher
        if request.model and request.model != self.model_name:
            raise NotFound(
                f"model '{request.model}' is not hosted here: this teacher serves "
                f"'{self.model_name}'; point the client at the right teacher pool"
            )
        batch = len(request.sample_ids)
        if batch == 0:
            raise InvalidInput("sample_ids is empty; send one id per sample")
        if (request.latents is None) == (request.pixels is None):
            raise InvalidInput("send exactly one of the tensors 'latents' or 'pixels'")

        if request.latents is not None:
            z = request.latents
            _check_batched("latents", z, 5, "B, C, F, h, w", batch)
            if z.shape[1] != t.latent_channels:
                raise InvalidInput(
                    f"latents: {z.shape[1]} channels, {self.model_name} expects {t.latent_channels}"
                )
            self._check_spatial("latents", z.shape[3], z.shape[4], self._latent_multiple)
            require_finite("latents", z)
            frames = z.shape[2]
        else:
            x = request.pixels
            assert x is not None
            if x.dtype != torch.uint8:
                raise InvalidInput(f"pixels: expected dtype uint8, got {x.dtype}")
            if x.dim() != 5 or x.shape[-1] != 3:
                raise InvalidInput(
                    f"pixels: expected shape (B, F, H, W, 3), got {list(x.shape)}"
                )
            if x.shape[0] != batch:
                raise InvalidInput(f"pixels: batch {x.shape[0]} does not match {batch} sample_ids")
            self._check_spatial(
                "pixels", x.shape[2], x.shape[3], self._latent_multiple * t.vae_scale_factor
            )
            frames = x.shape[1]
        if frames < 1:
            raise InvalidInput("the video has no frames")

        adapter = None
        if request.adapter_id:
            entry = self._adapters.get(request.adapter_id)
            if entry is None:
                known = ", ".join(self._adapters) or "none"
                raise NotFound(
                    f"adapter '{request.adapter_id}' is not loaded on this teacher (loaded: {known}); "
                    "start the teacher with --adapter PATH"
                )
            adapter = entry[0]

        if request.features is not None:
            f = request.features
            _check_batched("features", f, 3, "B, T, d_v", batch)
            if f.shape[1] == 0:
                raise InvalidInput("features: T is 0; send at least one feature token")
            if adapter is None:
                raise InvalidInput(
                    "features were sent without adapter_id: name the adapter whose W_proj maps them"
                )
            if f.shape[2] != adapter.d_v:
                raise InvalidInput(
                    f"features: d_v is {f.shape[2]}, adapter {request.adapter_id} expects {adapter.d_v}"
                )
            require_finite("features", f)
        elif request.want_grad:
            raise InvalidInput("want_grad needs features: the gradient is dL/dF_V")

        if request.captions is not None and len(request.captions) != batch:
            raise InvalidInput(
                f"captions: {len(request.captions)} captions for {batch} samples; "
                "send one per sample, or none for the no-text ablation"
            )
        if request.captions is None and request.features is None:
            raise InvalidInput("nothing to condition on: send captions, features, or both")

        steps = t.num_train_timesteps
        num_draws = request.num_draws
        if request.timesteps:
            if num_draws == 0:
                num_draws = len(request.timesteps)
            if len(request.timesteps) != num_draws:
                raise InvalidInput(
                    f"timesteps: {len(request.timesteps)} given for num_draws={num_draws}; "
                    "give one per draw"
                )
            bad = [s for s in request.timesteps if not 0 <= s < steps]
            if bad:
                raise InvalidInput(f"timesteps {bad} are outside [0, {steps})")
        num_draws = num_draws or 1
        if not 1 <= num_draws <= MAX_DRAWS:
            raise InvalidInput(f"num_draws must be in [1, {MAX_DRAWS}], got {num_draws}")
        if request.timestep_range is not None:
            lo, hi = request.timestep_range
            if not 0 <= lo < hi <= steps:
                raise InvalidInput(
                    f"timestep_range [{lo}, {hi}) must satisfy 0 <= min < max <= {steps}"
                )
        return replace(request, num_draws=num_draws), adapter

    def _check_spatial(self, name: str, h: int, w: int, multiple: int) -> None:
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise InvalidInput(
                f"{name}: spatial size {h}x{w} must be a positive multiple of {multiple} "
                f"for {self.model_name}"
            )


def _check_batched(name: str, tensor: torch.Tensor, dims: int, layout: str, batch: int) -> None:
    """``tensor`` is float, has ``dims`` dims laid out as ``layout`` and ``batch`` samples."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise InvalidInput(
            f"{name}: expected a float dtype (float32, float16, bfloat16), got {tensor.dtype}"
        )
    if tensor.dim() != dims:
        raise InvalidInput(f"{name}: expected {dims} dims ({layout}), got shape {list(tensor.shape)}")
    if tensor.shape[0] != batch:
        raise InvalidInput(f"{name}: batch {tensor.shape[0]} does not match {batch} sample_ids")


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, its adapter, and the key of the requests it can be batched with."""

    request: DenoisingLossRequest
    adapter: Adapter | None
    key: tuple
    """Equal keys: same inputs kind and per-sample shapes, adapter, text or not, draws,
    timesteps and want_grad; the seed and the samples may differ."""

    @property
    def size(self) -> int:
        return len(self.request.sample_ids)


def batch_key(request: DenoisingLossRequest) -> tuple:
    """What must be equal for two validated requests to run as one batch."""
    video = request.latents if request.latents is not None else request.pixels
    assert video is not None
    return (
        request.adapter_id,
        "latents" if request.latents is not None else "pixels",
        tuple(video.shape[1:]),
        None if request.features is None else tuple(request.features.shape[1:]),
        request.captions is not None,
        request.num_draws,
        request.timestep_range,
        None if request.timesteps is None else tuple(request.timesteps),
        request.want_grad,
    )


def _cat(tensors: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate along the batch; a single tensor is converted, not copied twice."""
    if dtype is not None:
        tensors = [t.to(dtype) for t in tensors]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
