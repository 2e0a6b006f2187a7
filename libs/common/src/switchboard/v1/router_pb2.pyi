from switchboard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "sampling", "expert", "tenant", "exclude_replica_ids", "cost_weight", "priority", "allowed_experts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    sampling: _common_pb2.SamplingParams
    expert: str
    tenant: str
    exclude_replica_ids: _containers.RepeatedScalarFieldContainer[str]
    cost_weight: float
    priority: _common_pb2.Priority
    allowed_experts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., expert: _Optional[str] = ..., tenant: _Optional[str] = ..., exclude_replica_ids: _Optional[_Iterable[str]] = ..., cost_weight: _Optional[float] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., allowed_experts: _Optional[_Iterable[str]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("request_id", "candidates", "scores", "k", "cost_weight", "gate_kind", "gate_version", "prompt_tokens", "tokenizations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GATE_KIND_FIELD_NUMBER: _ClassVar[int]
    GATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[RouteCandidate]
    scores: _containers.RepeatedCompositeFieldContainer[ExpertScore]
    k: int
    cost_weight: float
    gate_kind: str
    gate_version: str
    prompt_tokens: int
    tokenizations: _containers.RepeatedCompositeFieldContainer[PromptTokenization]
    def __init__(self, request_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[RouteCandidate, _Mapping]]] = ..., scores: _Optional[_Iterable[_Union[ExpertScore, _Mapping]]] = ..., k: _Optional[int] = ..., cost_weight: _Optional[float] = ..., gate_kind: _Optional[str] = ..., gate_version: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., tokenizations: _Optional[_Iterable[_Union[PromptTokenization, _Mapping]]] = ...) -> None: ...

class PromptTokenization(_message.Message):
    __slots__ = ("tokenizer_fingerprint", "token_ids")
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    tokenizer_fingerprint: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokenizer_fingerprint: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RouteCandidate(_message.Message):
    __slots__ = ("expert", "replica_id", "address", "tokenizer_fingerprint", "revision")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    expert: str
    replica_id: str
    address: str
    tokenizer_fingerprint: str
    revision: str
    def __init__(self, expert: _Optional[str] = ..., replica_id: _Optional[str] = ..., address: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class ExpertScore(_message.Message):
    __slots__ = ("expert", "score", "selected", "quality", "bias", "utility", "eligible", "ineligible_reason", "correction")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    INELIGIBLE_REASON_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    expert: str
    score: float
    selected: bool
    quality: float
    bias: float
    utility: float
    eligible: bool
    ineligible_reason: str
    correction: float
    def __init__(self, expert: _Optional[str] = ..., score: _Optional[float] = ..., selected: _Optional[bool] = ..., quality: _Optional[float] = ..., bias: _Optional[float] = ..., utility: _Optional[float] = ..., eligible: _Optional[bool] = ..., ineligible_reason: _Optional[str] = ..., correction: _Optional[float] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "expert", "replica_id", "success", "finish_reason", "usage", "time_to_first_token_seconds", "latency_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    expert: str
    replica_id: str
    success: bool
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    time_to_first_token_seconds: float
    latency_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., expert: _Optional[str] = ..., replica_id: _Optional[str] = ..., success: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., time_to_first_token_seconds: _Optional[float] = ..., latency_seconds: _Optional[float] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("name", "description", "relative_cost", "ready_replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_COST_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    relative_cost: float
    ready_replicas: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., relative_cost: _Optional[float] = ..., ready_replicas: _Optional[int] = ...) -> None: ...
