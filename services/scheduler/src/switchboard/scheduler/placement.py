"""Placement: which replicas of a request's candidate experts take it, and which one is reserved.

`Placer` is the core of `Scheduler.Place` (no gRPC here: the servicer only converts protobuf to a
`PlacementRequest` and the result back, and maps the exceptions below to status codes). For each
candidate expert, best first, it narrows the replicas to the healthy, non-excluded ones long
enough for the request whose last reported waiting queue is below the bound they announced
(`max_waiting`), asks the policy to rank them, and keeps the best as that expert's choice
and the next ones as alternates; then it reserves only the primary (the choice of the first
expert that has one) in the registry. Reserving in the same call as placing is what makes the
primary independent of the order in which callers place their requests.

Each `place` call takes one instant's view of the registry first and decides only from it: the
candidates every expert's policy ranks are frozen views of that one instant (`ReadyViews`, the
part of a `ClusterSnapshot` placement reads, built only for the requested experts; `plan` takes a
whole snapshot). A policy only ranks
candidates (`policies.py`). Keeping that interface this small lets a learned policy (the
reinforcement learning policy of a later issue) replace the heuristics without touching the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from switchboard.scheduler.policies import LeastLoadedPolicy, PlacementPolicy, PlacementQuery
from switchboard.scheduler.registry import (
    ClusterSnapshot,
    ReadyViews,
    ReplicaRecord,
    ReplicaRegistry,
    ReplicaView,
)
from switchboard.scheduler.rollout import RevisionSplit

# Re-exported: the policy types were defined here before policies.py existed.
__all__ = [
    "MAX_ALTERNATES",
    "MAX_EXPERTS",
    "NO_REPLICA",
    "QUEUE_FULL",
    "TOO_SHORT",
    "UNDECLARED",
    "ExpertCandidates",
    "ExpertShortfall",
    "InvalidPlacement",
    "LeastLoadedPolicy",
    "PlacementPolicy",
    "PlacementQuery",
    "PlacementRequest",
    "PlacementResult",
    "Placer",
    "UnknownExperts",
]

# Limits of one placement request: candidate experts, and alternates returned per expert.
MAX_EXPERTS = 64
MAX_ALTERNATES = 16

# Why an expert got no placement (also the `outcome` label of the placements metric).
NO_REPLICA = "no_replica"
UNDECLARED = "unknown_expert"
TOO_SHORT = "too_short"
QUEUE_FULL = "queue_full"
# Replicas a QUEUE_FULL reason names (the rest are counted).
_NAMED_FULL = 4


class InvalidPlacement(ValueError):
    """The placement request itself is malformed: `field` names the offending field."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class UnknownExperts(LookupError):
    """The request names experts that the experts config does not declare."""

    def __init__(self, unknown: Sequence[str], declared: Collection[str]) -> None:
        self.unknown = tuple(unknown)
        self.declared = tuple(sorted(declared))
        names = ", ".join(repr(name) for name in self.unknown)
        known = ", ".join(self.declared) or "(none)"
        plural = "s" if len(self.unknown) > 1 else ""
        super().__init__(f"unknown expert{plural} {names}; the experts config declares: {known}")


@dataclass(frozen=True)
class PlacementRequest:
    """One request to place: its candidate experts best first, and what its replicas must satisfy."""

    request_id: str
    experts: tuple[str, ...]
    prompt_tokens: int = 0
    max_tokens: int = 0
    exclude_replica_ids: frozenset[str] = frozenset()
    max_alternates: int = 0
    # Replicas with a known max_model_len (> 0) below this are skipped; 0 = no requirement.
    min_model_len: int = 0
    # The prompt's token ids made by the first expert's tokenizer (empty: not tokenized upstream);
    # prefix-aware policies hash them as each candidate replica does.
    prompt_token_ids: tuple[int, ...] = ()
    # The fingerprint of the tokenizer that made them ("" = unknown).
    tokenizer_fingerprint: str = ""
    # Hash chains of the prompt already computed, by (block size, seed): a caller that has them
    # (the simulator) saves the policies hashing the token ids again. Empty in the service.
    block_hashes: Mapping[tuple[int, int], Sequence[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertCandidates:
    """The placement on one expert: its best replica for the request and the next ones.

    The views are those of the call's snapshot, except that the reserved primary's `inflight` (and
    its in-flight token sums) already count the request.
    """

    expert: str
    replica: ReplicaView
    alternates: tuple[ReplicaView, ...] = ()


@dataclass(frozen=True)
class ExpertShortfall:
    """Why one expert got no placement: `outcome` is NO_REPLICA, UNDECLARED, TOO_SHORT or QUEUE_FULL,
    `reason` is for people."""

    expert: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class PlacementResult:
    """Placements in request order (the first holds the primary) and the experts without one."""

    placements: tuple[ExpertCandidates, ...]
    unavailable: tuple[ExpertShortfall, ...]

    @property
    def primary(self) -> ExpertCandidates | None:
        """The placement whose replica is reserved, None when no expert has a replica."""
        return self.placements[0] if self.placements else None

    def reasons(self) -> str:
        """Every shortfall's reason, in request order, for an error message."""
        return "; ".join(shortfall.reason for shortfall in self.unavailable)


class Placer:
    """Places requests on the replicas in a registry, ranked by a policy, over the declared experts."""

    def __init__(self, registry: ReplicaRegistry, policy: PlacementPolicy, experts: Collection[str]) -> None:
        self.registry = registry
        self.policy = policy
        self.experts = frozenset(experts)
        # expert -> the revision split of its rollout (`rollout.RolloutManager.splits`); experts
        # without one place over all their replicas, whatever their revision.
        self.splits: Mapping[str, RevisionSplit] = {}
        self._placed: Callable[[PlacementQuery, ReplicaView], None] | None = getattr(policy, "placed", None)
        # The least-loaded policy's `top`: its ranking cut to what placement keeps, from one pass
        # instead of a sort, and without building the query it never reads. Not for a subclass
        # that ranks its own way (it overrides `rank`), nor a policy with a `placed` hook (it reads
        # the query).
        self._top: Callable[[Sequence[ReplicaView], int], list[ReplicaView]] | None = None
        # The same policy when it also scores the default way: then `ReadyViews.least_loaded` finds
        # its first choice from the registry's records without building every candidate's view.
        self._least_loaded: LeastLoadedPolicy | None = None
        if isinstance(policy, LeastLoadedPolicy) and type(policy).rank is LeastLoadedPolicy.rank and self._placed is None:
            self._top = policy.top
            if type(policy).key is LeastLoadedPolicy.key and type(policy).score is LeastLoadedPolicy.score:
                self._least_loaded = policy

    def validate(self, request: PlacementRequest) -> None:
        """Raise InvalidPlacement or UnknownExperts when the request cannot be placed as asked."""
        experts = request.experts
        if len(experts) == 1 and experts[0] and experts[0] in self.experts and request.max_alternates <= MAX_ALTERNATES:
            return  # the usual request (one declared expert) passes every check below
        if not experts:
            raise InvalidPlacement("experts", "is required (the candidate experts, best first)")
        if len(experts) > MAX_EXPERTS:
            raise InvalidPlacement("experts", f"must list at most {MAX_EXPERTS} experts, got {len(experts)}")
        seen: set[str] = set()
        for index, name in enumerate(experts):
            if not name:
                raise InvalidPlacement("experts", f"entry {index} is empty")
            if name in seen:
                raise InvalidPlacement("experts", f"lists {name!r} more than once")
            seen.add(name)
        if request.max_alternates > MAX_ALTERNATES:
            raise InvalidPlacement(
                "max_alternates", f"must be at most {MAX_ALTERNATES}, got {request.max_alternates}"
            )
        # An undeclared expert among declared ones is only unavailable (plan() says why): a router
        # whose experts config is a step ahead of this one keeps serving from the others.
        if self.experts.isdisjoint(experts):
            raise UnknownExperts(experts, self.experts)

    def plan(self, request: PlacementRequest, snapshot: ClusterSnapshot | None = None) -> PlacementResult:
        """Where the request would go, expert by expert, on `snapshot` (default: one taken now); reserves nothing."""
        placements, unavailable = self._plan(request, self.registry.snapshot() if snapshot is None else snapshot)
        return PlacementResult(tuple(placements), tuple(unavailable))

    def _plan(
        self, request: PlacementRequest, snapshot: ClusterSnapshot | ReadyViews
    ) -> tuple[list[ExpertCandidates], list[ExpertShortfall]]:
        placements: list[ExpertCandidates] = []
        unavailable: list[ExpertShortfall] = []
        for expert in request.experts:
            found = self._place_on(expert, request, snapshot)
            if isinstance(found, ExpertCandidates):
                placements.append(found)
            else:
                unavailable.append(found)
        return placements, unavailable

    def place(self, request: PlacementRequest) -> PlacementResult:
        """Validate, plan on one fresh snapshot, and count the request in flight on the primary (when it has an id)."""
        self.validate(request)
        # What `plan` returns, but the result is built once, with the reserved primary in it. The
        # registry's lazy `ready_views` give the candidates a snapshot taken now would give, and
        # nothing changes the registry before they are all read (see `ReadyViews`).
        placements, unavailable = self._plan(request, self.registry.ready_views())
        if not placements:
            return _result((), tuple(unavailable))
        primary = placements[0]
        if self._placed is not None:
            self._placed(self._query(primary.expert, request), primary.replica)
        if request.request_id:
            replica_id = primary.replica.replica_id
            registry = self.registry
            registry.record_placement(request.request_id, replica_id, request.prompt_tokens, request.max_tokens)
            record = registry.get(replica_id)
            if record is not None and len(record.placements) != primary.replica.inflight:  # `record.inflight`
                view = _with_inflight(primary.replica, record)
                placements[0] = _candidates(primary.expert, view, primary.alternates)
        return _result(tuple(placements), tuple(unavailable))

    @staticmethod
    def _query(expert: str, request: PlacementRequest) -> PlacementQuery:
        # `PlacementQuery(request_id=..., expert=..., ...)`, built faster (`_frozen`, inlined).
        hashes: dict[tuple[int, int], list[int]] = {}  # its own copies: `prefix_hashes` extends them
        for key, chain in request.block_hashes.items():
            hashes[key] = list(chain)
        query = object.__new__(PlacementQuery)
        fields = query.__dict__
        fields["request_id"] = request.request_id
        fields["expert"] = expert
        fields["prompt_tokens"] = request.prompt_tokens
        fields["max_tokens"] = request.max_tokens
        fields["prompt_token_ids"] = request.prompt_token_ids
        fields["tokenizer_fingerprint"] = request.tokenizer_fingerprint
        fields["_hashes"] = hashes
        return query

    def _place_on(
        self, expert: str, request: PlacementRequest, snapshot: ClusterSnapshot | ReadyViews
    ) -> ExpertCandidates | ExpertShortfall:
        if expert not in self.experts:
            known = ", ".join(sorted(self.experts))
            return ExpertShortfall(
                expert, UNDECLARED, f"expert {expert!r} is not declared in the scheduler's experts config ({known})"
            )
        splits = self.splits
        if splits and expert in splits:
            return self._place_split(expert, request, snapshot, splits[expert])
        exclude = request.exclude_replica_ids
        needed = request.min_model_len  # replicas with a known max_model_len (> 0) below it are skipped
        policy = self._least_loaded
        if (
            policy is not None
            and not request.max_alternates
            and not exclude
            and isinstance(snapshot, ReadyViews)
            and snapshot.all_fit(expert, needed)
        ):
            # The usual Place (least-loaded, no alternates, nothing filtered out): the primary
            # straight from the records, what ranking every candidate's view would put first.
            best = snapshot.least_loaded(expert, policy.inflight_weight, policy.running_weight, policy.waiting_weight)
            if best is not None:
                return _candidates(expert, best, ())
        healthy = snapshot.candidates(expert)
        # The candidates that pass every filter below, in one pass (this runs on every Place);
        # the filters one by one only run when none passes, to say why.
        if not exclude and isinstance(snapshot, ReadyViews) and snapshot.all_fit(expert, needed):
            open_ = list(healthy)  # nothing to filter out: no exclusions, every replica long enough, no queue bound
        else:
            open_ = [
                r
                for r in healthy
                if r.replica_id not in exclude
                and not 0 < r.info.max_model_len < needed  # long enough (0: length not announced)
                and not 0 < r.info.max_waiting <= r.load.waiting  # queue not full (0: no bound announced)
            ]
        if not open_:
            return _shortfall(expert, healthy, exclude, needed)
        ranked = self._rank(expert, request, open_)
        alternates = tuple(ranked[1 : 1 + request.max_alternates]) if request.max_alternates else ()
        return _candidates(expert, ranked[0], alternates)

    def _rank(self, expert: str, request: PlacementRequest, views: list[ReplicaView]) -> list[ReplicaView]:
        top = self._top
        if top is not None:
            return top(views, 1 + request.max_alternates)
        return self.policy.rank(self._query(expert, request), views)

    def _place_split(
        self, expert: str, request: PlacementRequest, snapshot: ClusterSnapshot | ReadyViews, split: RevisionSplit
    ) -> ExpertCandidates | ExpertShortfall:
        """Placement on an expert in a rollout (or pinned to one revision): the replicas of the
        revision the request tries first, ranked by the policy, then those of the second, then any
        other revision's, so the primary is on the request's side when that side has an open
        replica and the alternates the gateway fails over to reach the other side."""
        exclude = request.exclude_replica_ids
        needed = request.min_model_len
        healthy = snapshot.candidates(expert)
        first_revision, second_revision = split.order(request.request_id)
        sides: tuple[list[ReplicaView], list[ReplicaView], list[ReplicaView]] = ([], [], [])
        for view in healthy:
            if (
                view.replica_id in exclude
                or 0 < view.info.max_model_len < needed
                or 0 < view.info.max_waiting <= view.load.waiting
            ):
                continue
            revision = view.info.revision
            sides[0 if revision == first_revision else 1 if revision == second_revision else 2].append(view)
        ranked: list[ReplicaView] = []
        for side in sides:
            if side:
                ranked.extend(self._rank(expert, request, side))
        if not ranked:
            return _shortfall(expert, healthy, exclude, needed)
        alternates = tuple(ranked[1 : 1 + request.max_alternates]) if request.max_alternates else ()
        return _candidates(expert, ranked[0], alternates)


def placement_request(
    request_id: str,
    experts: tuple[str, ...],
    prompt_tokens: int,
    max_tokens: int,
    exclude_replica_ids: frozenset[str],
    min_model_len: int,
    block_hashes: Mapping[tuple[int, int], Sequence[int]],
) -> PlacementRequest:
    """`PlacementRequest(...)` of a request with no token ids and no alternates asked for, built
    faster (see `_frozen`): the cluster simulator places every simulated request through one."""
    return _frozen(
        PlacementRequest,
        {
            "request_id": request_id,
            "experts": experts,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "exclude_replica_ids": exclude_replica_ids,
            "max_alternates": 0,
            "min_model_len": min_model_len,
            "prompt_token_ids": (),
            "tokenizer_fingerprint": "",
            "block_hashes": block_hashes,
        },
    )


_T = TypeVar("_T")


def _frozen(cls: type[_T], fields: dict[str, object]) -> _T:
    """An instance of the frozen dataclass `cls` (no slots, no `__post_init__`) with every field in
    `fields`: what `cls(**fields)` builds, equal and hashable alike, 2-3x faster. The generated
    `__init__` of a frozen dataclass stores each field through `object.__setattr__`; this writes
    the new instance's `__dict__` at once. Used for the objects built on every Place
    (tests/test_placement.py checks each equals its dataclass construction)."""
    out = object.__new__(cls)
    out.__dict__.update(fields)
    return out


def _candidates(expert: str, replica: ReplicaView, alternates: tuple[ReplicaView, ...]) -> ExpertCandidates:
    """`ExpertCandidates(expert, replica, alternates)`, built faster (`_frozen`, inlined)."""
    out = object.__new__(ExpertCandidates)
    fields = out.__dict__
    fields["expert"] = expert
    fields["replica"] = replica
    fields["alternates"] = alternates
    return out


def _result(placements: tuple[ExpertCandidates, ...], unavailable: tuple[ExpertShortfall, ...]) -> PlacementResult:
    """`PlacementResult(placements, unavailable)`, built faster (`_frozen`, inlined)."""
    out = object.__new__(PlacementResult)
    fields = out.__dict__
    fields["placements"] = placements
    fields["unavailable"] = unavailable
    return out


def _shortfall(
    expert: str, healthy: Sequence[ReplicaView], exclude: frozenset[str], needed: int
) -> ExpertShortfall:
    """Why no healthy replica of `expert` can take the request: the first filter that leaves none."""
    untried = [r for r in healthy if r.replica_id not in exclude]
    if not untried:
        tried = len(healthy) - len(untried)
        excluded = f" (excluding {tried} already tried)" if tried else ""
        return ExpertShortfall(expert, NO_REPLICA, f"no healthy replica of expert {expert!r}{excluded}")
    fitting = [r for r in untried if not (needed and 0 < r.info.max_model_len < needed)]
    if not fitting:
        longest = max(r.info.max_model_len for r in untried)
        return ExpertShortfall(
            expert,
            TOO_SHORT,
            f"replicas of {expert!r} accept at most {longest} tokens, the request needs {needed}",
        )
    # Every fitting replica's last reported waiting count has reached the bound it announced: it
    # would refuse the request (RESOURCE_EXHAUSTED); 0 = no bound announced.
    return ExpertShortfall(expert, QUEUE_FULL, _queue_full_reason(expert, fitting))


def _with_inflight(view: ReplicaView, record: ReplicaRecord) -> ReplicaView:
    """`view` with the record's current in-flight count and token sums: `view._replace(inflight=...,
    inflight_prompt_tokens=..., inflight_max_tokens=...)`, built directly (once per Place)."""
    return tuple.__new__(
        ReplicaView,
        (
            view[0],
            view[1],
            view[2],
            view[3],
            view[4],
            len(record.placements),  # `record.inflight`
            view[6],
            view[7],
            view[8],
            record.inflight_prompt_tokens,
            record.inflight_max_tokens,
        ),
    )


def _queue_full_reason(expert: str, full: Sequence[ReplicaView]) -> str:
    """E.g. "every replica of 'bard' has a full queue (8 waiting of 8)", naming each replica when there are several."""
    if len(full) == 1:
        load = f"{full[0].load.waiting} waiting of {full[0].info.max_waiting}"
    else:
        named = [
            f"{r.replica_id}: {r.load.waiting} waiting of {r.info.max_waiting}" for r in full[:_NAMED_FULL]
        ]
        if len(full) > _NAMED_FULL:
            named.append(f"{len(full) - _NAMED_FULL} more")
        load = "; ".join(named)
    return f"every replica of expert {expert!r} has a full queue ({load})"
