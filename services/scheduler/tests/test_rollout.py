"""Unit tests of the rollout core (`rollout.py`) and of placement under a revision split, without gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from switchboard.scheduler.placement import LeastLoadedPolicy, PlacementRequest, Placer
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRegistry
from switchboard.scheduler.rollout import (
    BLUE_GREEN,
    NO_REPLICA_GRACE_SECONDS,
    Gates,
    InvalidRollout,
    NoRollout,
    QualityProbe,
    RevisionLedger,
    RevisionSplit,
    RevisionStats,
    RolloutConflict,
    RolloutManager,
    RolloutSpec,
    RolloutState,
    Step,
    judge,
    p95,
)

EXPERTS = ("bard", "milton")


class Clock:
    """A clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """Ready replica counts by (expert, revision), set by the test."""

    def __init__(self) -> None:
        self.ready = {("bard", "v1"): 2, ("bard", "v2"): 1}

    def __call__(self, expert: str, revision: str) -> int:
        return self.ready.get((expert, revision), 0)


def spec(**fields: object) -> RolloutSpec:
    values: dict[str, object] = {
        "expert": "bard",
        "from_revision": "v1",
        "to_revision": "v2",
        "steps": (Step(0.25, 10.0), Step(1.0, 10.0)),
        "gates": Gates(min_requests=5),
    }
    values.update(fields)
    return RolloutSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> tuple[RolloutManager, RevisionLedger, Clock, Cluster, list[str]]:
    clock = Clock()
    cluster = Cluster()
    ledger = RevisionLedger(clock)
    transitions: list[str] = []
    manager = RolloutManager(
        EXPERTS,
        ledger,
        cluster,
        clock=clock,
        wall_clock=lambda: 1.7e9,
        state_file=tmp_path / "rollouts.json",
        on_transition=lambda rollout, transition, detail: transitions.append(transition),
    )
    return manager, ledger, clock, cluster, transitions


def serve(
    ledger: RevisionLedger,
    revision: str,
    requests: int,
    failed: int = 0,
    ttft: float = 0.1,
    tpot: float = 0.02,
) -> None:
    ledger.record_outcomes("bard", revision, requests, failed)
    for _ in range(requests - failed):
        ledger.record_latency("bard", revision, ttft, tpot)


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expert": ""}, "spec.expert"),
        ({"expert": "nope"}, "spec.expert"),
        ({"from_revision": ""}, "spec.from_revision"),
        ({"to_revision": "v1"}, "spec.to_revision"),
        ({"to_revision": "x" * 200}, "spec.to_revision"),
        ({"to_revision": "bad\nlabel"}, "spec.to_revision"),
        ({"strategy": "linear"}, "spec.strategy"),
        ({"steps": (Step(0.0, 10.0),)}, "spec.steps[0].weight"),
        ({"steps": (Step(1.5, 10.0),)}, "spec.steps[0].weight"),
        ({"steps": (Step(float("nan"), 10.0),)}, "spec.steps[0].weight"),
        ({"steps": (Step(0.5, 10.0), Step(0.2, 10.0))}, "spec.steps[1].weight"),
        ({"steps": (Step(0.5, 0.0),)}, "spec.steps[0].duration_seconds"),
        ({"steps": (Step(0.5, float("inf")),)}, "spec.steps[0].duration_seconds"),
        ({"steps": tuple(Step(1.0, 1.0) for _ in range(33))}, "spec.steps"),
        ({"strategy": BLUE_GREEN, "steps": (Step(0.5, 10.0),)}, "spec.steps"),
        ({"gates": Gates(max_error_ratio=0.0)}, "spec.gates.max_error_ratio"),
        ({"gates": Gates(max_error_ratio=2.0)}, "spec.gates.max_error_ratio"),
        ({"gates": Gates(max_ttft_p95_ratio=-1.0)}, "spec.gates.max_ttft_p95_ratio"),
        ({"gates": Gates(min_requests=0)}, "spec.gates.min_requests"),
    ],
)
def test_a_bad_spec_names_its_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRollout) as caught:
        spec(**fields).validated(EXPERTS)
    assert caught.value.field == field


def test_defaults_fill_the_steps() -> None:
    assert [s.weight for s in spec(steps=()).validated(EXPERTS).steps] == [0.1, 0.5, 1.0]
    assert [s.weight for s in spec(steps=(), strategy=BLUE_GREEN).validated(EXPERTS).steps] == [1.0]


# ----------------------------------------------------------------------------- judging


def test_p95_is_nearest_rank() -> None:
    assert p95([]) == 0.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([3.0]) == 3.0


def test_judge_waits_then_checks_errors_then_latency() -> None:
    gates = Gates(max_error_ratio=0.1, max_ttft_p95_ratio=2.0, max_tpot_p95_ratio=2.0, min_requests=10)
    old = RevisionStats("v1", 100, 0, 0.1, 0.01, 100)
    assert judge(gates, RevisionStats("v2", 9, 0, 0.1, 0.01, 9), old).passed is None
    assert judge(gates, RevisionStats("v2", 10, 2, 0.1, 0.01, 8), old).passed is False
    slow = judge(gates, RevisionStats("v2", 10, 0, 0.3, 0.01, 10), old)
    assert slow.passed is False and "TTFT" in slow.reason
    assert judge(gates, RevisionStats("v2", 10, 0, 0.1, 0.05, 10), old).passed is False
    assert judge(gates, RevisionStats("v2", 10, 0, 0.15, 0.015, 10), old).passed is True
    # Latency is not compared without enough of the old revision's samples.
    assert (
        judge(gates, RevisionStats("v2", 10, 0, 9.0, 9.0, 10), RevisionStats("v1", 3, 0, 0.1, 0.01, 3)).passed
        is True
    )


# ----------------------------------------------------------------------------- the manager


def test_a_good_revision_is_promoted_step_by_step(world) -> None:
    manager, ledger, clock, _cluster, transitions = world
    serve(ledger, "v1", 50)
    rollout = manager.start(spec())
    assert manager.splits["bard"] == RevisionSplit("v2", 0.25, "v1")
    serve(ledger, "v2", 10)
    clock.now += 5
    assert manager.tick() == []  # gates pass, but the step lasts 10 s
    clock.now += 6
    assert [t for _, t in manager.tick()] == ["step"]
    assert rollout.step == 1 and manager.splits["bard"].weight == 1.0
    clock.now += 11
    assert manager.tick() == []  # the new step has no requests of v2 yet
    serve(ledger, "v2", 10)
    assert [t for _, t in manager.tick()] == ["promoted"]
    assert rollout.state is RolloutState.PROMOTED and rollout.weight == 1.0
    assert transitions == ["started", "step", "promoted"]
    assert {s.revision for s in rollout.stats} == {"v1", "v2"}


def test_a_failing_revision_rolls_back_within_the_step(world) -> None:
    manager, ledger, clock, _, transitions = world
    serve(ledger, "v1", 50)
    rollout = manager.start(spec())
    serve(ledger, "v2", 10, failed=3)
    clock.now += 1
    manager.tick()
    assert rollout.state is RolloutState.ROLLED_BACK
    assert "error ratio" in rollout.reason
    assert manager.splits["bard"].weight == 0.0
    assert transitions[-1] == "rolled_back"


def test_a_slow_revision_rolls_back(world) -> None:
    manager, ledger, clock, _, _ = world
    serve(ledger, "v1", 50, ttft=0.1)
    rollout = manager.start(spec())
    serve(ledger, "v2", 10, ttft=0.5)
    clock.now += 1
    manager.tick()
    assert rollout.state is RolloutState.ROLLED_BACK and "TTFT" in rollout.reason


def test_no_ready_replica_of_the_new_revision_rolls_back_after_the_grace(world) -> None:
    manager, _ledger, clock, cluster, _ = world
    rollout = manager.start(spec())
    cluster.ready[("bard", "v2")] = 0
    manager.tick()
    assert rollout.state is RolloutState.RUNNING
    clock.now += NO_REPLICA_GRACE_SECONDS
    manager.tick()
    assert rollout.state is RolloutState.ROLLED_BACK and "no ready replica" in rollout.reason


def test_pause_holds_resume_continues_abort_ends(world) -> None:
    manager, ledger, clock, _, transitions = world
    serve(ledger, "v1", 50)
    rollout = manager.start(spec())
    serve(ledger, "v2", 10)
    clock.now += 4
    manager.pause("bard", "looking at dashboards")
    clock.now += 100
    assert manager.tick() == [] and rollout.step == 0
    assert rollout.step_elapsed(clock()) == pytest.approx(4.0)
    with pytest.raises(RolloutConflict):
        manager.pause("bard")
    manager.resume("bard")
    clock.now += 7
    assert [t for _, t in manager.tick()] == ["step"]
    manager.abort("bard", "changed our mind")
    assert rollout.state is RolloutState.ABORTED and manager.splits["bard"].weight == 0.0
    with pytest.raises(RolloutConflict):
        manager.abort("bard")
    assert transitions == ["started", "paused", "resumed", "step", "aborted"]


def test_a_paused_rollout_still_rolls_back_a_failing_revision(world) -> None:
    manager, ledger, _clock, _, _ = world
    rollout = manager.start(spec())
    manager.pause("bard")
    serve(ledger, "v2", 10, failed=5)
    manager.tick()
    assert rollout.state is RolloutState.ROLLED_BACK


def test_start_refuses_conflicts(world) -> None:
    manager, _, _, cluster, _ = world
    with pytest.raises(NoRollout):
        manager.get("bard")
    cluster.ready[("bard", "v2")] = 0
    with pytest.raises(RolloutConflict, match="no ready replica"):
        manager.start(spec())
    cluster.ready[("bard", "v2")] = 1
    manager.start(spec())
    with pytest.raises(RolloutConflict, match="abort it first"):
        manager.start(spec())
    manager.abort("bard")
    manager.start(spec())  # a new rollout once the last one ended


def test_the_state_file_brings_a_rollout_back(world, tmp_path: Path) -> None:
    manager, _ledger, clock, cluster, _ = world
    manager.start(spec())
    clock.now += 3
    manager.pause("bard", "hold")
    document = json.loads((tmp_path / "rollouts.json").read_text())
    assert document["schema"] == "switchboard.rollouts/v1"
    restarted = RolloutManager(
        EXPERTS, RevisionLedger(clock), cluster, clock=clock, state_file=tmp_path / "rollouts.json"
    )
    assert restarted.load() == 1
    back = restarted.get("bard")
    assert back.state is RolloutState.PAUSED and back.reason == "hold"
    assert back.step_elapsed(clock()) == pytest.approx(3.0)
    assert restarted.splits["bard"] == RevisionSplit("v2", 0.25, "v1")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"schema": "other"}),
        json.dumps({"schema": "switchboard.rollouts/v1", "rollouts": [{"spec": {}}]}),
    ],
)
def test_a_bad_state_file_is_refused_with_its_name(tmp_path: Path, content: str) -> None:
    path = tmp_path / "rollouts.json"
    path.write_text(content)
    manager = RolloutManager(EXPERTS, RevisionLedger(), lambda e, r: 1, state_file=path)
    with pytest.raises(ValueError, match=r"rollouts\.json"):
        manager.load()


# ----------------------------------------------------------------------------- placement


def split_placer(revisions: dict[str, str]) -> Placer:
    registry = ReplicaRegistry(expiry_seconds=5.0)
    for port, (replica_id, revision) in enumerate(revisions.items(), start=50061):
        registry.register(
            ReplicaInfo(replica_id, "bard", f"127.0.0.1:{port}", revision=revision), LoadSnapshot()
        )
    return Placer(registry, LeastLoadedPolicy(), EXPERTS)


def test_the_split_sends_its_share_and_keeps_the_other_side_as_alternates() -> None:
    placer = split_placer({"a": "v1", "b": "v1", "c": "v2"})
    placer.splits = {"bard": RevisionSplit("v2", 0.25, "v1")}
    on_new = 0
    for i in range(2000):
        result = placer.plan(PlacementRequest(f"req-{i}", ("bard",), max_alternates=2))
        primary = result.placements[0]
        revisions = [primary.replica.info.revision] + [a.info.revision for a in primary.alternates]
        if revisions[0] == "v2":
            on_new += 1
            assert revisions[1:] == ["v1", "v1"]  # the fallback is the old revision
        else:
            assert "v2" in revisions[1:]
    assert 0.21 < on_new / 2000 < 0.29
    # The same request id keeps its side.
    first = placer.plan(PlacementRequest("same", ("bard",))).placements[0].replica.replica_id
    assert all(
        placer.plan(PlacementRequest("same", ("bard",))).placements[0].replica.replica_id == first
        for _ in range(5)
    )


def test_a_side_without_an_open_replica_sends_the_request_to_the_other() -> None:
    placer = split_placer({"a": "v1", "c": "v2"})
    placer.splits = {"bard": RevisionSplit("v2", 1.0, "v1")}
    assert placer.place(PlacementRequest("r1", ("bard",))).placements[0].replica.replica_id == "c"
    # c excluded (the gateway failed over from it): v1 serves.
    result = placer.place(PlacementRequest("r2", ("bard",), exclude_replica_ids=frozenset({"c"})))
    assert result.placements[0].replica.replica_id == "a"
    placer.splits = {"bard": RevisionSplit("v2", 0.0, "v1")}
    assert placer.place(PlacementRequest("r3", ("bard",))).placements[0].replica.replica_id == "a"
    # An expert without a split places over every revision, as before.
    placer.splits = {}
    chosen = {
        placer.place(PlacementRequest(f"s{i}", ("bard",))).placements[0].replica.replica_id for i in range(4)
    }
    assert chosen == {"a", "c"}


def test_a_pin_holds_until_a_rollout_and_goes_when_one_revision_is_left(world) -> None:
    manager, _, _, _, _ = world
    assert manager.pin("bard", "v1") and not manager.pin("bard", "v9")
    assert manager.splits["bard"] == RevisionSplit("v1", 1.0, "v1")
    assert manager.unpin("bard") and "bard" not in manager.splits
    manager.pin("bard", "v1")
    manager.start(spec())
    assert not manager.unpin("bard")  # a rollout's split is not a pin
    assert manager.splits["bard"] == RevisionSplit("v2", 0.25, "v1")


def test_a_third_revision_is_only_the_last_fallback() -> None:
    placer = split_placer({"a": "v1", "b": "v0", "c": "v2"})
    placer.splits = {"bard": RevisionSplit("v2", 0.0, "v1")}  # rolled back: v1 serves, v2 then v0 fall back
    for i in range(50):
        primary = placer.plan(PlacementRequest(f"q{i}", ("bard",), max_alternates=2)).placements[0]
        assert [primary.replica.replica_id, *(a.replica_id for a in primary.alternates)] == ["a", "c", "b"]


def test_the_quality_probe_holds_traffic_then_passes_or_rolls_back(world) -> None:
    manager, ledger, clock, _, transitions = world
    probe = QualityProbe(("To be, or not to be",), max_nll_increase=0.1)
    rollout = manager.start(spec(quality_probe=probe))
    assert rollout.probe_state == "pending" and manager.splits["bard"].weight == 0.0
    assert manager.pending_probes() == [rollout]
    serve(ledger, "v2", 10)
    clock.now += 30
    assert manager.tick() == [] and rollout.reason == "waiting for the quality probe"
    manager.record_probe("bard", {"v1": 2.0, "v2": 2.05})
    assert rollout.probe_state == "passed" and manager.splits["bard"].weight == 0.25
    assert manager.pending_probes() == [] and transitions[-1] == "probed"
    # The first step starts when the probe passed: the requests before it are not the step's.
    clock.now += 11
    assert manager.tick() == []
    manager.abort("bard")
    worse = manager.start(spec(quality_probe=probe))
    manager.record_probe("bard", {"v1": 2.0, "v2": 2.5})
    assert worse.state is RolloutState.ROLLED_BACK and "quality probe" in worse.reason
    assert "0.500 nats above" in worse.reason
    assert {st.revision: st.probe_nll for st in worse.stats} == {"v1": 2.0, "v2": 2.5}
    failed = manager.start(spec(quality_probe=probe))
    manager.record_probe("bard", None, "UNAVAILABLE: replica gone")
    assert failed.state is RolloutState.ROLLED_BACK and "could not run" in failed.reason
    assert manager.record_probe("bard", {"v1": 1.0, "v2": 1.0}) is None  # ended: ignored


@pytest.mark.parametrize(
    ("probe", "field"),
    [
        (QualityProbe(()), "spec.quality_probe.texts"),
        (QualityProbe(("",)), "spec.quality_probe.texts"),
        (QualityProbe(("x",) * 65), "spec.quality_probe.texts"),
        (QualityProbe(("x" * 200_001,)), "spec.quality_probe.texts"),
        (QualityProbe(("x",), max_nll_increase=float("nan")), "spec.quality_probe.max_nll_increase"),
    ],
)
def test_a_bad_probe_names_its_field(probe: QualityProbe, field: str) -> None:
    with pytest.raises(InvalidRollout) as caught:
        spec(quality_probe=probe).validated(EXPERTS)
    assert caught.value.field == field
