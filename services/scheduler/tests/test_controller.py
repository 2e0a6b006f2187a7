"""The allocation controller: observe, allocate, constrain, act; its safety rules and faults.

Most tests drive `ScalingController.step()` / `drain_once()` by hand over a real registry with a
fake clock and a recording actuator, so every period is deterministic. The last ones run a whole
scheduler (in-process gRPC server) with the Kubernetes actuator pointed at the HTTP stand-in of
test_actuators.py answering errors: placement goes on, the fault is counted, and the next period
retries.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from switchboard.common.settings import ServerSettings, SettingsError, load_settings
from switchboard.common.telemetry import in_memory_span_exporter
from switchboard.scheduler.actuators import ActuatorError, DryRunActuator
from switchboard.scheduler.allocation import (
    FEATURE_NAMES,
    REASON_BOUNDS,
    REASON_BUDGET,
    REASON_COOLDOWN,
    REASON_SCALE_DOWN,
    REASON_SCALE_UP,
    REASON_STEADY,
    AllocationConfig,
    AllocationNetwork,
    PoolBounds,
    explain,
    write_allocation_file,
)
from switchboard.scheduler.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, SchedulerSettings
from switchboard.scheduler.controller import ScalingController, parse_bounds
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRegistry, ReplicaState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeActuator:
    """Records calls; `fail` makes the next calls raise; `hang` makes them outlast the timeout."""

    name = "fake"
    acts = True
    targeted = True

    def __init__(self, owned: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.owned = set(owned)
        self.fail: list[ActuatorError] = []
        self.hang = 0.0
        self.next = 1
        self.closed = False
        self.starting: dict[str, list[str | None]] = {}
        self.fail_read: list[ActuatorError] = []
        self.lock = threading.Lock()

    def _maybe_fail(self) -> None:
        if self.hang:
            time.sleep(self.hang)
        with self.lock:
            if self.fail:
                raise self.fail.pop(0)

    def add(self, expert: str, count: int) -> list[str]:
        self._maybe_fail()
        ids = [f"{expert}-auto-{self.next + i}" for i in range(count)]
        self.next += count
        self.owned.update(ids)
        self.calls.append(("add", expert, count))
        return ids

    def remove(self, expert: str, replica_ids: Sequence[str]) -> None:
        self._maybe_fail()
        self.calls.append(("remove", expert, tuple(replica_ids)))

    def can_remove(self, replica_id: str) -> bool:
        return replica_id in self.owned

    def expected(self, expert: str) -> list[str | None]:
        with self.lock:
            if self.fail_read:
                raise self.fail_read.pop(0)
        return list(self.starting.get(expert, []))

    def close(self) -> None:
        self.closed = True


def register(registry: ReplicaRegistry, rid: str, expert: str = "bard-small", running: int = 0, waiting: int = 0) -> None:
    registry.register(ReplicaInfo(rid, expert, f"127.0.0.1:{50000 + len(registry)}"), LoadSnapshot(running=running, waiting=waiting))


def place_demand(expert: str, tokens: int) -> None:
    """Count `tokens` of demand placed on `expert`, as the servicer's Place does (prompt + output budget)."""
    from switchboard.scheduler import metrics

    metrics.PLACED_TOKENS.labels(expert=expert).inc(tokens)


def config(budget: int = 4, cooldown: float = 0.0, **bounds: tuple[int, int]) -> AllocationConfig:
    b = {name.replace("_", "-"): PoolBounds(*span) for name, span in bounds.items()} or {"bard-small": PoolBounds(1, 3)}
    return AllocationConfig(budget, b, period_seconds=10.0, scale_down_cooldown_seconds=cooldown, keda_target_queue=4.0)


def controller(
    registry: ReplicaRegistry, clock: Clock, actuator: object, allocator: str = "keda", cfg: AllocationConfig | None = None, **kw: object
) -> ScalingController:
    return ScalingController(registry, cfg or config(), allocator, actuator, clock=clock, **kw)  # type: ignore[arg-type]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def faults(reason: str, operation: str = "add") -> float:
    return sample(
        "switchboard_scheduler_allocation_actuator_faults_total",
        {"actuator": "fake", "operation": operation, "reason": reason},
    )


# ----------------------------------------------------------------------------- reasons (pure)


def test_explain_names_why_each_count_is_what_it_is() -> None:
    cfg = AllocationConfig(20, {n: PoolBounds(1, 3) for n in "abcdefg"})
    desired = {"a": 2, "b": 5, "c": 0, "d": 1, "e": 3, "f": 2, "g": 1}
    current = {"a": 2, "b": 1, "c": 2, "d": 2, "e": 1, "f": 1, "g": 3}
    applied = {"a": 2, "b": 3, "c": 1, "d": 2, "e": 2, "f": 1, "g": 1}
    assert explain(desired, applied, current, cfg) == {
        "a": REASON_STEADY,
        "b": REASON_BOUNDS,  # asked 5, clamped to 3
        "c": REASON_BOUNDS,  # asked 0, clamped to 1
        "d": REASON_COOLDOWN,  # asked 1 from 2, held
        "e": REASON_BUDGET,  # asked 3, got 2
        "f": REASON_BUDGET,  # asked 2, held at 1
        "g": REASON_SCALE_DOWN,
    }
    assert explain({"a": 3}, {"a": 3}, {"a": 2}, AllocationConfig(6, {"a": PoolBounds(1, 3)}))["a"] == REASON_SCALE_UP


# ----------------------------------------------------------------------------- scaling up and down


async def test_scale_up_starts_replicas_counts_them_pending_until_they_register() -> None:
    clock = Clock()
    registry, actuator = ReplicaRegistry(expiry_seconds=500.0, clock=clock), FakeActuator()
    register(registry, "bard-small-0", running=8)  # KEDA: ceil(8 / 4) = 2 replicas
    ctl = controller(registry, clock, actuator)
    decision = await ctl.step()
    assert decision.current == {"bard-small": 1} and decision.applied == {"bard-small": 2}
    assert decision.reasons == {"bard-small": REASON_SCALE_UP}
    assert actuator.calls == [("add", "bard-small", 1)]
    assert [p.replica_id for p in ctl.pending] == ["bard-small-auto-1"]
    # Next period the started one counts (pending), so nothing more is started.
    clock.now += 10
    registry.report_load("bard-small-0", LoadSnapshot(running=8))
    decision = await ctl.step()
    assert decision.current == {"bard-small": 2} and actuator.calls == [("add", "bard-small", 1)]
    assert sample("switchboard_scheduler_allocation_replicas", {"expert": "bard-small", "kind": "pending"}) == 1
    register(registry, "bard-small-auto-1", running=0)
    clock.now += 10
    registry.report_load("bard-small-0", LoadSnapshot(running=8))
    decision = await ctl.step()
    assert ctl.pending == [] and decision.current == {"bard-small": 2} and decision.reasons["bard-small"] == REASON_STEADY


async def test_a_started_replica_that_never_registers_stops_counting_after_the_start_timeout() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0", running=8)
    actuator = FakeActuator()
    ctl = controller(registry, clock, actuator, start_timeout_seconds=30.0)
    await ctl.step()
    before = sample("switchboard_scheduler_allocation_start_timeouts_total", {"expert": "bard-small"})
    clock.now += 31
    registry.report_load("bard-small-0", LoadSnapshot(running=8))
    decision = await ctl.step()
    assert sample("switchboard_scheduler_allocation_start_timeouts_total", {"expert": "bard-small"}) == before + 1
    assert decision.current == {"bard-small": 1} and actuator.calls[-1] == ("add", "bard-small", 1)  # started again


async def test_scale_down_drains_first_and_stops_only_when_nothing_is_in_flight() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-auto-1")
    register(registry, "bard-small-auto-2")
    # auto-1 holds a request; auto-2 is idle: the idle one is drained first.
    registry.record_placement("req-1", "bard-small-auto-1")
    actuator = FakeActuator(owned=["bard-small-auto-1", "bard-small-auto-2"])
    ctl = controller(registry, clock, actuator)  # no load: KEDA wants 0, bounded to 1
    decision = await ctl.step()
    assert decision.applied == {"bard-small": 1} and decision.drained == {"bard-small": ["bard-small-auto-2", "bard-small-auto-1"]}
    # The idle one is stopped at once; the busy one only drains: placement skips it.
    assert actuator.calls == [("remove", "bard-small", ("bard-small-auto-2",))]
    assert registry.get("bard-small-auto-1").state is ReplicaState.DRAINING
    assert [v.replica_id for v in registry.snapshot().candidates("bard-small")] == ["bard-small-0"]
    assert await ctl.drain_once() == []
    registry.complete("req-1")
    assert await ctl.drain_once() == ["bard-small-auto-1"]
    assert actuator.calls[-1] == ("remove", "bard-small", ("bard-small-auto-1",))
    assert ctl.draining == {}
    # Drained replicas are out of the count at once: the next period is steady.
    registry.deregister("bard-small-auto-1")
    registry.deregister("bard-small-auto-2")
    clock.now += 10
    assert (await ctl.step()).reasons == {"bard-small": REASON_BOUNDS}  # KEDA asks 0; the minimum is 1


async def test_only_replicas_the_actuator_can_stop_are_drained() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-1")
    ctl = controller(registry, clock, FakeActuator(owned=[]))
    decision = await ctl.step()
    assert decision.drained == {} and all(r.state is ReplicaState.READY for r in registry.replicas())
    # Nothing changed, so the cool-down clock did not start.
    assert "bard-small" not in ctl.cooldown.last_change


async def test_a_replica_that_dies_while_draining_is_still_stopped_and_counted_gone() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=5.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-auto-1")
    registry.record_placement("req-1", "bard-small-auto-1")  # busy: it drains
    actuator = FakeActuator(owned=["bard-small-auto-1"])
    ctl = controller(registry, clock, actuator)
    await ctl.step()
    assert "bard-small-auto-1" in ctl.draining and actuator.calls == []
    gone = sample("switchboard_scheduler_allocation_drains_total", {"expert": "bard-small", "outcome": "gone"})
    # It dies: no more heartbeats, the sweep expires it (its request with it).
    clock.now += 6
    registry.report_load("bard-small-0", LoadSnapshot())
    registry.expire()
    assert await ctl.drain_once() == ["bard-small-auto-1"]
    assert actuator.calls == [("remove", "bard-small", ("bard-small-auto-1",))]
    assert sample("switchboard_scheduler_allocation_drains_total", {"expert": "bard-small", "outcome": "gone"}) == gone + 1


async def test_a_draining_replica_that_registers_again_stays_draining() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-auto-1")
    registry.record_placement("req-1", "bard-small-auto-1")
    ctl = controller(registry, clock, FakeActuator(owned=["bard-small-auto-1"]))
    await ctl.step()
    registry.register(registry.get("bard-small-auto-1").info)  # e.g. after a missed heartbeat: READY again
    assert await ctl.drain_once() == []  # still in flight
    assert registry.get("bard-small-auto-1").state is ReplicaState.DRAINING


async def test_bounds_and_cooldown_hold_the_count() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0", running=40)  # KEDA wants 10
    actuator = FakeActuator()
    ctl = controller(registry, clock, actuator, cfg=config(budget=8, cooldown=60.0, bard_small=(1, 3)))
    decision = await ctl.step()
    assert decision.applied == {"bard-small": 3} and decision.reasons == {"bard-small": REASON_BOUNDS}
    for rid in ("bard-small-auto-1", "bard-small-auto-2"):
        register(registry, rid)
    registry.report_load("bard-small-0", LoadSnapshot())
    clock.now += 10  # idle now, but the last change is 10 s old: held by the 60 s cool-down
    decision = await ctl.step()
    assert decision.applied == {"bard-small": 3} and decision.reasons == {"bard-small": REASON_COOLDOWN}
    clock.now += 60
    for rid in registry.replicas():
        registry.report_load(rid.replica_id, LoadSnapshot())
    decision = await ctl.step()
    assert decision.applied == {"bard-small": 1} and decision.reasons == {"bard-small": REASON_BOUNDS}
    assert sample(
        "switchboard_scheduler_allocation_decisions_total", {"expert": "bard-small", "allocator": "keda", "reason": "cooldown"}
    ) >= 1


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("reason", ["http_403", "http_500"])
async def test_a_failing_actuator_is_reported_and_retried_next_period(reason: str) -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0", running=8)
    actuator = FakeActuator()
    actuator.fail = [ActuatorError(reason, f"the API server answered {reason}")]
    ctl = controller(registry, clock, actuator, cfg=config(cooldown=60.0))
    before = faults(reason)
    with capture_logs() as logs:
        decision = await ctl.step()
    assert faults(reason) == before + 1 and decision.faults == [f"add bard-small: {reason}"]
    (error,) = [e for e in logs if e["event"] == "allocation actuator failed; retrying next period"]
    assert error["log_level"] == "error" and error["reason"] == reason and error["expert"] == "bard-small"
    assert actuator.calls == [] and ctl.pending == []
    assert "bard-small" not in ctl.cooldown.last_change  # nothing changed: no cool-down either
    clock.now += 10
    decision = await ctl.step()  # the next period tries again, and it works
    assert decision.faults == [] and actuator.calls == [("add", "bard-small", 1)]


async def test_an_actuator_call_that_hangs_times_out_without_blocking_the_loop() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0", running=8)
    actuator = FakeActuator()
    actuator.hang = 1.0
    ctl = controller(registry, clock, actuator, actuator_timeout_seconds=0.2)
    before = faults("timeout")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    decision = await ctl.step()
    task.cancel()
    assert time.monotonic() - started < 0.9 and ticks >= 5  # the loop kept running meanwhile
    assert faults("timeout") == before + 1 and decision.faults == ["add bard-small: timeout"]


async def test_a_failed_stop_keeps_the_replica_draining_and_retries_after_a_period() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-auto-1")
    actuator = FakeActuator(owned=["bard-small-auto-1"])
    actuator.fail = [ActuatorError("http_500", "boom")]
    ctl = controller(registry, clock, actuator)
    await ctl.step()
    assert "bard-small-auto-1" in ctl.draining and actuator.calls == []
    assert await ctl.drain_once() == []  # not before the retry time
    clock.now += 10
    assert await ctl.drain_once() == ["bard-small-auto-1"]


# ----------------------------------------------------------------------------- learned allocator, kill switch


def doubling_network() -> AllocationNetwork:
    """Outputs a margin of log(2) and no damping whatever the input: desired = 2 x the HPA formula's."""
    n = len(FEATURE_NAMES)
    return AllocationNetwork(np.zeros(n), np.ones(n), ((np.zeros((n, 2)), np.array([math.log(2.0), 0.0])),))


async def test_learned_allocator_and_the_kill_switch(tmp_path: Path) -> None:
    policy = write_allocation_file(tmp_path / "alloc.json", doubling_network(), {"seed": 1})
    kill = tmp_path / "allocation.off"
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    actuator = FakeActuator()
    cfg = config(budget=8, bard_small=(1, 8))
    ctl = controller(registry, clock, actuator, allocator="learned", cfg=cfg, policy_file=policy, kill_switch_file=kill)
    # 1000 tokens/s placed over the period, the HPA target on 1 replica: HPA keeps 1; learned doubles that.
    place_demand("bard-small", 10_000)
    clock.now += 10
    decision = await ctl.step()
    assert decision.allocator == "learned" and decision.applied == {"bard-small": 2}
    kill.touch()
    with capture_logs() as logs:
        clock.now += 10
        decision = await ctl.step()
    assert decision.allocator == "hpa" and decision.desired == {"bard-small": 0}  # no demand this period
    assert sample("switchboard_scheduler_allocation_kill_switch", {}) == 1
    assert any(e["event"].startswith("allocation kill switch engaged") and e["log_level"] == "warning" for e in logs)
    kill.unlink()
    clock.now += 10
    decision = await ctl.step()
    assert decision.allocator == "learned" and sample("switchboard_scheduler_allocation_kill_switch", {}) == 0


def test_a_pools_tokens_per_second_is_the_demand_placed_since_the_last_period() -> None:
    # Prompt + output budget of the requests placed, per second, as the simulator counts arrivals;
    # not what the replicas report generating (a backlog would hide the demand).
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    ctl = controller(registry, clock, FakeActuator())
    place_demand("bard-small", 4_000)
    clock.now += 10
    (first,) = ctl.observe(clock.now)
    assert first.tokens_per_second == pytest.approx(400.0)
    clock.now += 5
    (second,) = ctl.observe(clock.now)
    assert second.tokens_per_second == 0.0  # nothing placed since


@pytest.mark.parametrize("problem", ["missing", "corrupt", "schema"])
async def test_an_unusable_policy_file_falls_back_to_the_heuristic_with_a_warning(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "alloc.json"
    if problem == "corrupt":
        path.write_text('{"format": "switchboard-allocation-policy", "version": 1, "lay')
    elif problem == "schema":
        write_allocation_file(path, doubling_network())
        data = json.loads(path.read_text())
        data["features"] = data["features"][:-1]
        path.write_text(json.dumps(data))
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    before = sample("switchboard_scheduler_allocation_fallbacks_total", {"reason": problem})
    with capture_logs() as logs:
        ctl = controller(registry, clock, FakeActuator(), allocator="learned", policy_file=path)
        decision = await ctl.step()
    assert decision.allocator == "hpa"
    assert sample("switchboard_scheduler_allocation_fallbacks_total", {"reason": problem}) == before + 1
    (warning,) = [e for e in logs if e["event"] == "learned allocator falls back to the heuristic"]
    assert warning["log_level"] == "warning" and warning["reason"] == problem and warning["heuristic"] == "hpa"


async def test_a_policy_file_that_turns_bad_mid_run_keeps_the_last_good_weights(tmp_path: Path) -> None:
    path = write_allocation_file(tmp_path / "alloc.json", doubling_network())
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    ctl = controller(registry, clock, FakeActuator(), allocator="learned", policy_file=path, cfg=config(budget=8, bard_small=(1, 8)))
    assert (await ctl.step()).allocator == "learned"
    before = sample("switchboard_scheduler_allocation_fallbacks_total", {"reason": "corrupt"})
    path.write_text("half-writ")
    clock.now += 10
    assert (await ctl.step()).allocator == "learned"
    assert sample("switchboard_scheduler_allocation_fallbacks_total", {"reason": "corrupt"}) == before + 1
    path.unlink()
    clock.now += 10
    assert (await ctl.step()).allocator == "learned"  # still the last good weights


# ----------------------------------------------------------------------------- dry run, records


async def test_dry_run_prints_decisions_and_drains_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0")
    register(registry, "bard-small-1")
    register(registry, "milton-small-0", expert="milton-small", running=8)
    ctl = controller(
        registry, clock, DryRunActuator(), cfg=config(budget=4, bard_small=(1, 2), milton_small=(1, 2))
    )
    exporter = in_memory_span_exporter()
    decision = await ctl.step()
    assert decision.applied == {"bard-small": 1, "milton-small": 2}
    out = capsys.readouterr().out
    assert "would start 1 replica(s) of milton-small" in out
    assert "would stop bard-small-0 of bard-small" in out  # a tie: the lowest id
    assert all(r.state is ReplicaState.READY for r in registry.replicas()) and ctl.draining == {} and ctl.pending == []
    span = next(s for s in exporter.get_finished_spans() if s.name == "scheduler.allocate")
    events = {e.attributes["switchboard.expert"]: dict(e.attributes) for e in span.events if e.name == "allocation.decision"}
    assert events["milton-small"] == {
        "switchboard.expert": "milton-small", "current": 1, "desired": 2, "applied": 2, "reason": "scale_up"
    }
    assert span.attributes["switchboard.actuator"] == "dry-run"


# ----------------------------------------------------------------------------- settings


def load(environ: dict[str, str]) -> SchedulerSettings:
    return load_settings(
        SchedulerSettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT, environ=environ,
    )


def test_allocation_is_off_by_default_and_configured_by_settings() -> None:
    assert load({}).allocator == "off" and load({}).actuator == "dry-run"
    settings = load(
        {
            "SCHEDULER_ALLOCATOR": "keda",
            "SCHEDULER_ALLOCATION_BUDGET": "5",
            "SCHEDULER_ALLOCATION_BOUNDS": "bard-small=1:3, milton-small=0:2",
            "SCHEDULER_ALLOCATION_COOLDOWN_SECONDS": "30",
        }
    )
    cfg = settings.allocation_config(["bard-small", "milton-small", "scribe-large"])
    assert cfg.budget == 5 and cfg.scale_down_cooldown_seconds == 30.0
    assert cfg.bounds == {"bard-small": PoolBounds(1, 3), "milton-small": PoolBounds(0, 2), "scribe-large": PoolBounds(1, 5)}


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"SCHEDULER_ALLOCATOR": "magic"}, "SCHEDULER_ALLOCATOR"),
        ({"SCHEDULER_ACTUATOR": "ssh"}, "SCHEDULER_ACTUATOR"),
        ({"SCHEDULER_ALLOCATOR": "hpa"}, "SCHEDULER_ALLOCATION_BUDGET"),
        ({"SCHEDULER_ALLOCATOR": "hpa", "SCHEDULER_ALLOCATION_BUDGET": "2", "SCHEDULER_ACTUATOR": "local"}, "SCHEDULER_LOCAL_GENERATORS_FILE"),
        ({"SCHEDULER_K8S_DEPLOYMENT": "generators"}, "SCHEDULER_K8S_DEPLOYMENT"),
        ({"SCHEDULER_ALLOCATION_PERIOD_SECONDS": "nan"}, "SCHEDULER_ALLOCATION_PERIOD_SECONDS"),
    ],
)
def test_allocation_setting_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(environ)


@pytest.mark.parametrize(
    ("bounds", "budget", "message"),
    [
        ("bard-small=1", 4, "expert=min:max"),
        ("nobody=1:2", 4, "not a declared expert"),
        ("bard-small=3:1", 4, "min_replicas <= max_replicas"),
        ("bard-small=3:4,milton-small=3:4", 4, "exceed the budget"),
    ],
)
def test_bad_bounds_name_the_variable(bounds: str, budget: int, message: str) -> None:
    settings = load({"SCHEDULER_ALLOCATOR": "hpa", "SCHEDULER_ALLOCATION_BUDGET": str(budget), "SCHEDULER_ALLOCATION_BOUNDS": bounds})
    with pytest.raises(SettingsError, match=f"SCHEDULER_ALLOCATION_BOUNDS.*{message}"):
        settings.allocation_config(["bard-small", "milton-small"])


def test_parse_bounds_defaults_to_one_to_the_budget() -> None:
    assert parse_bounds("", ["a"], 3) == {"a": PoolBounds(1, 3)}


# ----------------------------------------------------------------------------- a whole scheduler


async def test_the_scheduler_keeps_placing_while_the_kubernetes_actuator_fails(tmp_path: Path) -> None:
    """A real scheduler (gRPC server) with the Kubernetes actuator against the stand-in answering 403,
    then 500, then serving: Place answers throughout, each fault is counted, the third period scales."""
    from http.server import ThreadingHTTPServer

    from switchboard.common.channels import open_channel
    from switchboard.common.service import wait_started
    from switchboard.scheduler.app import SchedulerApp
    from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

    from .test_actuators import ScaleStandIn, handler_for, k8s_actuator

    state = ScaleStandIn({("switchboard", f"generator-{e}"): 1 for e in ("bard-small", "milton-small", "scribe-large")})
    # The first reads (what already runs, one per pool) are served; then the scale-up fails twice.
    state.failures = [0, 0, 0, 403, 500]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = SchedulerSettings(
        server=ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0.5),
        allocator="keda",
        actuator="kubernetes",
        allocation_budget=4,
        allocation_bounds="bard-small=1:3,milton-small=1:1,scribe-large=1:1",
        allocation_period_seconds=0.3,
        allocation_keda_target_queue=4.0,
    )
    actuator = k8s_actuator(f"http://127.0.0.1:{server.server_address[1]}")
    before = {
        code: sample(
            "switchboard_scheduler_allocation_actuator_faults_total",
            {"actuator": "kubernetes", "operation": "add", "reason": f"http_{code}"},
        )
        for code in (403, 500)
    }
    app = SchedulerApp(settings, ("bard-small", "milton-small", "scribe-large"), actuator=actuator)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.service.started)
    try:
        async with open_channel(f"127.0.0.1:{app.service.port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await stub.Register(
                scheduler_pb2.RegisterRequest(
                    replica_id="bard-small-0", expert="bard-small", address="127.0.0.1:50061",
                    load=scheduler_pb2.ReplicaLoad(running=8),
                )
            )
            deadline = time.monotonic() + 10
            placed = 0
            while state.replicas[("switchboard", "generator-bard-small")] == 1:
                assert time.monotonic() < deadline, f"never scaled; requests: {[(r.method, r.path) for r in state.requests]}"
                reply = await stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"], request_id=f"r{placed}"))
                assert reply.placements[0].replica.replica_id == "bard-small-0"
                await stub.Complete(scheduler_pb2.SchedulerCompleteRequest(request_id=f"r{placed}", success=True))
                await stub.ReportLoad(
                    scheduler_pb2.ReportLoadRequest(replica_id="bard-small-0", load=scheduler_pb2.ReplicaLoad(running=8))
                )
                placed += 1
                await asyncio.sleep(0.05)
    finally:
        app.service.stop()
        await task
        server.shutdown()
        server.server_close()
    assert state.replicas[("switchboard", "generator-bard-small")] == 2 and placed >= 3
    for code in (403, 500):
        assert sample(
            "switchboard_scheduler_allocation_actuator_faults_total",
            {"actuator": "kubernetes", "operation": "add", "reason": f"http_{code}"},
        ) == before[code] + 1
    patches = [r for r in state.requests if r.method == "PATCH"]
    assert len(patches) == 1 and patches[0].body["spec"] == {"replicas": 2}


async def test_replicas_still_starting_when_the_controller_starts_are_not_started_again() -> None:
    """At a stack's start its generators are still loading: the actuator names them (the local
    template's ids, or a Deployment's count) and they count as starting, not missing."""
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    actuator = FakeActuator()
    actuator.starting = {"bard-small": ["bard-small-0"], "milton-small": [None, None]}
    cfg = config(budget=6, bard_small=(1, 3), milton_small=(1, 3))
    ctl = controller(registry, clock, actuator, cfg=cfg)
    decision = await ctl.step()
    assert decision.current == {"bard-small": 1, "milton-small": 2}
    assert actuator.calls == []  # nothing started: KEDA's 0 is bounded to 1, and 2 milton-small are coming
    register(registry, "bard-small-0")
    register(registry, "milton-small-x", expert="milton-small")
    clock.now += 10
    decision = await ctl.step()
    assert decision.current == {"bard-small": 1, "milton-small": 2}
    assert [(p.expert, p.replica_id) for p in ctl.pending] == [("milton-small", None)]


async def test_an_actuator_that_cannot_say_what_runs_decides_nothing_until_it_can() -> None:
    clock = Clock()
    registry = ReplicaRegistry(expiry_seconds=500.0, clock=clock)
    register(registry, "bard-small-0", running=8)
    actuator = FakeActuator()
    actuator.fail_read = [ActuatorError("http_403", "forbidden")]
    ctl = controller(registry, clock, actuator)
    before = faults("http_403", operation="read")
    assert await ctl.step() is None and actuator.calls == []
    assert faults("http_403", operation="read") == before + 1
    clock.now += 10
    registry.report_load("bard-small-0", LoadSnapshot(running=8))
    assert (await ctl.step()).applied == {"bard-small": 2}
