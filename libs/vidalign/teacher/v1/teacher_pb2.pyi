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
    __slots__ = ("model", "family", "cond_dim", "frames", "resolution", "latent_channels", "vae_scale_factor", "num_train_timesteps", "adapters", "max_message_bytes", "max_request_bytes", "version", "height", "width")
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
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
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
    height: int
    width: int
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., cond_dim: _Optional[int] = ..., frames: _Optional[int] = ..., resolution: _Optional[int] = ..., latent_channels: _Optional[int] = ..., vae_scale_factor: _Optional[int] = ..., num_train_timesteps: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., version: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

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

class AttentionPriorsParams(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "steps", "guidance", "head_ratio", "token_ratio", "chunk_size", "memory", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_RATIO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RATIO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    head_ratio: float
    token_ratio: float
    chunk_size: int
    memory: bool
    model: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., head_ratio: _Optional[float] = ..., token_ratio: _Optional[float] = ..., chunk_size: _Optional[int] = ..., memory: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class AttentionPriorsRequest(_message.Message):
    __slots__ = ("params", "tensors")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    params: AttentionPriorsParams
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, params: _Optional[_Union[AttentionPriorsParams, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class SelectedToken(_message.Message):
    __slots__ = ("index", "start", "end", "text", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    start: int
    end: int
    text: str
    score: float
    def __init__(self, index: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class AttentionPriorsSelection(_message.Message):
    __slots__ = ("selected_heads", "selected_tokens", "metadata_json")
    SELECTED_HEADS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    selected_heads: _containers.RepeatedScalarFieldContainer[int]
    selected_tokens: _containers.RepeatedCompositeFieldContainer[SelectedToken]
    metadata_json: str
    def __init__(self, selected_heads: _Optional[_Iterable[int]] = ..., selected_tokens: _Optional[_Iterable[_Union[SelectedToken, _Mapping]]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class AttentionPriorsResponse(_message.Message):
    __slots__ = ("selection", "tensors")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    selection: AttentionPriorsSelection
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, selection: _Optional[_Union[AttentionPriorsSelection, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...
