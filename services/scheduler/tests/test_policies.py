"""The cluster snapshot and the placement policies, on hand-made snapshots and real registries (no server)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from switchboard.scheduler.placement import PlacementRequest, Placer
from switchboard.scheduler.policies import (
    POLICY_NAMES,
    LeastLoadedPolicy,
    LeastOutstandingPolicy,
    PlacementQuery,
    PowerOfTwoPolicy,
    RoundRobinPolicy,
    make_policy,
)
from switchboard.scheduler.registry import (
    ClusterSnapshot,
    LoadSnapshot,
    ReplicaInfo,
    ReplicaRegistry,
    ReplicaState,
    ReplicaView,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(
    replica_id: str,
    expert: str = "a",
    *,
    inflight: int = 0,
    running: int = 0,
    waiting: int = 0,
    kv_used: int = 0,
    state: ReplicaState = ReplicaState.READY,
    age: float = 0.5,
) -> ReplicaView:
    """A hand-made replica view (KV pool of 100 blocks, `kv_used` of them in use)."""
    info = ReplicaInfo(replica_id, expert, f"10.0.0.1:{50000 + len(replica_id)}", max_model_len=512)
    load = LoadSnapshot(running=running, waiting=waiting, kv_blocks_used=kv_used, kv_blocks_total=100)
    healthy = state is ReplicaState.READY and age <= 5.0
    return ReplicaView(replica_id, expert, info, load, state, inflight, age, healthy)


def snapshot_of(*views: ReplicaView) -> ClusterSnapshot:
    """A hand-made snapshot: the healthy views are each expert's ready replicas."""
    ready: dict[str, list[str]] = {}
    for v in views:
        if v.healthy:
            ready.setdefault(v.expert, []).append(v.replica_id)
    return ClusterSnapshot(
        taken_at=1000.0,
        replicas=MappingProxyType({v.replica_id: v for v in views}),
        ready=MappingProxyType({e: tuple(sorted(ids)) for e, ids in ready.items()}),
    )


def ids(ranked: list[ReplicaView]) -> list[str]:
    return [v.replica_id for v in ranked]


def query(expert: str = "a", request_id: str = "r") -> PlacementQuery:
    return PlacementQuery(request_id, expert)


# A snapshot with a spread of loads: least-loaded scores a1 4, a2 1 (KV 0.9), a3 1 (KV 0.1), a4 2,
# a5 0 but draining; b1 0.
MIXED = snapshot_of(
    view("a1", running=2, waiting=1),
    view("a2", running=1, kv_used=90),
    view("a3", running=1, kv_used=10),
    view("a4", inflight=2),
    view("a5", state=ReplicaState.DRAINING),
    view("b1", "b"),
)


# --- the snapshot ------------------------------------------------------------------------------


def test_snapshot_ready_sets_skip_draining_and_stale_replicas() -> None:
    assert MIXED.ready == {"a": ("a1", "a2", "a3", "a4"), "b": ("b1",)}
    assert ids(list(MIXED.candidates("a"))) == ["a1", "a2", "a3", "a4"]
    assert MIXED.candidates("nobody") == ()
    assert MIXED.replicas["a5"].state is ReplicaState.DRAINING  # known, just not a candidate
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    registry.register(ReplicaInfo("old", "a", "127.0.0.1:1"))
    clock.now += 4.0
    registry.register(ReplicaInfo("new", "a", "127.0.0.1:2", max_model_len=256))
    clock.now += 2.0  # "old" is 6 s silent: stale before any sweep
    snap = registry.snapshot()
    assert snap.ready == {"a": ("new",)} and snap.taken_at == clock.now
    assert snap.replicas["old"].healthy is False and snap.replicas["old"].heartbeat_age == pytest.approx(6.0)
    assert snap.replicas["new"].max_model_len == 256 and snap.replicas["new"].heartbeat_age == pytest.approx(2.0)


def test_snapshot_is_immutable() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    registry.register(ReplicaInfo("a1", "a", "127.0.0.1:1"))
    snap = registry.snapshot()
    with pytest.raises(AttributeError):
        snap.replicas["a1"].inflight = 7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.replicas["a1"].load.running = 7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.ready = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.replicas["a2"] = snap.replicas["a1"]  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.ready["a"] = ()  # type: ignore[index]
    assert isinstance(snap.ready["a"], tuple)


def test_snapshot_is_isolated_from_later_registry_changes() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    registry.register(ReplicaInfo("a1", "a", "127.0.0.1:1"))
    registry.register(ReplicaInfo("a2", "a", "127.0.0.1:2"))
    snap = registry.snapshot()
    before = dict(snap.replicas)
    registry.record_placement("r1", "a1")
    registry.report_load("a1", LoadSnapshot(running=9, waiting=3))
    registry.report_load("a2", LoadSnapshot(), draining=True)
    registry.register(ReplicaInfo("a3", "a", "127.0.0.1:3"))
    registry.deregister("a1")
    assert dict(snap.replicas) == before and snap.ready == {"a": ("a1", "a2")}
    a1 = snap.replicas["a1"]
    assert a1.inflight == 0 and a1.load.running == 0 and snap.replicas["a2"].state is ReplicaState.READY
    assert registry.snapshot().ready == {"a": ("a3",)}


# --- every policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_returns_every_candidate_once(name: str) -> None:
    policy = make_policy(name, seed=3)
    assert policy.name == name
    candidates = MIXED.candidates("a")
    for i in range(20):
        ranked = policy.rank(query(request_id=f"r{i}"), candidates)
        assert sorted(ids(ranked)) == ["a1", "a2", "a3", "a4"]
        assert all(any(r is c for c in candidates) for r in ranked)  # the same views, none made up
        placed = getattr(policy, "placed", None)
        if placed is not None:
            placed(query(), ranked[0])
    assert policy.rank(query(), ()) == []
    assert ids(policy.rank(query(), MIXED.candidates("b"))) == ["b1"]


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'fastest'"):
        make_policy("fastest")


def test_least_loaded_on_a_snapshot() -> None:
    assert ids(LeastLoadedPolicy().rank(query(), MIXED.candidates("a"))) == ["a3", "a2", "a4", "a1"]


def test_least_outstanding_follows_inflight_then_kv_then_id() -> None:
    snap = snapshot_of(
        view("a1", inflight=3),
        view("a2", inflight=0, kv_used=50, running=9),  # heartbeat load does not count
        view("a3", inflight=1),
        view("a4", inflight=0, kv_used=10),
        view("a5", inflight=0, kv_used=10),
    )
    assert ids(LeastOutstandingPolicy().rank(query(), snap.candidates("a"))) == ["a4", "a5", "a2", "a3", "a1"]


def test_round_robin_cycles_per_expert() -> None:
    policy = RoundRobinPolicy()
    snap = snapshot_of(view("a1"), view("a2"), view("a3"), view("b1", "b"), view("b2", "b"))
    chosen = []
    for expert in ("a", "a", "b", "a", "a", "b", "b"):
        ranked = policy.rank(query(expert), snap.candidates(expert))
        policy.placed(query(expert), ranked[0])
        chosen.append(ranked[0].replica_id)
    assert chosen == ["a1", "a2", "b1", "a3", "a1", "b2", "b1"]
    # The alternates follow in cyclic order after the primary; ranking alone moves no cursor.
    assert ids(policy.rank(query("a"), snap.candidates("a"))) == ["a2", "a3", "a1"]
    assert ids(policy.rank(query("a"), snap.candidates("a"))) == ["a2", "a3", "a1"]


def test_round_robin_skips_draining_and_excluded_replicas() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for n in range(1, 5):
        registry.register(ReplicaInfo(f"a{n}", "a", f"127.0.0.1:{n}"))
    placer = Placer(registry, RoundRobinPolicy(), ["a"])

    def place(i: int, exclude: frozenset[str] = frozenset()) -> str:
        result = placer.place(PlacementRequest(f"r{i}", ("a",), exclude_replica_ids=exclude))
        assert result.primary is not None
        return result.primary.replica.replica_id

    assert [place(0), place(1)] == ["a1", "a2"]
    registry.report_load("a3", LoadSnapshot(), draining=True)
    assert place(2) == "a4"
    assert place(3, exclude=frozenset({"a1"})) == "a2"  # after a4 comes a1, excluded: a2
    assert [place(4), place(5)] == ["a4", "a1"]  # a3 still draining
    # Planning (no placement) does not move the cursor.
    assert placer.plan(PlacementRequest("p", ("a",))).placements[0].replica.replica_id == "a2"
    assert place(6) == "a2"


def test_power_of_two_is_reproducible_with_a_seed() -> None:
    candidates = MIXED.candidates("a")

    def run(seed: int) -> list[list[str]]:
        policy = PowerOfTwoPolicy(seed)
        return [ids(policy.rank(query(request_id=f"r{i}"), candidates)) for i in range(40)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # The draws depend on the candidates, not on the order they are passed in.
    shuffled = [candidates[i] for i in (2, 0, 3, 1)]
    first, second = PowerOfTwoPolicy(5), PowerOfTwoPolicy(5)
    for _ in range(20):
        assert ids(first.rank(query(), candidates)) == ids(second.rank(query(), shuffled))


def test_power_of_two_never_picks_the_worse_of_its_draws() -> None:
    key = LeastLoadedPolicy().key
    pair = MIXED.candidates("a")[:2]  # a1 (score 4) and a2 (score 1): both are always drawn
    policy = PowerOfTwoPolicy(11)
    assert {ids(policy.rank(query(), pair))[0] for _ in range(20)} == {"a2"}
    # With four candidates the worst (a1) can only ever be drawn against a better one.
    candidates = MIXED.candidates("a")
    worst = max(candidates, key=key).replica_id
    primaries = [policy.rank(query(), candidates)[0].replica_id for _ in range(300)]
    assert worst not in primaries
    assert set(primaries) == {"a2", "a3", "a4"}  # random: not always the least loaded
    # After the primary, the alternates are by load.
    for _ in range(20):
        ranked = policy.rank(query(), candidates)
        assert ranked[1:] == sorted(ranked[1:], key=key)


# --- the placer on a snapshot ------------------------------------------------------------------


def test_place_decides_on_one_snapshot_and_reports_the_reservation() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    registry.register(ReplicaInfo("a1", "a", "127.0.0.1:1"))
    registry.register(ReplicaInfo("a2", "a", "127.0.0.1:2"))
    placer = Placer(registry, LeastOutstandingPolicy(), ["a"])
    # plan() on a given snapshot ranks that snapshot, whatever the registry says since.
    snap = registry.snapshot()
    registry.record_placement("earlier", "a1")
    assert placer.plan(PlacementRequest("x", ("a",)), snap).placements[0].replica.replica_id == "a1"
    result = placer.place(PlacementRequest("r1", ("a",), max_alternates=1))
    primary = result.placements[0]
    assert primary.replica.replica_id == "a2" and primary.replica.inflight == 1  # counts this request
    assert [(v.replica_id, v.inflight) for v in primary.alternates] == [("a1", 1)]
