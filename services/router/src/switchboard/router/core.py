"""The router's core: gate -> selector -> tokenize -> one placement call -> decision log; feedback -> learning.

The prompt is tokenized once per distinct tokenizer of the experts it is placed on
(`tokenization.py`): the first expert's ids go with the placement call (for prefix-aware
placement), and every candidate names the tokenization of its expert.

No gRPC here: the servicer (servicer.py) converts protobuf to these objects and back and maps the
exceptions below to status codes; the scheduler is reached through the `Placer` protocol, so the
core runs in tests, benchmarks and a simulator without a server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from switchboard.router.decision_log import Decision, DecisionLog, Outcome, OutcomeSink, TrainingRecord
from switchboard.router.gate import Gate, GateScores
from switchboard.router.load_bias import LoadBias, PoolLoad
from switchboard.router.online import OnlineHead
from switchboard.router.selector import NoEligibleExpert, Selection, Selector
from switchboard.router.tokenization import PromptTokenization, PromptTokenizers

__all__ = [
    "Candidate",
    "CoreSettings",
    "NoEligibleExpert",
    "PlacementRequest",
    "PlacementResult",
    "PlacementUnavailable",
    "Placer",
    "PromptTokenization",
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
# Why an expert outside the tenant's scopes is ineligible (the router answers PERMISSION_DENIED when that is every expert).
NOT_IN_SCOPE = "the tenant may not use it"
# The scheduler's bound on the token ids of one Place (PlaceRequest.prompt_token_ids); a longer
# prompt is placed without them (and still goes to its replica with its ids).
MAX_PLACE_TOKEN_IDS = 131072
# Prompts longer than this are tokenized on a worker thread, so the event loop keeps serving
# other calls (about 2 ms of tokenizing at this length on the demo experts' tokenizer).
INLINE_TOKENIZE_CHARS = 8192


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
    # The fingerprint of its expert's tokenizer ("": none loaded); its ids are the RouteOutput
    # tokenization with this fingerprint.
    tokenizer_fingerprint: str = ""
    # The revision of its expert the replica serves ("": not announced).
    revision: str = ""


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
    # The prompt's ids under the first expert's tokenizer (empty: not tokenized) and its fingerprint.
    prompt_token_ids: tuple[int, ...] = ()
    tokenizer_fingerprint: str = ""
    priority: int = 0  # the tenant's priority class (common.Priority; 0: unspecified)


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
    allowed_experts: tuple[str, ...] = ()  # the tenant's scopes: only these experts (empty: every one)
    priority: int = 0  # the tenant's priority class (common.Priority; 0: unspecified)


@dataclass(frozen=True)
class RouteOutput:
    """The decision and where to run it."""

    candidates: tuple[Candidate, ...]
    selection: Selection
    scores: GateScores
    gate_kind: str
    gate_version: str
    decision_seconds: float  # gate + selector time
    # The prompt tokenized once per distinct tokenizer the candidates name, in first-named order.
    tokenizations: tuple[PromptTokenization, ...] = ()
    tokenize_seconds: float = 0.0  # time spent making them


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
        tokenizers: PromptTokenizers | None = None,
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
        self.tokenizers = tokenizers  # None: no token ids upstream (every replica tokenizes)
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
        """Experts that may not serve this request at all, with why (pinned elsewhere, or outside the tenant's scopes)."""
        out: dict[str, str] = {}
        if request.allowed_experts:
            allowed = set(request.allowed_experts)
            out = {name: NOT_IN_SCOPE for name in self.experts if name not in allowed}
        if request.expert:
            out.update({name: f"the request is pinned to {request.expert}" for name in self.experts if name != request.expert})
        return out

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

    def fingerprint(self, expert: str) -> str:
        """The fingerprint of the expert's tokenizer ("" when the router has none for it)."""
        return self.tokenizers.fingerprint(expert) if self.tokenizers is not None else ""

    async def _tokenize(self, fingerprint: str, prompt: str, into: dict[str, tuple[int, ...] | None]) -> None:
        """Add the prompt's ids under `fingerprint` to `into` unless it has them (None: cannot)."""
        if not fingerprint or fingerprint in into or self.tokenizers is None:
            return
        if len(prompt) > INLINE_TOKENIZE_CHARS:
            into[fingerprint] = await asyncio.to_thread(self.tokenizers.encode, fingerprint, prompt)
        else:
            into[fingerprint] = self.tokenizers.encode(fingerprint, prompt)

    async def route(self, request: RouteInput) -> RouteOutput:
        """Decide, tokenize for the first expert, place with one scheduler call, record the decision."""
        selection, scores, seconds = self.decide(request)
        tokenized: dict[str, tuple[int, ...] | None] = {}
        tokenize_started = time.perf_counter()
        first = self.fingerprint(selection.order[0])
        await self._tokenize(first, request.prompt, tokenized)
        tokenize_seconds = time.perf_counter() - tokenize_started
        place_ids = tokenized.get(first) or ()
        # The first expert's tokenization is the exact prompt length the gate may only have
        # estimated (from a long prompt's prefix): replicas are chosen by it, not by the estimate.
        prompt_tokens = len(place_ids) if place_ids else scores.prompt_tokens
        if place_ids and not scores.exact_tokens:
            self._check_fits(request, prompt_tokens, self.ineligible(request))
        if len(place_ids) > MAX_PLACE_TOKEN_IDS:
            place_ids = ()
        result = await self.placer.place(
            PlacementRequest(
                request_id=request.request_id,
                experts=selection.order,
                prompt_tokens=prompt_tokens,
                max_tokens=max(0, request.max_tokens),
                min_model_len=prompt_tokens + max(0, request.max_tokens),
                exclude_replica_ids=request.exclude_replica_ids,
                max_alternates=self.settings.max_alternates,
                timeout_seconds=request.timeout_seconds,
                prompt_token_ids=place_ids,
                tokenizer_fingerprint=first if place_ids else "",
                priority=request.priority,
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
        candidates, tokenizations, more_seconds = await self._name_tokenizations(candidates, request.prompt, tokenized)
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
        return RouteOutput(
            candidates,
            selection,
            scores,
            self.gate.kind,
            self.gate.version,
            seconds,
            tokenizations,
            tokenize_seconds + more_seconds,
        )

    async def _name_tokenizations(
        self, candidates: tuple[Candidate, ...], prompt: str, tokenized: dict[str, tuple[int, ...] | None]
    ) -> tuple[tuple[Candidate, ...], tuple[PromptTokenization, ...], float]:
        """Each candidate named with its expert's tokenization (the prompt tokenized once per
        distinct tokenizer); returns the candidates, the tokenizations and the seconds it took."""
        started = time.perf_counter()
        named: list[Candidate] = []
        for candidate in candidates:
            fingerprint = self.fingerprint(candidate.expert)
            await self._tokenize(fingerprint, prompt, tokenized)
            if tokenized.get(fingerprint) is None:
                fingerprint = ""  # no tokenizer, or it could not encode this prompt
            named.append(replace(candidate, tokenizer_fingerprint=fingerprint))
        order = dict.fromkeys(c.tokenizer_fingerprint for c in named if c.tokenizer_fingerprint)
        tokenizations = tuple(PromptTokenization(fp, tokenized[fp] or ()) for fp in order)
        return tuple(named), tokenizations, time.perf_counter() - started

    # -- feedback -------------------------------------------------------------------------------

    def feedback(self, request_id: str, outcome: Outcome) -> TrainingRecord | None:
        """Join an outcome to its decision, learn from it; None when the decision is not held."""
        if outcome.expert not in self.experts:
            raise UnknownExpert(f"expert {outcome.expert!r} is not served here")
        if outcome.not_served:
            # Released, not learned from: a cache hit or a refusal after placement says nothing of the expert.
            self.decision_log.pop(request_id)
            return None
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
