"""Unit tests of the replica registry and the least-loaded placement policy (no server)."""

from __future__ import annotations

import pytest
from switchboard.scheduler.placement import LeastLoadedPolicy, PlacementQuery
from switchboard.scheduler.registry import (
    DuplicateReplica,
    LoadSnapshot,
    ReplicaInfo,
    ReplicaRegistry,
    ReplicaState,
)


class FakeClock:
    """A clock the test moves by hand, so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(replica_id: str, expert: str = "bard-small", port: int = 50061) -> ReplicaInfo:
    return ReplicaInfo(replica_id=replica_id, expert=expert, address=f"127.0.0.1:{port}")


def test_register_refresh_and_deregister() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    assert registry.register(info("a")) is True
    assert registry.register(info("a")) is False
    assert len(registry) == 1
    assert registry.deregister("a") is not None
    assert registry.deregister("a") is None
    assert len(registry) == 0


def test_report_load_unknown_and_draining() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    assert registry.report_load("ghost", LoadSnapshot(running=1)) is False
    registry.register(info("a"))
    assert registry.report_load("a", LoadSnapshot(running=3, waiting=1)) is True
    record = registry.get("a")
    assert record is not None and record.load.running == 3
    assert registry.healthy_replicas("bard-small") == [record]
    registry.report_load("a", LoadSnapshot(), draining=True)
    assert record.state is ReplicaState.DRAINING
    assert registry.healthy_replicas("bard-small") == []


def test_expiry_drops_silent_replicas_only() -> None:
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    registry.register(info("a"))
    registry.register(info("b", port=50062))
    clock.now += 4.0
    registry.report_load("b", LoadSnapshot())
    clock.now += 1.5
    # a is stale (5.5 s) and already unhealthy before the sweep runs.
    assert [r.replica_id for r in registry.healthy_replicas("bard-small")] == ["b"]
    expired = registry.expire()
    assert [r.replica_id for r in expired] == ["a"]
    assert "a" not in registry and "b" in registry


def test_inflight_counts_placements_until_complete_or_ttl() -> None:
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, placement_ttl_seconds=60.0, clock=clock)
    registry.register(info("a"))
    registry.register(info("b", port=50062))
    registry.record_placement("r1", "a")
    registry.record_placement("r2", "a")
    assert registry.get("a").inflight == 2  # type: ignore[union-attr]
    # Complete without the replica id still finds it through the request index.
    assert registry.complete("r1") is registry.get("a")
    assert registry.get("a").inflight == 1  # type: ignore[union-attr]
    # A retry of r2 on b moves it there.
    registry.record_placement("r2", "b")
    assert registry.get("a").inflight == 0  # type: ignore[union-attr]
    assert registry.get("b").inflight == 1  # type: ignore[union-attr]
    # A lost Complete stops counting after the TTL (heartbeats keep b alive).
    clock.now += 61.0
    registry.report_load("b", LoadSnapshot())
    registry.report_load("a", LoadSnapshot())
    registry.expire()
    assert registry.get("b").inflight == 0  # type: ignore[union-attr]


def test_views_show_what_was_placed_since_the_last_heartbeat() -> None:
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    registry.register(info("a"))
    (fresh,) = registry.snapshot().candidates("bard-small")
    assert fresh.placed_since_report_tokens == 0 and fresh.last_placed_age == float("inf")
    registry.record_placement("r1", "a", prompt_tokens=300, max_tokens=20)
    clock.now += 0.25
    registry.record_placement("r2", "a", prompt_tokens=700, max_tokens=20)
    clock.now += 0.5
    (view,) = registry.snapshot().candidates("bard-small")
    assert view.placed_since_report_tokens == 1000
    assert view.last_placed_age == pytest.approx(0.5) and view.last_placed_prompt_tokens == 700
    # Every way of building views says the same.
    (ready,) = registry.ready_views().candidates("bard-small")
    assert ready[-3:] == view[-3:]
    best = registry.ready_views().least_loaded("bard-small", 1.0, 1.0, 2.0)
    assert best is not None and best[-3:] == view[-3:]
    # A heartbeat shows them: nothing is unreported any more, the newest placement stays known.
    registry.report_load("a", LoadSnapshot(running=2))
    (after,) = registry.snapshot().candidates("bard-small")
    assert after.placed_since_report_tokens == 0 and after.last_placed_prompt_tokens == 700


def test_reregister_at_new_address_forgets_placements() -> None:
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    registry.register(info("a"))
    registry.record_placement("r1", "a")
    registry.register(info("a"))
    assert registry.get("a").inflight == 1  # type: ignore[union-attr]
    clock.now += 6.0  # the holder at the old address went silent past the expiry
    registry.register(info("a", port=50070))
    assert registry.get("a").inflight == 0  # type: ignore[union-attr]
    assert registry.get("a").info.address == "127.0.0.1:50070"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("other", "says"),
    [(info("a", port=50070), "the replica at 127.0.0.1:50061"), (info("a", expert="milton-small"), "expert 'bard-small'")],
)
def test_an_id_held_by_a_live_replica_elsewhere_is_refused(other: ReplicaInfo, says: str) -> None:
    clock = FakeClock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    registry.register(info("a"))
    registry.record_placement("r1", "a")
    clock.now += 2.0
    with pytest.raises(DuplicateReplica, match=f"taken by {says}, heard from 2.0 s ago") as caught:
        registry.register(other)
    assert caught.value.retry_after_seconds == pytest.approx(3.0)
    # The holder keeps its id, address and work.
    assert registry.get("a").info == info("a") and registry.get("a").inflight == 1  # type: ignore[union-attr]
    # Draining, it gives the id up.
    registry.report_load("a", LoadSnapshot(), draining=True)
    registry.register(other)
    assert registry.get("a").info == other  # type: ignore[union-attr]


def test_expiry_must_be_positive() -> None:
    with pytest.raises(ValueError, match="expiry_seconds"):
        ReplicaRegistry(expiry_seconds=0)


def test_least_loaded_policy_ranks_by_weighted_load_then_kv() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for name, port in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        registry.register(info(name, port=50060 + port))
    registry.report_load("a", LoadSnapshot(running=2, waiting=1))  # 2 + 2*1 = 4
    registry.report_load("b", LoadSnapshot(running=1, kv_blocks_used=90, kv_blocks_total=100))  # 1
    registry.report_load("c", LoadSnapshot(running=1, kv_blocks_used=10, kv_blocks_total=100))  # 1, less KV
    registry.report_load("d", LoadSnapshot(running=0))
    registry.record_placement("r1", "d")
    registry.record_placement("r2", "d")  # inflight 2 -> score 2
    policy = LeastLoadedPolicy()
    ranked = policy.rank(PlacementQuery("r3", "bard-small"), registry.healthy_replicas("bard-small"))
    assert [r.replica_id for r in ranked] == ["c", "b", "d", "a"]


def test_least_loaded_spreads_a_burst_across_idle_replicas() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for name, port in (("a", 1), ("b", 2), ("c", 3)):
        registry.register(info(name, port=50060 + port))
    policy = LeastLoadedPolicy()
    chosen = []
    for i in range(6):
        best = policy.rank(PlacementQuery(f"r{i}", "bard-small"), registry.healthy_replicas("bard-small"))[0]
        registry.record_placement(f"r{i}", best.replica_id)
        chosen.append(best.replica_id)
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c"]


def test_healthy_replicas_filters_expert_and_exclusions() -> None:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    registry.register(info("a"))
    registry.register(info("b", port=50062))
    registry.register(info("m", expert="milton-small", port=50063))
    ids = [r.replica_id for r in registry.healthy_replicas("bard-small", exclude=["a"])]
    assert ids == ["b"]
    assert [r.replica_id for r in registry.healthy_replicas("milton-small")] == ["m"]
