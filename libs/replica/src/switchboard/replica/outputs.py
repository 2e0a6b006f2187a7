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


# Hot-path constructors. A frozen dataclass's generated `__init__` stores each field through
# `object.__setattr__` (it must get past the frozen `__setattr__`), about 0.1 µs a field; these
# build the very same instance (same class, same fields, equal and hashable alike) by writing the
# new instance's `__dict__` directly, 3x faster. The cluster simulator builds several per simulated
# request (libs/replica/tests check they equal the dataclasses' own construction).
_new = object.__new__


def scheduled_request(
    request: Request,
    num_new_tokens: int,
    num_computed_tokens: int,
    block_ids: tuple[int, ...],
    new_token_ids: tuple[int, ...],
    sample: bool,
) -> ScheduledRequest:
    """`ScheduledRequest(request, num_new_tokens, ...)`, built faster (see above)."""
    out = _new(ScheduledRequest)
    fields = out.__dict__
    fields["request"] = request
    fields["num_new_tokens"] = num_new_tokens
    fields["num_computed_tokens"] = num_computed_tokens
    fields["block_ids"] = block_ids
    fields["new_token_ids"] = new_token_ids
    fields["sample"] = sample
    return out


def scheduler_output(
    scheduled: tuple[ScheduledRequest, ...], preempted_requests: tuple[Request, ...]
) -> SchedulerOutput:
    """`SchedulerOutput(scheduled, preempted_requests)`, built faster (see above)."""
    out = _new(SchedulerOutput)
    fields = out.__dict__
    fields["scheduled"] = scheduled
    fields["preempted_requests"] = preempted_requests
    return out


def model_runner_output(req_ids: tuple[str, ...], sampled_token_ids: tuple[int, ...]) -> ModelRunnerOutput:
    """`ModelRunnerOutput(req_ids, sampled_token_ids)`, built faster (see above)."""
    out = _new(ModelRunnerOutput)
    fields = out.__dict__
    fields["req_ids"] = req_ids
    fields["sampled_token_ids"] = sampled_token_ids
    return out


def request_output(request: Request, token_id: int, finish_reason: str | None) -> RequestOutput:
    """`RequestOutput(request, token_id, finish_reason)`, built faster (see above)."""
    out = _new(RequestOutput)
    fields = out.__dict__
    fields["request"] = request
    fields["token_id"] = token_id
    fields["finish_reason"] = finish_reason
    return out
