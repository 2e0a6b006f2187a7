"""The data objects between the scheduler and the model runner.

One step: `Scheduler.schedule()` -> `SchedulerOutput` -> the model runner computes
it and returns a `ModelRunnerOutput` (one sampled token per request that reached
the end of its known tokens) -> `Scheduler.update(output, runner_output,
finish_reasons)` advances every request, publishes full blocks, appends the
sampled tokens, finishes requests and returns one `RequestOutput` per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.replica.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in a step: which tokens it computes, where their keys and values go."""

    request: Request  # the runner reads token_ids, params and generator; it never changes it
    num_new_tokens: int
    num_computed_tokens: int  # tokens already in the cache before this step (its context)
    block_ids: tuple[int, ...]  # the request's block table for this step
    new_token_ids: tuple[int, ...]  # the tokens computed this step
    sample: bool  # this step reaches the end of its known tokens: the runner samples one

    @property
    def request_id(self) -> str:
        """The scheduled request's id."""
        return self.request.request_id


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs: single-token entries (decodes) first, then prefill chunks."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted_requests: tuple[Request, ...] = ()

    @property
    def entries(self) -> list[tuple[Request, int]]:
        """(request, tokens this step) pairs in step order."""
        return [(s.request, s.num_new_tokens) for s in self.scheduled]

    @property
    def preempted(self) -> list[Request]:
        """Requests preempted (blocks freed, back to waiting) while this step was planned."""
        return list(self.preempted_requests)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the step computes."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Whether nothing runs this step."""
        return not self.scheduled


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What the model runner returns for one step: a sampled token per sampling request, in step order."""

    req_ids: tuple[str, ...]
    sampled_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class RequestOutput:
    """One request's new token after `update`, and why it finished (None: it runs on)."""

    request: Request
    token_id: int
    finish_reason: str | None
