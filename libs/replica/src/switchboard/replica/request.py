"""One request as the replica's scheduler sees it: its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's tokens, KV blocks and progress (mutated only by the scheduler and its KV-cache manager).

    `params`, `generator` and `state` are opaque to this package: slots where the engine keeps
    the request's sampling parameters, its random generator and its output state.
    """

    request_id: str
    arrival: int
    prompt_len: int
    token_ids: list[int]  # prompt followed by the generated tokens
    params: Any = None  # the engine's SamplingParams (opaque here)
    generator: Any = None  # the model runner's per-request RNG (opaque here)
    max_tokens: int | None = None  # finish with "length" after this many generated tokens (None: no limit)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks it holds
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cached_prompt_tokens: int | None = None  # prompt tokens served by the prefix cache (first admission)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    state: Any = None  # the engine's per-request output state (detokenizer, stop matcher, queue)
    first_scheduled_ns: int | None = None  # wall clock when its prefill first ran (ends its queue wait)
    # Chained hashes of every full block of token_ids seen so far: computed once per request
    # (kept across preemption, extended as tokens are appended).
    hash_chain: list[int] = field(default_factory=list, repr=False)

    @property
    def num_generated(self) -> int:
        """Tokens produced so far."""
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens that still need a forward pass before the next sample."""
        return len(self.token_ids) - self.num_computed
