"""The router's core: gate -> selector -> one placement call -> decision log; feedback -> learning.

No gRPC here: the servicer (servicer.py) converts protobuf to these objects and back and maps the
exceptions below to status codes; the scheduler is reached through the `Placer` protocol, so the
core runs in tests, benchmarks and a simulator without a server.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from switchboard.router.decision_log import Decision, DecisionLog, Outcome, OutcomeSink, TrainingRecord
from switchboard.router.gate import Gate, GateScores
from switchboard.router.load_bias import LoadBias, PoolLoad
from switchboard.router.online import OnlineHead
from switchboard.router.selector import NoEligibleExpert, Selection, Selector

__all__ = [
    "Candidate",
    "CoreSettings",
    "NoEligibleExpert",
    "PlacementRequest",
    "PlacementResult",
    "PlacementUnavailable",
    "Placer",
    "RequestTooLong",
    "RouteInput",
    "RouteOutput",
    "RouterCore",
    "SchedulerUnreachable",
    "UnknownExpert",
]


# The online head is written to its snapshot every this many updates (and at shutdown), so a
# crash loses at most this much learning.
ONLINE_SNAPSHOT_EVERY = 100
NO_READY_REPLICA = "no ready replica"


class UnknownExpert(ValueError):
    """A request named an expert the config does not declare."""


class RequestTooLong(ValueError):
    """Every allowed expert's replicas are too short for the prompt plus its output budget."""

    def __init__(self, needed: int, longest: int) -> None:
        self.needed, self.longest = needed, longest
        super().__init__(
            f"the prompt and max_tokens need {needed} tokens; the longest context any expert serves is "
            f"{longest}: shorten the prompt or lower sampling.max_tokens"
        )


class PlacementUnavailable(Exception):
    """The scheduler answered that no candidate expert has a replica for the request."""


class SchedulerUnreachable(Exception):
    """The scheduler did not answer."""


@dataclass(frozen=True)
class Candidate:
    """One replica of one expert."""

    expert: str
    replica_id: str
    address: str


@dataclass(frozen=True)
class PlacementRequest:
    """One placement call: the ordered experts of one request."""

    request_id: str
    experts: tuple[str, ...]
    prompt_tokens: int
    max_tokens: int
    min_model_len: int
    exclude_replica_ids: tuple[str, ...]
    max_alternates: int
    timeout_seconds: float | None = None  # what is left of the caller's deadline


@dataclass(frozen=True)
class PlacementResult:
    """Replicas per expert, in the order asked; the first expert's first replica is reserved."""

    candidates: Mapping[str, Sequence[Candidate]]
    unavailable: Mapping[str, str] = field(default_factory=dict)


class Placer(Protocol):
    """How the core asks the scheduler for replicas (one call per request)."""

    async def place(self, request: PlacementRequest) -> PlacementResult:
        """Raise PlacementUnavailable or SchedulerUnreachable when it cannot."""
        ...


@dataclass(frozen=True)
class RouteInput:
    """One request to route."""

    request_id: str
    prompt: str
    max_tokens: int = 0
    expert: str = ""  # pinned by the client
    tenant: str = ""
    exclude_replica_ids: tuple[str, ...] = ()
    cost_weight: float | None = None  # the request's lambda (None: tenant's, else the gate's default)
    timeout_seconds: float | None = None  # what is left of the caller's deadline


@dataclass(frozen=True)
class RouteOutput:
    """The decision and where to run it."""

    candidates: tuple[Candidate, ...]
    selection: Selection
    scores: GateScores
    gate_kind: str
    gate_version: str
    decision_seconds: float  # gate + selector time


@dataclass(frozen=True)
class CoreSettings:
    """What the core needs from the router's settings."""

    default_cost_weight: float = 0.0
    tenant_cost_weights: Mapping[str, float] = field(default_factory=dict)
    max_alternates: int = 2
    failure_penalty: float = 1.0
    slo_penalty: float = 0.5
    ttft_slo_seconds: Mapping[str, float] = field(default_factory=dict)
    pools_stale_seconds: float = 3.0  # older cluster views are not used for eligibility


class RouterCore:
    """Routes requests and learns from their outcomes."""

    def __init__(
        self,
        experts: Sequence[str],
        gate: Gate,
        selector: Selector,
        placer: Placer,
        settings: CoreSettings,
        *,
        load_bias: LoadBias | None = None,
        decision_log: DecisionLog | None = None,
        online: OnlineHead | None = None,
        online_snapshot: Path | None = None,
        sink: OutcomeSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.experts = tuple(experts)
        if set(gate.experts) != set(self.experts):
            raise ValueError(f"gate experts {gate.experts} differ from the configured {self.experts}")
        self.gate = gate
        self.selector = selector
        self.placer = placer
        self.settings = settings
        self.load_bias = load_bias or LoadBias(self.experts, ttft_slo_seconds=settings.ttft_slo_seconds, clock=clock)
        self.decision_log = decision_log or DecisionLog(clock=clock)
        self.online = online
        self.online_snapshot = online_snapshot
        self.sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        self.on_stale_view: Callable[[], None] | None = None  # asks for a fresh look at the cluster
        self._pools: dict[str, PoolLoad] = {}
        self._pools_at = float("-inf")

    # -- cluster view ---------------------------------------------------------------------------

    def update_pools(self, pools: Mapping[str, PoolLoad]) -> dict[str, float]:
        """A fresh look at the cluster: keep it for eligibility and step the load bias."""
        self._pools = dict(pools)
        self._pools_at = self._clock()
        return self.load_bias.update(pools)

    def pools(self) -> dict[str, PoolLoad] | None:
        """The last cluster view, or None when it is too old to trust."""
        if self._clock() - self._pools_at > self.settings.pools_stale_seconds:
            return None
        return self._pools

    # -- routing --------------------------------------------------------------------------------

    def cost_weight_for(self, request: RouteInput) -> float:
        """lambda for a request: its own, else its tenant's, else the gate's default."""
        if request.cost_weight is not None:
            return request.cost_weight
        return self.settings.tenant_cost_weights.get(request.tenant, self.settings.default_cost_weight)

    def ineligible(self, request: RouteInput) -> dict[str, str]:
        """Experts that may not serve this request at all, with why (pinned elsewhere)."""
        if not request.expert:
            return {}
        return {name: f"the request is pinned to {request.expert}" for name in self.experts if name != request.expert}

    def unavailable(self, request: RouteInput, prompt_tokens: int) -> dict[str, str]:
        """Experts the last look at the cluster says cannot serve now, with why (advisory)."""
        pools = self.pools()
        if pools is None:
            return {}  # no fresh view: the scheduler decides
        out: dict[str, str] = {}
        needed = prompt_tokens + max(0, request.max_tokens)
        for name in self.experts:
            pool = pools.get(name)
            if pool is None or pool.ready_replicas == 0:
                out[name] = NO_READY_REPLICA
            elif pool.max_model_len and needed > pool.max_model_len:
                out[name] = f"its replicas accept at most {pool.max_model_len} tokens, the request needs {needed}"
        return out

    def _check_fits(self, request: RouteInput, prompt_tokens: int, ineligible: Mapping[str, str]) -> None:
        """Raise RequestTooLong when every allowed expert is ready but none is long enough.

        Only an exact token count counts: an estimate from a long prompt's prefix is left to the
        scheduler, which checks `min_model_len` against each replica.
        """
        pools = self.pools()
        if pools is None:
            return
        allowed = [pools.get(name) for name in self.experts if name not in ineligible]
        if not allowed or any(p is None or p.ready_replicas == 0 or p.max_model_len == 0 for p in allowed):
            return
        needed = prompt_tokens + max(0, request.max_tokens)
        longest = max(p.max_model_len for p in allowed if p is not None)
        if needed > longest:
            raise RequestTooLong(needed, longest)

    def decide(self, request: RouteInput) -> tuple[Selection, GateScores, float]:
        """Gate and selector for one request (no I/O); returns the selection, scores and seconds."""
        if request.expert and request.expert not in self.experts:
            raise UnknownExpert(
                f"expert {request.expert!r} is not served here; known experts: {', '.join(self.experts)}"
            )
        started = time.perf_counter()
        scores = self.gate.score(request.prompt)
        ineligible = self.ineligible(request)
        unavailable = self.unavailable(request, scores.prompt_tokens)
        if scores.exact_tokens:
            self._check_fits(request, scores.prompt_tokens, ineligible)
        quality = dict(zip(self.gate.experts, scores.quality, strict=True))
        correction = self.online.correction(scores.hidden) if self.online is not None else None
        selection = self.selector.select(
            quality,
            scores.temperature,
            cost_weight=self.cost_weight_for(request),
            bias=self.load_bias.bias,
            correction=correction,
            ineligible=ineligible,
            unavailable=unavailable,
            rng=self._rng,
        )
        return selection, scores, time.perf_counter() - started

    async def route(self, request: RouteInput) -> RouteOutput:
        """Decide, place with one scheduler call, record the decision."""
        selection, scores, seconds = self.decide(request)
        result = await self.placer.place(
            PlacementRequest(
                request_id=request.request_id,
                experts=selection.order,
                prompt_tokens=scores.prompt_tokens,
                max_tokens=max(0, request.max_tokens),
                min_model_len=scores.prompt_tokens + max(0, request.max_tokens),
                exclude_replica_ids=request.exclude_replica_ids,
                max_alternates=self.settings.max_alternates,
                timeout_seconds=request.timeout_seconds,
            )
        )
        stale = [c.expert for c in selection.choices if c.why_ineligible == NO_READY_REPLICA and result.candidates.get(c.expert)]
        if stale and self.on_stale_view is not None:
            # The scheduler placed on a pool our last look saw empty: look again now, not at the next poll.
            self.on_stale_view()
        candidates = tuple(c for name in selection.order for c in result.candidates.get(name, ()))
        candidates = candidates[: 1 + self.settings.max_alternates]
        if not candidates:
            raise PlacementUnavailable("; ".join(f"{k}: {v}" for k, v in result.unavailable.items()) or "no replica")
        self.decision_log.record(
            Decision(
                request_id=request.request_id,
                tenant=request.tenant,
                gate_kind=self.gate.kind,
                gate_version=self.gate.version,
                selection=selection,
                temperature=scores.temperature,
                prompt_tokens=scores.prompt_tokens,
                max_tokens=request.max_tokens,
                dense=scores.features.dense if scores.features is not None else (),
                hidden=scores.hidden,
                primary=candidates[0].expert,
                decided_at=self._clock(),
            )
        )
        return RouteOutput(candidates, selection, scores, self.gate.kind, self.gate.version, seconds)

    # -- feedback -------------------------------------------------------------------------------

    def feedback(self, request_id: str, outcome: Outcome) -> TrainingRecord | None:
        """Join an outcome to its decision, learn from it; None when the decision is not held."""
        if outcome.expert not in self.experts:
            raise UnknownExpert(f"expert {outcome.expert!r} is not served here")
        self.load_bias.observe_ttft(outcome.expert, outcome.time_to_first_token_seconds)
        decision = self.decision_log.pop(request_id)
        if decision is None:
            return None
        choice = decision.selection.choice(outcome.expert)
        slo = self.settings.ttft_slo_seconds.get(outcome.expert, 0.0)
        penalty = 0.0
        if not outcome.success:
            penalty += self.settings.failure_penalty
        elif slo > 0 and outcome.time_to_first_token_seconds > slo:
            penalty += self.settings.slo_penalty
        cost_weight = decision.selection.cost_weight
        record = TrainingRecord(
            decision=decision,
            outcome=outcome,
            quality=choice.quality,
            cost=choice.cost,
            penalty=penalty,
            reward=choice.quality - cost_weight * choice.cost - penalty,
            propensity=max(choice.probability, 1e-6),
        )
        if self.online is not None:
            self.online.update(record)
            if self.online_snapshot is not None and self.online.updates % ONLINE_SNAPSHOT_EVERY == 0:
                self.online.save(self.online_snapshot)
        if self.sink is not None:
            self.sink.write(record)
        return record
