"""Unit tests of the multi-expert placement core (`Placer`), without a server or gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from switchboard.scheduler.placement import (
    MAX_EXPERTS,
    NO_REPLICA,
    QUEUE_FULL,
    TOO_SHORT,
    InvalidPlacement,
    LeastLoadedPolicy,
    PlacementQuery,
    PlacementRequest,
    Placer,
    UnknownExperts,
)
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRecord, ReplicaRegistry

EXPERTS = ("a", "b", "c")


def make_placer(*replicas: tuple[str, str, int], policy: object | None = None) -> Placer:
    """A placer over a registry holding (replica_id, expert, max_model_len) replicas."""
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for port, (replica_id, expert, max_model_len) in enumerate(replicas, start=50061):
        registry.register(
            ReplicaInfo(replica_id, expert, f"127.0.0.1:{port}", max_model_len=max_model_len), LoadSnapshot()
        )
    return Placer(registry, policy or LeastLoadedPolicy(), EXPERTS)


def request(*experts: str, request_id: str = "r1", **fields: Any) -> PlacementRequest:
    """A placement request for `experts`, best first."""
    return PlacementRequest(request_id=request_id, experts=experts, **fields)


def inflight(placer: Placer) -> dict[str, int]:
    """Replica id -> requests counted in flight on it."""
    return {r.replica_id: r.inflight for r in placer.registry.replicas()}


def test_place_reserves_only_the_primary_in_request_order() -> None:
    placer = make_placer(("a1", "a", 0), ("a2", "a", 0), ("c1", "c", 0))
    result = placer.place(request("c", "b", "a", max_alternates=4))
    assert [p.expert for p in result.placements] == ["c", "a"]
    assert result.primary is not None and result.primary.replica.replica_id == "c1"
    assert [r.replica_id for r in result.placements[1].alternates] == ["a2"]
    assert [(u.expert, u.outcome) for u in result.unavailable] == [("b", NO_REPLICA)]
    assert inflight(placer) == {"a1": 0, "a2": 0, "c1": 1}


def test_plan_reserves_nothing_and_no_request_id_reserves_nothing() -> None:
    placer = make_placer(("a1", "a", 0))
    assert placer.plan(request("a")).primary is not None
    placer.place(request("a", request_id=""))
    assert inflight(placer) == {"a1": 0}


def test_a_second_request_sees_the_first_reservation() -> None:
    placer = make_placer(("a1", "a", 0), ("a2", "a", 0))
    first = placer.place(request("a", request_id="r1"))
    second = placer.place(request("a", request_id="r2"))
    assert {first.placements[0].replica.replica_id, second.placements[0].replica.replica_id} == {"a1", "a2"}


def test_the_reserved_primary_counts_the_request_and_its_size() -> None:
    placer = make_placer(("a1", "a", 0))
    placer.place(request("a", request_id="r1", prompt_tokens=300, max_tokens=40))
    result = placer.place(request("a", request_id="r2", prompt_tokens=100, max_tokens=20))
    view = result.placements[0].replica
    assert (view.inflight, view.inflight_prompt_tokens, view.inflight_max_tokens) == (2, 400, 60)
    placer.registry.complete("r1")
    record = placer.registry.get("a1")
    assert record is not None and (record.inflight_prompt_tokens, record.inflight_max_tokens) == (100, 20)


def test_min_model_len_skips_short_replicas_and_says_why() -> None:
    placer = make_placer(("a-short", "a", 256), ("a-unknown", "a", 0), ("b1", "b", 512), ("b2", "b", 300))
    result = placer.place(request("b", "a", min_model_len=900))
    assert [(p.expert, p.replica.replica_id) for p in result.placements] == [("a", "a-unknown")]
    [shortfall] = result.unavailable
    assert shortfall.outcome == TOO_SHORT
    assert shortfall.reason == "replicas of 'b' accept at most 512 tokens, the request needs 900"
    # Without a requirement every replica is eligible.
    assert placer.plan(request("b")).primary is not None


def full_queue_placer(*replicas: tuple[str, str, int, int]) -> Placer:
    """A placer over (replica_id, expert, max_waiting, waiting) replicas."""
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for port, (replica_id, expert, max_waiting, waiting) in enumerate(replicas, start=50061):
        registry.register(
            ReplicaInfo(replica_id, expert, f"127.0.0.1:{port}", max_waiting=max_waiting),
            LoadSnapshot(waiting=waiting),
        )
    return Placer(registry, LeastLoadedPolicy(), EXPERTS)


def test_replicas_with_a_full_queue_are_not_candidates() -> None:
    """a1 reports 4 waiting of 4 (full), a2 one below its bound, a3 no bound (0): only a2 and a3 are candidates."""
    placer = full_queue_placer(("a1", "a", 4, 4), ("a2", "a", 4, 3), ("a3", "a", 0, 50))
    result = placer.place(request("a", max_alternates=4))
    assert result.primary is not None
    ids = {result.primary.replica.replica_id, *(r.replica_id for r in result.primary.alternates)}
    assert ids == {"a2", "a3"} and not result.unavailable
    assert inflight(placer)["a1"] == 0


def test_every_replica_full_is_its_own_outcome_and_the_next_expert_takes_it() -> None:
    placer = full_queue_placer(("a1", "a", 8, 8), ("b1", "b", 2, 5), ("b2", "b", 2, 2), ("c1", "c", 8, 0))
    result = placer.place(request("a", "b", "c"))
    assert result.primary is not None and result.primary.replica.replica_id == "c1"
    assert [(u.expert, u.outcome) for u in result.unavailable] == [("a", QUEUE_FULL), ("b", QUEUE_FULL)]
    assert result.unavailable[0].reason == "every replica of expert 'a' has a full queue (8 waiting of 8)"
    assert result.unavailable[1].reason == (
        "every replica of expert 'b' has a full queue (b1: 5 waiting of 2; b2: 2 waiting of 2)"
    )
    # Once a heartbeat reports the queue below its bound, the replica is a candidate again.
    placer.registry.report_load("a1", LoadSnapshot(waiting=7))
    assert placer.place(request("a", request_id="r2")).primary is not None


def test_a_full_queue_reason_names_at_most_four_replicas() -> None:
    placer = full_queue_placer(*((f"a{i}", "a", 1, 1) for i in range(6)))
    (shortfall,) = placer.place(request("a")).unavailable
    assert shortfall.outcome == QUEUE_FULL and shortfall.reason.endswith("a3: 1 waiting of 1; 2 more)")


def test_exclusions_and_reasons_in_request_order() -> None:
    placer = make_placer(("a1", "a", 0), ("b1", "b", 100))
    result = placer.place(request("a", "c", "b", exclude_replica_ids=frozenset({"a1"}), min_model_len=200))
    assert result.primary is None and inflight(placer) == {"a1": 0, "b1": 0}
    assert result.reasons() == (
        "no healthy replica of expert 'a' (excluding 1 already tried); "
        "no healthy replica of expert 'c'; "
        "replicas of 'b' accept at most 100 tokens, the request needs 200"
    )


@pytest.mark.parametrize(
    ("req", "field", "says"),
    [
        (request(), "experts", "required"),
        (request("a", "b", "a"), "experts", "'a' more than once"),
        (request(*[f"e{i}" for i in range(MAX_EXPERTS + 1)]), "experts", f"at most {MAX_EXPERTS}"),
        (request("a", ""), "experts", "entry 1 is empty"),
        (request("a", max_alternates=17), "max_alternates", "at most 16"),
    ],
)
def test_invalid_requests(req: PlacementRequest, field: str, says: str) -> None:
    placer = make_placer(("a1", "a", 0))
    with pytest.raises(InvalidPlacement) as info:
        placer.place(req)
    assert info.value.field == field and says in info.value.description
    assert inflight(placer) == {"a1": 0}


def test_unknown_experts_name_themselves_and_the_declared_ones() -> None:
    placer = make_placer(("a1", "a", 0))
    with pytest.raises(UnknownExperts) as info:
        placer.place(request("x", "y"))
    assert info.value.unknown == ("x", "y")
    assert str(info.value) == "unknown experts 'x', 'y'; the experts config declares: a, b, c"
    assert inflight(placer) == {"a1": 0}
    # Among declared experts an undeclared one is only unavailable: the request is still served.
    result = placer.place(request("x", "a", "y"))
    assert [p.expert for p in result.placements] == ["a"] and inflight(placer) == {"a1": 1}
    assert [(u.expert, u.outcome) for u in result.unavailable] == [("x", "unknown_expert"), ("y", "unknown_expert")]
    assert "not declared in the scheduler's experts config" in result.unavailable[0].reason
    # Exactly MAX_EXPERTS distinct names is allowed (and then checked against the config).
    with pytest.raises(UnknownExperts):
        placer.place(request(*[f"e{i}" for i in range(MAX_EXPERTS)]))


@dataclass(frozen=True)
class ReversedPolicy:
    """Ranks by replica id, descending: shows the placer keeps the policy's order per expert."""

    name: str = "reversed"

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaRecord]) -> list[ReplicaRecord]:
        return sorted(candidates, key=lambda r: r.replica_id, reverse=True)


def test_the_policy_ranks_each_expert() -> None:
    placer = make_placer(("a1", "a", 0), ("a2", "a", 0), ("a3", "a", 0), policy=ReversedPolicy())
    result = placer.place(request("a", max_alternates=1))
    placement = result.placements[0]
    assert placement.replica.replica_id == "a3"
    assert [r.replica_id for r in placement.alternates] == ["a2"]


def test_ready_views_give_the_snapshots_candidates() -> None:
    """`Placer.place` reads the registry's lazy `ready_views`: the very views a snapshot gives."""
    now = [100.0]
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=lambda: now[0])
    for rid, expert in [("b-1", "b"), ("a-2", "a"), ("a-0", "a"), ("a-1", "a")]:
        registry.register(ReplicaInfo(rid, expert, f"sim:{rid}"), LoadSnapshot(running=len(rid)))
    registry.record_placement("x", "a-1", 10, 20)
    now[0] = 103.0
    registry.report_load("a-0", LoadSnapshot(running=3, waiting=1))
    registry.report_load("a-2", LoadSnapshot(), draining=True)
    now[0] = 106.5  # a-1 and b-1 heard from 6.5 s ago: stale
    registry.report_load("a-1", LoadSnapshot(running=1))
    for expert in ("a", "b", "c"):
        assert registry.ready_views().candidates(expert) == registry.snapshot().candidates(expert)
    assert [v.replica_id for v in registry.ready_views().candidates("a")] == ["a-0", "a-1"]
    assert registry.ready_views().all_fit("a", 10**6)
    registry.register(ReplicaInfo("a-3", "a", "sim:a-3", max_model_len=64))  # a new record: rebuilt
    registry.register(ReplicaInfo("b-2", "b", "sim:b-2", max_waiting=4))
    views = registry.ready_views()
    assert views.candidates("a") == registry.snapshot().candidates("a")
    assert views.all_fit("a", 64) and not views.all_fit("a", 65)
    assert not views.all_fit("b", 1) and views.all_fit("c", 1)
    registry.deregister("a-0")
    assert registry.ready_views().candidates("a") == registry.snapshot().candidates("a")


def test_the_hot_path_constructors_build_the_dataclasses_own_instances() -> None:
    from switchboard.scheduler.placement import (
        ExpertCandidates,
        PlacementResult,
        _candidates,
        _result,
        placement_request,
    )

    fields: dict[str, Any] = {
        "request_id": "r1",
        "experts": ("a",),
        "prompt_tokens": 5,
        "max_tokens": 6,
        "exclude_replica_ids": frozenset({"x"}),
        "min_model_len": 11,
        "block_hashes": {(16, 7): [1, 2]},
    }
    fast = placement_request(**fields)
    assert fast == PlacementRequest(**fields) and repr(fast) == repr(PlacementRequest(**fields))
    placer = make_placer(("a-0", "a", 0))
    query = placer._query("a", fast)
    assert query == PlacementQuery("r1", "a", 5, 6) and query._hashes == {(16, 7): [1, 2]}
    view = placer.registry.snapshot().candidates("a")[0]
    assert _candidates("a", view, ()) == ExpertCandidates("a", view, ())
    assert _result((), ()) == PlacementResult((), ())


def test_least_loaded_shortcuts_pick_what_rank_puts_first() -> None:
    """`ReadyViews.least_loaded` (the usual Place) and `LeastLoadedPolicy.top` (alternates asked,
    or replicas excluded) give `rank`'s first views, ties on the score and on KV use included."""
    import random

    rng = random.Random(7)
    for trial in range(200):
        registry = ReplicaRegistry(expiry_seconds=5.0, clock=lambda: 50.0)
        ids = [f"a-{i}" for i in rng.sample(range(20), rng.randint(1, 9))]
        for rid in ids:
            load = LoadSnapshot(rng.randint(0, 2), rng.randint(0, 1), rng.choice([0, 8, 16]), rng.choice([0, 64]))
            registry.register(ReplicaInfo(rid, "a", f"sim:{rid}"), load)
            for k in range(rng.randint(0, 2)):
                registry.record_placement(f"{rid}-{k}", rid)
        if trial % 3 == 0:
            registry.report_load(ids[0], LoadSnapshot(), draining=True)  # not a candidate
        policy = LeastLoadedPolicy(waiting_weight=rng.choice([2.0, 1.0]))
        candidates = registry.snapshot().candidates("a")
        ranked = policy.rank(PlacementQuery("r", "a"), candidates)
        best = registry.ready_views().least_loaded("a", policy.inflight_weight, policy.running_weight, policy.waiting_weight)
        assert best == (ranked[0] if ranked else None)
        for n in (1, 2, 5):
            assert policy.top(candidates, n) == ranked[:n]
        if ranked:
            placer = Placer(registry, policy, EXPERTS)
            assert placer.plan(request("a")).placements[0].replica == ranked[0]
            alternates = placer.plan(request("a", max_alternates=3)).placements[0]
            assert [alternates.replica, *alternates.alternates] == ranked[:4]
            excluded = placer.plan(request("a", exclude_replica_ids=frozenset({ranked[0].replica_id})))
            assert [p.replica for p in excluded.placements] == ranked[1:2]
            placed = placer.place(request("a", request_id="new")).placements[0]  # through `least_loaded`
            assert placed.replica.replica_id == ranked[0].replica_id
