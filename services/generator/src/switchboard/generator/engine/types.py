"""Public value types of the engine API (what the servicer passes in and gets back)."""

from __future__ import annotations

from dataclasses import dataclass, field

from switchboard.generator.sampling import SamplingParams


class RequestRejected(Exception):
    """A request that can never run on this replica; raised before its first output.

    `field` names the offending request field (e.g. "prompt", "sampling.max_tokens").
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class QueueFull(Exception):
    """The replica's waiting queue is at its bound (`EngineConfig.max_waiting`); raised before the
    request is tokenized or queued, so nothing was done for it. The caller may retry later or elsewhere."""

    def __init__(self, waiting: int, max_waiting: int) -> None:
        self.waiting = waiting
        self.max_waiting = max_waiting
        super().__init__(
            f"the waiting queue is full ({waiting} requests waiting, bound {max_waiting}); retry later or on another replica"
        )


class RequestFailedInEngine(Exception):
    """A step raised and the engine traced the failure to this request (see `Engine` on failure
    isolation): the request was taken out of the batch, its KV blocks freed, and the replica serves
    on. Retrying the same request unchanged will most likely fail the same way on any replica.

    `error_type` is the exception's class name (for logs; the exception's text is not kept, it may
    quote the request's data).
    """

    def __init__(self, request_id: str, error_type: str) -> None:
        super().__init__(f"request {request_id} failed inside the engine ({error_type})")
        self.request_id = request_id
        self.error_type = error_type


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizing. `kv_cache_bytes=None` picks a default for the device (see `Engine`)."""

    block_size: int = 16
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    # Bound on the waiting queue (requests accepted and not yet running, preempted ones
    # included): a request arriving while this many wait is refused with QueueFull before any
    # work is done for it. Default: 4 x the default max_num_seqs.
    max_waiting: int = 256
    max_tokens_per_step: int = 512
    enable_prefix_caching: bool = True
    # Exact pool size in blocks; overrides kv_cache_bytes (tests use tiny pools).
    num_blocks: int | None = None
    # Where steps run when the engine is given no step executor: True = a worker thread
    # of its own (the event loop stays free while a step computes), False = on the event
    # loop's thread between its other callbacks, None = by device: a worker thread on CUDA
    # (the host mostly waits on the GPU), the loop's thread on CPU. On CPU, torch work must
    # stay on the one thread that loaded the model: steps on any other thread ran 2-3x
    # slower here (scribe-large bf16 batch-1 decode 200-210 vs 500-540 tok/s), so a server
    # loads, builds and steps on one compute thread instead (`Engine(step_executor=...)`).
    step_in_thread: bool | None = None
    # Prepack the model's linear weights for oneDNN (see models/packed_linear.py): None = on
    # CPU when this torch build can. One-way: the model object then only serves and scores.
    pack_weights: bool | None = None
    # Fingerprint of the served model seeding the prefix-block hash chain (see
    # switchboard.replica.hashing): replicas of one model share hashes, two models never do.
    # None: the unseeded chain (seed 0), the hashes `prompt_block_hashes(ids, block_size)` gives.
    model_identity: str | None = None


@dataclass
class EngineRequest:
    """One generation request: text or token ids, plus sampling parameters."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class EngineOutput:
    """One streamed increment: new text (whole UTF-8 characters) and the new token ids."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None | "length" | "eos" | "stop_sequence" | "cancelled"
    usage: Usage | None = None  # set on the last output
    # Set on a request's first output: wall-clock time (time.time_ns) at which its prefill
    # first ran, so callers can split the time before the first token into queue and prefill.
    first_scheduled_ns: int | None = None


@dataclass(frozen=True)
class EngineLoad:
    """Load snapshot reported to the scheduler."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_second: float


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about the replica's model and cache."""

    model_name: str
    architecture: str
    device: str
    dtype: str
    max_model_len: int
    vocab_size: int
    block_size: int
    kv_blocks_total: int
    parameter_count: int
    #: Weight quantization of the linear layers ("none", "int8"); "" when the engine does not say (remote).
    quantization: str = "none"
