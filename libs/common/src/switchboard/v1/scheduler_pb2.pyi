from switchboard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_DRAINING: _ClassVar[ReplicaState]

class RolloutStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STRATEGY_UNSPECIFIED: _ClassVar[RolloutStrategy]
    ROLLOUT_STRATEGY_CANARY: _ClassVar[RolloutStrategy]
    ROLLOUT_STRATEGY_BLUE_GREEN: _ClassVar[RolloutStrategy]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_RUNNING: _ClassVar[RolloutState]
    ROLLOUT_STATE_PAUSED: _ClassVar[RolloutState]
    ROLLOUT_STATE_PROMOTED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_DRAINING: ReplicaState
ROLLOUT_STRATEGY_UNSPECIFIED: RolloutStrategy
ROLLOUT_STRATEGY_CANARY: RolloutStrategy
ROLLOUT_STRATEGY_BLUE_GREEN: RolloutStrategy
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_RUNNING: RolloutState
ROLLOUT_STATE_PAUSED: RolloutState
ROLLOUT_STATE_PROMOTED: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState

class ReplicaLoad(_message.Message):
    __slots__ = ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "tokens_per_second", "cached_block_hashes", "requests_ended", "requests_failed")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ENDED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_second: float
    cached_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    requests_ended: int
    requests_failed: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., cached_block_hashes: _Optional[_Iterable[int]] = ..., requests_ended: _Optional[int] = ..., requests_failed: _Optional[int] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("sequence", "stored_block_hashes", "evicted_block_hashes", "cleared")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STORED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    stored_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    evicted_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    cleared: bool
    def __init__(self, sequence: _Optional[int] = ..., stored_block_hashes: _Optional[_Iterable[int]] = ..., evicted_block_hashes: _Optional[_Iterable[int]] = ..., cleared: _Optional[bool] = ...) -> None: ...

class KvEvents(_message.Message):
    __slots__ = ("events", "reset")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    reset: bool
    def __init__(self, events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ..., reset: _Optional[bool] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("replica_id", "expert", "address", "device", "model_name", "max_model_len", "load", "state", "seconds_since_heartbeat", "inflight", "kv_block_size", "kv_hash_seed", "tokenizer_fingerprint", "cost_model", "max_waiting", "revision")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_HASH_SEED_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    expert: str
    address: str
    device: str
    model_name: str
    max_model_len: int
    load: ReplicaLoad
    state: ReplicaState
    seconds_since_heartbeat: float
    inflight: int
    kv_block_size: int
    kv_hash_seed: int
    tokenizer_fingerprint: str
    cost_model: StepCostModel
    max_waiting: int
    revision: str
    def __init__(self, replica_id: _Optional[str] = ..., expert: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., model_name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., seconds_since_heartbeat: _Optional[float] = ..., inflight: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_hash_seed: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., cost_model: _Optional[_Union[StepCostModel, _Mapping]] = ..., max_waiting: _Optional[int] = ..., revision: _Optional[str] = ...) -> None: ...

class StepCostModel(_message.Message):
    __slots__ = ("base_ms", "prefill_token_ms", "decode_seq_ms", "context_token_ms")
    BASE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SEQ_MS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    base_ms: float
    prefill_token_ms: float
    decode_seq_ms: float
    context_token_ms: float
    def __init__(self, base_ms: _Optional[float] = ..., prefill_token_ms: _Optional[float] = ..., decode_seq_ms: _Optional[float] = ..., context_token_ms: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("replica_id", "expert", "address", "device", "model_name", "max_model_len", "load", "kv_events", "kv_block_size", "kv_hash_seed", "tokenizer_fingerprint", "cost_model", "max_waiting", "revision")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_HASH_SEED_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    expert: str
    address: str
    device: str
    model_name: str
    max_model_len: int
    load: ReplicaLoad
    kv_events: KvEvents
    kv_block_size: int
    kv_hash_seed: int
    tokenizer_fingerprint: str
    cost_model: StepCostModel
    max_waiting: int
    revision: str
    def __init__(self, replica_id: _Optional[str] = ..., expert: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., model_name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ..., kv_events: _Optional[_Union[KvEvents, _Mapping]] = ..., kv_block_size: _Optional[int] = ..., kv_hash_seed: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., cost_model: _Optional[_Union[StepCostModel, _Mapping]] = ..., max_waiting: _Optional[int] = ..., revision: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "expiry_seconds", "kv_acked_sequence", "kv_resync_needed")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KV_RESYNC_NEEDED_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    expiry_seconds: float
    kv_acked_sequence: int
    kv_resync_needed: bool
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., expiry_seconds: _Optional[float] = ..., kv_acked_sequence: _Optional[int] = ..., kv_resync_needed: _Optional[bool] = ...) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("replica_id", "load", "draining", "kv_events")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    load: ReplicaLoad
    draining: bool
    kv_events: KvEvents
    def __init__(self, replica_id: _Optional[str] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ..., draining: _Optional[bool] = ..., kv_events: _Optional[_Union[KvEvents, _Mapping]] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ("known", "kv_acked_sequence", "kv_resync_needed")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    KV_ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KV_RESYNC_NEEDED_FIELD_NUMBER: _ClassVar[int]
    known: bool
    kv_acked_sequence: int
    kv_resync_needed: bool
    def __init__(self, known: _Optional[bool] = ..., kv_acked_sequence: _Optional[int] = ..., kv_resync_needed: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("request_id", "expert", "prompt_tokens", "max_tokens", "exclude_replica_ids", "max_alternates", "experts", "min_model_len", "prompt_token_ids", "tokenizer_fingerprint", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ALTERNATES_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MIN_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    expert: str
    prompt_tokens: int
    max_tokens: int
    exclude_replica_ids: _containers.RepeatedScalarFieldContainer[str]
    max_alternates: int
    experts: _containers.RepeatedScalarFieldContainer[str]
    min_model_len: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_fingerprint: str
    priority: _common_pb2.Priority
    def __init__(self, request_id: _Optional[str] = ..., expert: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., exclude_replica_ids: _Optional[_Iterable[str]] = ..., max_alternates: _Optional[int] = ..., experts: _Optional[_Iterable[str]] = ..., min_model_len: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_fingerprint: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class PlaceResponse(_message.Message):
    __slots__ = ("replica", "alternates", "placements", "unavailable")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ALTERNATES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    replica: Replica
    alternates: _containers.RepeatedCompositeFieldContainer[Replica]
    placements: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    unavailable: _containers.RepeatedCompositeFieldContainer[ExpertUnavailable]
    def __init__(self, replica: _Optional[_Union[Replica, _Mapping]] = ..., alternates: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., placements: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., unavailable: _Optional[_Iterable[_Union[ExpertUnavailable, _Mapping]]] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("expert", "replica", "alternates")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ALTERNATES_FIELD_NUMBER: _ClassVar[int]
    expert: str
    replica: Replica
    alternates: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, expert: _Optional[str] = ..., replica: _Optional[_Union[Replica, _Mapping]] = ..., alternates: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class ExpertUnavailable(_message.Message):
    __slots__ = ("expert", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: str
    reason: str
    def __init__(self, expert: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SchedulerCompleteRequest(_message.Message):
    __slots__ = ("request_id", "replica_id", "success", "finish_reason", "usage", "time_to_first_token_seconds", "latency_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    replica_id: str
    success: bool
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    time_to_first_token_seconds: float
    latency_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., success: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., time_to_first_token_seconds: _Optional[float] = ..., latency_seconds: _Optional[float] = ...) -> None: ...

class SchedulerCompleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class RolloutStep(_message.Message):
    __slots__ = ("weight", "duration_seconds")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    weight: float
    duration_seconds: float
    def __init__(self, weight: _Optional[float] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class RolloutGates(_message.Message):
    __slots__ = ("max_error_ratio", "max_ttft_p95_ratio", "max_tpot_p95_ratio", "min_requests")
    MAX_ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_TTFT_P95_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_TPOT_P95_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_error_ratio: float
    max_ttft_p95_ratio: float
    max_tpot_p95_ratio: float
    min_requests: int
    def __init__(self, max_error_ratio: _Optional[float] = ..., max_ttft_p95_ratio: _Optional[float] = ..., max_tpot_p95_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ...) -> None: ...

class RolloutSpec(_message.Message):
    __slots__ = ("expert", "from_revision", "to_revision", "strategy", "steps", "gates", "quality_probe", "deploy")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    FROM_REVISION_FIELD_NUMBER: _ClassVar[int]
    TO_REVISION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PROBE_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_FIELD_NUMBER: _ClassVar[int]
    expert: str
    from_revision: str
    to_revision: str
    strategy: RolloutStrategy
    steps: _containers.RepeatedCompositeFieldContainer[RolloutStep]
    gates: RolloutGates
    quality_probe: RolloutQualityProbe
    deploy: RolloutDeploy
    def __init__(self, expert: _Optional[str] = ..., from_revision: _Optional[str] = ..., to_revision: _Optional[str] = ..., strategy: _Optional[_Union[RolloutStrategy, str]] = ..., steps: _Optional[_Iterable[_Union[RolloutStep, _Mapping]]] = ..., gates: _Optional[_Union[RolloutGates, _Mapping]] = ..., quality_probe: _Optional[_Union[RolloutQualityProbe, _Mapping]] = ..., deploy: _Optional[_Union[RolloutDeploy, _Mapping]] = ...) -> None: ...

class RolloutDeploy(_message.Message):
    __slots__ = ("model", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class RolloutQualityProbe(_message.Message):
    __slots__ = ("texts", "max_nll_increase")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NLL_INCREASE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    max_nll_increase: float
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., max_nll_increase: _Optional[float] = ...) -> None: ...

class RevisionStats(_message.Message):
    __slots__ = ("revision", "requests", "failed", "ttft_p95_seconds", "tpot_p95_seconds", "ready_replicas", "probe_nll")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TPOT_P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PROBE_NLL_FIELD_NUMBER: _ClassVar[int]
    revision: str
    requests: int
    failed: int
    ttft_p95_seconds: float
    tpot_p95_seconds: float
    ready_replicas: int
    probe_nll: float
    def __init__(self, revision: _Optional[str] = ..., requests: _Optional[int] = ..., failed: _Optional[int] = ..., ttft_p95_seconds: _Optional[float] = ..., tpot_p95_seconds: _Optional[float] = ..., ready_replicas: _Optional[int] = ..., probe_nll: _Optional[float] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("spec", "state", "step", "weight", "step_elapsed_seconds", "reason", "stats", "started_unix_seconds", "ended_unix_seconds")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEP_ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spec: RolloutSpec
    state: RolloutState
    step: int
    weight: float
    step_elapsed_seconds: float
    reason: str
    stats: _containers.RepeatedCompositeFieldContainer[RevisionStats]
    started_unix_seconds: float
    ended_unix_seconds: float
    def __init__(self, spec: _Optional[_Union[RolloutSpec, _Mapping]] = ..., state: _Optional[_Union[RolloutState, str]] = ..., step: _Optional[int] = ..., weight: _Optional[float] = ..., step_elapsed_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., stats: _Optional[_Iterable[_Union[RevisionStats, _Mapping]]] = ..., started_unix_seconds: _Optional[float] = ..., ended_unix_seconds: _Optional[float] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RolloutSpec
    def __init__(self, spec: _Optional[_Union[RolloutSpec, _Mapping]] = ...) -> None: ...

class StartRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("expert",)
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    def __init__(self, expert: _Optional[str] = ...) -> None: ...

class GetRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

class PauseRolloutRequest(_message.Message):
    __slots__ = ("expert", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: str
    reason: str
    def __init__(self, expert: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class ResumeRolloutRequest(_message.Message):
    __slots__ = ("expert", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: str
    reason: str
    def __init__(self, expert: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class AbortRolloutRequest(_message.Message):
    __slots__ = ("expert", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: str
    reason: str
    def __init__(self, expert: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortRolloutResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...
