from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model", "family", "cond_dim", "frames", "resolution", "latent_channels", "vae_scale_factor", "num_train_timesteps", "adapters", "max_message_bytes", "max_request_bytes", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    COND_DIM_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    VAE_SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    cond_dim: int
    frames: int
    resolution: int
    latent_channels: int
    vae_scale_factor: int
    num_train_timesteps: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    max_message_bytes: int
    max_request_bytes: int
    version: str
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., cond_dim: _Optional[int] = ..., frames: _Optional[int] = ..., resolution: _Optional[int] = ..., latent_channels: _Optional[int] = ..., vae_scale_factor: _Optional[int] = ..., num_train_timesteps: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("id", "feature_dim", "projection", "lora_rank", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    feature_dim: int
    projection: str
    lora_rank: int
    source: str
    def __init__(self, id: _Optional[str] = ..., feature_dim: _Optional[int] = ..., projection: _Optional[str] = ..., lora_rank: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class TimestepRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class DenoisingLossParams(_message.Message):
    __slots__ = ("sample_ids", "captions", "adapter_id", "seed", "num_draws", "timestep_range", "timesteps", "want_grad", "model")
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAWS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_RANGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    WANT_GRAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    captions: _containers.RepeatedScalarFieldContainer[str]
    adapter_id: str
    seed: int
    num_draws: int
    timestep_range: TimestepRange
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    want_grad: bool
    model: str
    def __init__(self, sample_ids: _Optional[_Iterable[str]] = ..., captions: _Optional[_Iterable[str]] = ..., adapter_id: _Optional[str] = ..., seed: _Optional[int] = ..., num_draws: _Optional[int] = ..., timestep_range: _Optional[_Union[TimestepRange, _Mapping]] = ..., timesteps: _Optional[_Iterable[int]] = ..., want_grad: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class DenoisingLossRequest(_message.Message):
    __slots__ = ("params", "tensors")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    params: DenoisingLossParams
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, params: _Optional[_Union[DenoisingLossParams, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class DenoisingLossResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...
