"""The replica registry: which generator replicas exist, their last load, health and in-flight work.

Replicas register, send heartbeats (`ReportLoad`) and deregister. A replica whose last heartbeat
is older than the expiry is considered dead and dropped by `expire()`, which the service calls
from a periodic sweep task. The registry also counts the requests placed on each replica and not
yet completed (`inflight`): that count moves at once with every placement, while the load a
replica reports only arrives with its next heartbeat, so placing by it avoids sending a burst of
requests to the replica that looked idlest a second ago.

The registry is the one owner of this state: everything runs on one asyncio event loop, so no
locks are needed, and every mutation goes through its methods. Readers that decide something (the
placement policies) get a `ClusterSnapshot` instead: frozen views of every replica taken at one
instant, so a policy can never see half-updated state and a learned policy gets the same input as
the heuristics. The clock is injectable so the domain logic can be tested without sleeping.

Each record also holds the replica's `PrefixIndex` (its prefix cache, folded from the KV events it
reports, see `prefix_index.py`); a registration starts a fresh one, and it goes with the record on
deregistration and expiry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import NamedTuple

from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.prefix_index import KvAck, KvEventsIn, PrefixIndex


class DuplicateReplica(ValueError):
    """A registration whose id a different live replica holds (another expert or address)."""

    def __init__(self, info: ReplicaInfo, holder: ReplicaRecord, age: float, expiry: float) -> None:
        what = (
            f"expert {holder.expert!r}" if holder.expert != info.expert else f"the replica at {holder.info.address}"
        )
        super().__init__(
            f"replica id {info.replica_id!r} is taken by {what}, heard from {age:.1f} s ago; give this replica "
            f"its own id (GENERATOR_REPLICA_ID), or, if that replica is gone, it expires {expiry:g} s after its "
            "last heartbeat and the id is free again"
        )
        self.retry_after_seconds = max(0.0, expiry - age)


class ReplicaState(Enum):
    """The scheduler's view of a replica's health (mirrors `switchboard.v1.ReplicaState`)."""

    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class LoadSnapshot:
    """One replica's self-reported load (mirrors `switchboard.v1.ReplicaLoad`)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    tokens_per_second: float = 0.0
    # Requests the replica ended since it started, and of those failed (cumulative counters;
    # `rollout.RevisionLedger` takes the differences between heartbeats).
    requests_ended: int = 0
    requests_failed: int = 0

    @property
    def kv_utilization(self) -> float:
        """Fraction of the KV-cache pool in use, 0 when the replica reported no pool."""
        if self.kv_blocks_total <= 0:
            return 0.0
        return self.kv_blocks_used / self.kv_blocks_total


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica announces about itself when it registers."""

    replica_id: str
    expert: str
    address: str
    device: str = ""
    model_name: str = ""
    max_model_len: int = 0
    # How its prefix cache hashes token ids (tokens per block, chain seed of its model identity):
    # the scheduler hashes a request's token ids the same way to match them against its index.
    # 0 block size = not announced (no prefix matching on this replica).
    kv_block_size: int = 0
    kv_hash_seed: int = 0
    # Which tokenizer made the token ids it expects (its fingerprint; "" = not announced).
    tokenizer_fingerprint: str = ""
    # Its fitted step-cost model, for latency-predicting policies (None = not announced).
    cost_model: CostModel | None = None
    # The bound on its waiting queue: nothing is placed on it while its reported `waiting` is at
    # least this (it would refuse with RESOURCE_EXHAUSTED). 0 = not announced (no bound known).
    max_waiting: int = 0
    # The revision of its expert it serves ("" = not announced): rollouts move traffic between them.
    revision: str = ""


class Placement(NamedTuple):
    """One request counted in flight on a replica: when it was placed and how big it is.

    A named tuple (immutable all the same) rather than a frozen dataclass: one is built on every
    Place, and a frozen dataclass's `__init__` costs several times more.
    """

    placed_at: float
    prompt_tokens: int = 0
    max_tokens: int = 0


@dataclass
class ReplicaRecord:
    """The registry's entry for one replica."""

    info: ReplicaInfo
    load: LoadSnapshot
    state: ReplicaState
    last_heartbeat: float
    registered_at: float
    # request_id -> its placement, for requests placed here and not yet completed.
    placements: dict[str, Placement] = field(default_factory=dict)
    # Its prefix cache as its KV events describe it.
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    # Sums over `placements`, kept in step with it by the registry (O(1) per snapshot).
    inflight_prompt_tokens: int = 0
    inflight_max_tokens: int = 0
    # What the last heartbeat cannot show yet: the prompt tokens placed here since it, and when
    # the newest placement was made and how big its prompt was (it may still be prefilling).
    placed_since_report_tokens: int = 0
    last_placed_at: float = -math.inf
    last_placed_prompt_tokens: int = 0

    @property
    def replica_id(self) -> str:
        """The replica's unique id."""
        return self.info.replica_id

    @property
    def expert(self) -> str:
        """The expert pool it serves."""
        return self.info.expert

    @property
    def inflight(self) -> int:
        """Requests placed on this replica and not yet completed."""
        return len(self.placements)


class ReplicaView(NamedTuple):
    """One replica as a `ClusterSnapshot` saw it: immutable, detached from the registry.

    `info` and `load` are the registry's own frozen objects (shared, never copied); the counts are
    copied at the snapshot's instant. `healthy` is READY and heard from within the expiry. A named
    tuple rather than a frozen dataclass because a snapshot builds one per replica on every Place:
    it is built about 3x faster (bench/scheduler_bench.py), and assigning a field raises all the same.

    `prefix` is the one exception to "detached": the record's live prefix index (copying it per
    Place would cost O(cached blocks)). A policy reads it within one synchronous `rank` call, and
    the index only changes in ReportLoad handlers on the same event loop, so it cannot change under
    the policy. `inflight_prompt_tokens` and `inflight_max_tokens` are the sums of the prompt
    tokens and output budgets of the requests counted in `inflight`; `placed_since_report_tokens`
    the prompt tokens placed since the last heartbeat (which `load` does not show yet), and
    `last_placed_age` / `last_placed_prompt_tokens` how long ago the newest placement was made
    (inf: never) and its prompt's size.
    """

    replica_id: str
    expert: str
    info: ReplicaInfo
    load: LoadSnapshot
    state: ReplicaState
    inflight: int
    heartbeat_age: float
    healthy: bool
    prefix: PrefixIndex | None = None
    inflight_prompt_tokens: int = 0
    inflight_max_tokens: int = 0
    placed_since_report_tokens: int = 0
    last_placed_age: float = math.inf
    last_placed_prompt_tokens: int = 0

    @property
    def max_model_len(self) -> int:
        """The longest sequence the replica accepts (0 = not reported)."""
        return self.info.max_model_len


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Every replica at one instant, read-only: what placement policies decide on.

    `replicas`: replica id -> view, every known replica (draining and stale ones too).
    `ready`: expert -> ids of its healthy replicas (READY and heard from within the expiry), by id;
    an expert without one is absent. Both mappings are read-only proxies over dicts that nothing
    else holds, so later registry changes never show through.
    """

    taken_at: float
    replicas: Mapping[str, ReplicaView]
    ready: Mapping[str, tuple[str, ...]]

    def candidates(self, expert: str) -> tuple[ReplicaView, ...]:
        """The healthy replicas of one expert, by id (empty when it has none)."""
        return tuple(map(self.replicas.__getitem__, self.ready.get(expert, ())))

    def views(self) -> list[ReplicaView]:
        """Every replica, ordered by expert then id."""
        return sorted(self.replicas.values(), key=lambda v: (v.expert, v.replica_id))


class ReadyViews:
    """The part of a `ClusterSnapshot` that placement reads, taken lazily: `candidates(expert)`
    gives the views that `registry.snapshot().candidates(expert)` would have given at `taken_at`.

    Placing one request only needs its candidate experts' healthy replicas, so building every
    replica's view, the id mapping and the ready sets per Place (what `snapshot` does) is wasted
    work, the largest part of a placement at a handful of replicas (the cluster simulator places
    thousands of requests per wall second). Every expert's views are of the same instant
    (`taken_at`, one clock reading), as in a snapshot. Unlike a snapshot it reads the registry
    when asked, so it is only valid until the registry next changes: `Placer.place` uses it
    within one synchronous call, before it records the placement.
    """

    __slots__ = ("_bounded", "_by_expert", "_expiry", "_shortest", "taken_at")

    def __init__(
        self,
        taken_at: float,
        expiry_seconds: float,
        by_expert: Mapping[str, tuple[ReplicaRecord, ...]],
        shortest: Mapping[str, int] | None = None,
        bounded: Collection[str] = (),
    ) -> None:
        self.taken_at = taken_at
        self._expiry = expiry_seconds
        self._by_expert = by_expert  # the registry's live records of each expert, by id
        self._shortest = shortest or {}  # expert -> its smallest announced max_model_len (> 0)
        self._bounded = bounded  # experts with a replica that announced a max_waiting (> 0)

    def all_fit(self, expert: str, min_model_len: int) -> bool:
        """Whether placement's length and queue filters pass every replica of `expert`: none
        announced a waiting bound, and none a `max_model_len` below `min_model_len` (a record's
        announcements never change: a re-registration replaces the record)."""
        return expert not in self._bounded and min_model_len <= self._shortest.get(expert, min_model_len)

    def candidates(self, expert: str) -> tuple[ReplicaView, ...]:
        """The healthy replicas of one expert at `taken_at`, by id (empty when it has none): the
        views `snapshot` builds for them, in the order of its ready set."""
        now = self.taken_at
        expiry = self._expiry
        ready_state = ReplicaState.READY
        new_view = tuple.__new__
        views: list[ReplicaView] = []
        for record in self._by_expert.get(expert, ()):
            age = now - record.last_heartbeat
            if record.state is not ready_state or age > expiry:
                continue  # not healthy: `snapshot` leaves it out of the ready set
            info = record.info
            # The view `snapshot` builds for it (see there), healthy by construction.
            views.append(
                new_view(
                    ReplicaView,
                    (
                        info.replica_id,
                        expert,
                        info,
                        record.load,
                        ready_state,
                        len(record.placements),
                        age if age > 0.0 else 0.0,
                        True,
                        record.prefix,
                        record.inflight_prompt_tokens,
                        record.inflight_max_tokens,
                        record.placed_since_report_tokens,
                        now - record.last_placed_at,
                        record.last_placed_prompt_tokens,
                    ),
                )
            )
        return tuple(views)

    def least_loaded(
        self, expert: str, inflight_weight: float, running_weight: float, waiting_weight: float
    ) -> ReplicaView | None:
        """The first of `LeastLoadedPolicy(inflight_weight, running_weight, waiting_weight).rank`
        over `candidates(expert)` (None when there are none), building only that one view.

        For `Placer.place` of a request that asks for no alternates and passes every filter
        (`all_fit`, nothing excluded): only the primary is kept then, and building a view per
        replica to rank them was most of a Place. The same arithmetic as the policy's key
        (score, then KV utilization, then id; keys are unique), so the same replica.
        """
        now = self.taken_at
        expiry = self._expiry
        ready_state = ReplicaState.READY
        best: ReplicaRecord | None = None
        best_score = best_util = 0.0
        for record in self._by_expert.get(expert, ()):
            if record.state is not ready_state or now - record.last_heartbeat > expiry:
                continue  # not healthy: not a candidate
            load = record.load
            score = inflight_weight * len(record.placements) + running_weight * load.running + waiting_weight * load.waiting
            if best is not None and score > best_score:
                continue  # the usual case: decided by the score alone
            total = load.kv_blocks_total
            util = load.kv_blocks_used / total if total > 0 else 0.0
            # The key tuples compared field by field.
            if (
                best is None
                or score < best_score
                or util < best_util
                or (util == best_util and record.info.replica_id < best.info.replica_id)
            ):
                best, best_score, best_util = record, score, util
        if best is None:
            return None
        info = best.info
        age = now - best.last_heartbeat
        # The view `candidates` builds for it.
        return tuple.__new__(
            ReplicaView,
            (
                info.replica_id,
                expert,
                info,
                best.load,
                ready_state,
                len(best.placements),
                age if age > 0.0 else 0.0,
                True,
                best.prefix,
                best.inflight_prompt_tokens,
                best.inflight_max_tokens,
                best.placed_since_report_tokens,
                now - best.last_placed_at,
                best.last_placed_prompt_tokens,
            ),
        )


class ReplicaRegistry:
    """Holds every known replica; all mutations go through its methods.

    `expiry_seconds`: a replica silent for longer is dropped by `expire()`.
    `placement_ttl_seconds`: a placement never reported complete (its gateway died) stops counting
    as in-flight after this long, so a lost `Complete` cannot inflate a replica's load forever.
    """

    def __init__(
        self,
        expiry_seconds: float,
        placement_ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if expiry_seconds <= 0:
            raise ValueError(f"expiry_seconds must be > 0, got {expiry_seconds}")
        self.expiry_seconds = expiry_seconds
        self.placement_ttl_seconds = placement_ttl_seconds
        self._clock = clock
        self._replicas: dict[str, ReplicaRecord] = {}
        # expert -> its records ordered by id, for `ready_views` (every Place); rebuilt lazily
        # after a registration or a removal, the only changes to which records exist.
        self._by_expert: dict[str, tuple[ReplicaRecord, ...]] | None = None
        # For `ReadyViews.all_fit`, rebuilt with it.
        self._shortest: dict[str, int] = {}
        self._bounded: frozenset[str] = frozenset()
        # request_id -> replica_id, so Complete finds the replica even without its id.
        self._request_index: dict[str, str] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The registry's clock (monotonic seconds unless a test injected another)."""
        return self._clock

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._replicas

    def get(self, replica_id: str) -> ReplicaRecord | None:
        """The record of one replica, or None when unknown."""
        return self._replicas.get(replica_id)

    def register(self, info: ReplicaInfo, load: LoadSnapshot | None = None) -> bool:
        """Add a replica or refresh an existing one; returns True when it was new.

        A re-registration (same id, e.g. after the scheduler restarted or the replica expired)
        keeps the placements still counted against it when it stays at the same address, and
        resets the state to READY. An id that a healthy replica of another expert or at another
        address holds raises `DuplicateReplica`: two processes sharing an id would take each
        other's traffic in turns (a draining or silent holder gives the id up).
        """
        now = self._clock()
        existing = self._replicas.get(info.replica_id)
        if (
            existing is not None
            and self.is_healthy(existing)
            and (existing.expert != info.expert or existing.info.address != info.address)
        ):
            raise DuplicateReplica(info, existing, now - existing.last_heartbeat, self.expiry_seconds)
        placements: dict[str, Placement] = {}
        if existing is not None and existing.info.address == info.address:
            placements = existing.placements
        elif existing is not None:
            self._forget_placements(existing)
        self._by_expert = None
        self._replicas[info.replica_id] = ReplicaRecord(
            info=info,
            load=load or LoadSnapshot(),
            state=ReplicaState.READY,
            last_heartbeat=now,
            registered_at=existing.registered_at if existing is not None else now,
            placements=placements,
            inflight_prompt_tokens=sum(p.prompt_tokens for p in placements.values()),
            inflight_max_tokens=sum(p.max_tokens for p in placements.values()),
        )
        return existing is None

    def report_load(self, replica_id: str, load: LoadSnapshot, draining: bool = False) -> bool:
        """Record a heartbeat; returns False when the replica is unknown (it must register again)."""
        record = self._replicas.get(replica_id)
        if record is None:
            return False
        record.load = load
        record.last_heartbeat = self._clock()
        record.placed_since_report_tokens = 0
        if draining:
            record.state = ReplicaState.DRAINING
        return True

    def set_draining(self, replica_id: str, draining: bool = True) -> bool:
        """Mark a replica draining (placement skips it) or ready again, without touching its
        heartbeat; the allocation controller drains a replica this way before it stops it.
        Returns False when the replica is unknown."""
        record = self._replicas.get(replica_id)
        if record is None:
            return False
        record.state = ReplicaState.DRAINING if draining else ReplicaState.READY
        return True

    def apply_kv_events(self, replica_id: str, batch: KvEventsIn) -> KvAck | None:
        """Fold a replica's KV events into its prefix index (validate first: `prefix_index.validate`);
        None when the replica is unknown."""
        record = self._replicas.get(replica_id)
        if record is None:
            return None
        return record.prefix.apply(batch)

    def kv_ack(self, replica_id: str) -> KvAck | None:
        """The replica's last folded KV sequence and whether it must resync; None when unknown."""
        record = self._replicas.get(replica_id)
        return None if record is None else record.prefix.ack()

    def matched_blocks(self, replica_id: str, block_hashes: Iterable[int]) -> int:
        """How many leading blocks of a request's hash chain the replica caches (0 when unknown)."""
        record = self._replicas.get(replica_id)
        return 0 if record is None else record.prefix.matched_blocks(list(block_hashes))

    def deregister(self, replica_id: str) -> ReplicaRecord | None:
        """Remove a replica; returns its record, or None when it was not known."""
        record = self._replicas.pop(replica_id, None)
        if record is not None:
            self._by_expert = None
            self._forget_placements(record)
        return record

    def expire(self) -> list[ReplicaRecord]:
        """Drop every replica silent for longer than the expiry (and stale placements); returns the dropped."""
        now = self._clock()
        expired = [r for r in self._replicas.values() if now - r.last_heartbeat > self.expiry_seconds]
        for record in expired:
            self.deregister(record.replica_id)
        ttl = self.placement_ttl_seconds
        for record in self._replicas.values():
            if not record.placements:
                continue
            stale = [rid for rid, p in record.placements.items() if now - p.placed_at > ttl]
            for request_id in stale:
                _drop_placement(record, request_id)
                self._request_index.pop(request_id, None)
        return expired

    def is_healthy(self, record: ReplicaRecord) -> bool:
        """READY and heard from within the expiry (the sweep may not have run yet)."""
        fresh = self._clock() - record.last_heartbeat <= self.expiry_seconds
        return record.state is ReplicaState.READY and fresh

    def count_ready(self, expert: str, revision: str) -> int:
        """How many healthy replicas of `expert` serve `revision`."""
        return sum(1 for r in self.healthy_replicas(expert) if r.info.revision == revision)

    def healthy_replicas(self, expert: str, exclude: Iterable[str] = ()) -> list[ReplicaRecord]:
        """Healthy replicas of one expert, minus the excluded ids."""
        excluded = set(exclude)
        return [
            r
            for r in self._replicas.values()
            if r.expert == expert and r.replica_id not in excluded and self.is_healthy(r)
        ]

    def snapshot(self) -> ClusterSnapshot:
        """A frozen view of every replica now (O(replicas); see bench/scheduler_bench.py for its cost)."""
        now = self._clock()
        expiry = self.expiry_seconds
        ready_state = ReplicaState.READY
        views: dict[str, ReplicaView] = {}
        ready: dict[str, list[str]] = {}
        # Every Place takes a snapshot: each view is built by `tuple.__new__` with all its fields
        # in order (what the named tuple's own `__new__` does, less a Python-level call per view).
        new_view = tuple.__new__
        for rid, record in self._replicas.items():
            age = now - record.last_heartbeat
            state = record.state
            healthy = state is ready_state and age <= expiry
            info = record.info
            expert = info.expert
            views[rid] = new_view(
                ReplicaView,
                (
                    rid,
                    expert,
                    info,
                    record.load,
                    state,
                    len(record.placements),
                    age if age > 0.0 else 0.0,  # max(0.0, age)
                    healthy,
                    record.prefix,
                    record.inflight_prompt_tokens,
                    record.inflight_max_tokens,
                    record.placed_since_report_tokens,
                    now - record.last_placed_at,
                    record.last_placed_prompt_tokens,
                ),
            )
            if healthy:
                ids = ready.get(expert)
                if ids is None:
                    ready[expert] = [rid]
                else:
                    ids.append(rid)
        return ClusterSnapshot(
            taken_at=now,
            replicas=MappingProxyType(views),
            ready=MappingProxyType({expert: tuple(sorted(ids)) for expert, ids in ready.items()}),
        )

    def ready_views(self) -> ReadyViews:
        """The healthy replicas of each expert as `snapshot()` would show them now, built only
        when asked for and only for that expert (what `Placer.place` reads: see `ReadyViews`)."""
        by_expert = self._by_expert
        if by_expert is None:
            grouped: dict[str, list[ReplicaRecord]] = {}
            for record in self._replicas.values():
                grouped.setdefault(record.info.expert, []).append(record)
            by_expert = self._by_expert = {
                name: tuple(sorted(records, key=_record_id)) for name, records in grouped.items()
            }
            # What `ReadyViews.all_fit` needs, from the same records (their info never changes).
            shortest: dict[str, int] = {}
            for record in self._replicas.values():
                info = record.info
                if info.max_model_len > 0 and info.max_model_len < shortest.get(info.expert, 1 << 62):
                    shortest[info.expert] = info.max_model_len
            self._shortest = shortest
            self._bounded = frozenset(r.info.expert for r in self._replicas.values() if r.info.max_waiting > 0)
        return ReadyViews(self._clock(), self.expiry_seconds, by_expert, self._shortest, self._bounded)

    def replicas(self) -> list[ReplicaRecord]:
        """Every known replica, ordered by expert then id."""
        return sorted(self._replicas.values(), key=lambda r: (r.expert, r.replica_id))

    def seconds_since_heartbeat(self, record: ReplicaRecord) -> float:
        """Age of the replica's last heartbeat."""
        return max(0.0, self._clock() - record.last_heartbeat)

    def record_placement(self, request_id: str, replica_id: str, prompt_tokens: int = 0, max_tokens: int = 0) -> None:
        """Count a request (of this size) as in flight on a replica (until `complete`)."""
        record = self._replicas.get(replica_id)
        if record is None:
            return
        previous = self._request_index.get(request_id)
        if previous is not None and previous in self._replicas:
            # A retry of the same request on another replica (or the same one): it runs only here now.
            _drop_placement(self._replicas[previous], request_id)
        now = self._clock()
        record.placements[request_id] = Placement(now, prompt_tokens, max_tokens)
        record.inflight_prompt_tokens += prompt_tokens
        record.inflight_max_tokens += max_tokens
        record.placed_since_report_tokens += prompt_tokens
        record.last_placed_at = now
        record.last_placed_prompt_tokens = prompt_tokens
        self._request_index[request_id] = replica_id

    def complete(self, request_id: str, replica_id: str = "") -> ReplicaRecord | None:
        """Stop counting a request as in flight; returns the replica it ran on, if known."""
        owner = self._request_index.pop(request_id, None) or replica_id
        record = self._replicas.get(owner)
        if record is not None:
            _drop_placement(record, request_id)
        return record

    def _forget_placements(self, record: ReplicaRecord) -> None:
        for request_id in record.placements:
            if self._request_index.get(request_id) == record.replica_id:
                del self._request_index[request_id]
        record.placements.clear()
        record.inflight_prompt_tokens = record.inflight_max_tokens = 0


def _record_id(record: ReplicaRecord) -> str:
    return record.info.replica_id


def _drop_placement(record: ReplicaRecord, request_id: str) -> None:
    """Stop counting one request on a record, keeping its token sums in step."""
    placement = record.placements.pop(request_id, None)
    if placement is not None:
        record.inflight_prompt_tokens -= placement.prompt_tokens
        record.inflight_max_tokens -= placement.max_tokens
