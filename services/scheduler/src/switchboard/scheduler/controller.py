"""The allocation controller: every control period, how many replicas each expert pool gets, and acting on it.

Opt-in (SCHEDULER_ALLOCATOR, default `off`). Every `period_seconds` it

1. builds one `PoolObservation` per pool from the registry (`observe`): the sum of its serving
   replicas' reported tokens/s, the requests placed and the requests finished and missing their
   SLO since the last period (from the scheduler's own counters), waiting and running sequences,
   the mean KV use, and the current replicas: serving (ready, not draining) plus those started and
   not registered yet (pending, for at most SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS);
2. runs the configured allocator (`allocation.make_allocator`) and `allocation.constrain` (per-pool
   bounds, scale-down cool-down, the budget), and `allocation.explain` for each pool's reason;
3. records the decision: `switchboard_scheduler_allocation_*` metrics, one structured log line per
   pool whose count or reason changed, and a `scheduler.allocate` span with an
   `allocation.decision` event per pool;
4. acts through its actuator (`actuators/`): a scale-up starts replicas at once; a scale-down
   picks the least-loaded replicas the actuator can stop (fewest in flight, then fewest running and
   waiting, then the newest), marks them draining in the registry so placement stops choosing them,
   and stops each only once nothing is in flight on it (`drain_once`, every second), or once it is
   gone (died or expired: the actuator is still told, so the count goes down).

Before the first decision it counts the replicas the actuator says already run or start
(`Actuator.expected`) and have not registered yet as pending, so a stack whose generators are still
loading is not scaled up again.

Safety: the bounds, the cool-down and the budget are `constrain`'s; a failing actuator call
(`ActuatorError`, or no answer within SCHEDULER_ACTUATOR_TIMEOUT_SECONDS) changes nothing, is
counted (`switchboard_scheduler_allocation_actuator_faults_total`) and logged, and is tried again
the next period, while placement goes on (actuator calls run in a worker thread); the learned
allocator falls back to the heuristic (`allocation.FALLBACK`) with a warning when its file is
missing, corrupt or of another schema, keeps its last good weights when a good file turns bad,
and is held off (the heuristic allocates) while the kill-switch file exists.

The controller is the one owner of its state (pending starts, drains, the cool-down clock) and
runs on the scheduler's event loop like the registry; only the actuator calls leave it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchboard.common.logging import get_logger
from switchboard.common.telemetry import get_tracer
from switchboard.scheduler import metrics
from switchboard.scheduler.actuators import Actuator, ActuatorError
from switchboard.scheduler.allocation import (
    FALLBACK,
    AllocationConfig,
    AllocationNetwork,
    AllocationPolicyError,
    Allocator,
    CooldownState,
    LearnedAllocator,
    PoolObservation,
    constrain,
    explain,
    load_allocation_file,
    make_allocator,
)
from switchboard.scheduler.registry import ReplicaRecord, ReplicaRegistry, ReplicaState

log = get_logger(__name__)
tracer = get_tracer(__name__)

# How often drains are checked between control periods (a drained replica is stopped this soon).
DRAIN_CHECK_SECONDS = 1.0


@dataclass
class _Pending:
    """A replica the actuator started that has not registered yet."""

    expert: str
    replica_id: str | None  # None: the actuator cannot know it (a Kubernetes pod)
    deadline: float


@dataclass
class _Drain:
    """A replica being drained for a scale-down."""

    expert: str
    since: float
    retry_at: float = 0.0


@dataclass
class Decision:
    """One control period's decision (also kept as `ScalingController.last`)."""

    at: float
    allocator: str
    current: dict[str, int]
    desired: dict[str, int]
    applied: dict[str, int]
    reasons: dict[str, str]
    drained: dict[str, list[str]] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ScalingController:
    """Allocation across expert pools for one scheduler (module docstring)."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        config: AllocationConfig,
        allocator: str,
        actuator: Actuator,
        *,
        policy_file: str | Path = "",
        kill_switch_file: str | Path = "",
        start_timeout_seconds: float = 300.0,
        actuator_timeout_seconds: float = 30.0,
        experts: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.config = config
        self.allocator_name = allocator
        self.actuator = actuator
        self.policy_file = Path(policy_file) if policy_file else None
        self.kill_switch_file = Path(kill_switch_file) if kill_switch_file else None
        self.start_timeout_seconds = start_timeout_seconds
        self.actuator_timeout_seconds = actuator_timeout_seconds
        self.experts = frozenset(experts) | frozenset(config.pools)
        self.clock = clock
        self.cooldown = CooldownState()
        self.pending: list[_Pending] = []
        self.draining: dict[str, _Drain] = {}
        self.last: Decision | None = None
        self._seen: set[str] = set(r.replica_id for r in registry.replicas())
        self._counters: dict[str, tuple[float, float, float, float]] = {e: metrics.pool_counters(e) for e in config.pools}
        self._last_at = clock()
        self._last_reason: dict[str, str] = {}
        self._kill_switch = False
        self._heuristic = make_allocator(FALLBACK)
        self._policy_identity: tuple[int, int, int] | None = None
        self._seeded = False
        self._allocator: Allocator = self._heuristic if allocator == "learned" else make_allocator(allocator)
        if allocator == "learned":
            self._reload_policy(force=True)
        metrics.ALLOCATION_KILL_SWITCH.set(0)

    # ------------------------------------------------------------------ the allocator in use

    def _reload_policy(self, force: bool = False) -> None:
        """(Re)read the learned allocator's file when it changed; keep the last good weights on a bad one."""
        identity = _file_identity(self.policy_file) if self.policy_file is not None else None
        if not force and identity == self._policy_identity:
            return
        self._policy_identity = identity
        had: AllocationNetwork | None = getattr(self._allocator, "network", None)
        try:
            if self.policy_file is None:
                raise AllocationPolicyError("missing", "no allocation policy file (SCHEDULER_ALLOCATION_POLICY_FILE)")
            network = load_allocation_file(self.policy_file)
        except AllocationPolicyError as exc:
            metrics.ALLOCATION_FALLBACKS.labels(reason=exc.reason).inc()
            if had is not None:
                log.warning("allocation policy file unusable, keeping the last good weights", reason=exc.reason, error=str(exc))
            else:
                log.warning(
                    "learned allocator falls back to the heuristic", heuristic=FALLBACK, reason=exc.reason, error=str(exc)
                )
                self._allocator = self._heuristic
            return
        self._allocator = LearnedAllocator(network=network)
        log.info("allocation policy file loaded", path=str(self.policy_file), training=dict(network.training))

    def active_allocator(self) -> Allocator:
        """What allocates this period: the configured allocator, or the heuristic (fallback, kill switch)."""
        if self.allocator_name != "learned":
            return self._allocator
        killed = self.kill_switch_file is not None and self.kill_switch_file.exists()
        if killed != self._kill_switch:
            self._kill_switch = killed
            metrics.ALLOCATION_KILL_SWITCH.set(1 if killed else 0)
            if killed:
                log.warning("allocation kill switch engaged: the heuristic allocates", file=str(self.kill_switch_file), heuristic=FALLBACK)
            else:
                log.info("allocation kill switch released: the learned allocator allocates again", file=str(self.kill_switch_file))
        if killed:
            return self._heuristic
        self._reload_policy()
        return self._allocator

    # ------------------------------------------------------------------ observing

    def _refresh_pending(self, now: float) -> None:
        """Drop the pending starts that registered (or timed out)."""
        ids = {r.replica_id: r.expert for r in self.registry.replicas()}
        named = {p.replica_id for p in self.pending if p.replica_id is not None}
        # New replicas no named start claims: each takes the place of one unnamed start of its pool.
        fresh: dict[str, int] = {}
        for rid, expert in ids.items():
            if rid not in self._seen and rid not in named:
                fresh[expert] = fresh.get(expert, 0) + 1
        self._seen = set(ids)
        kept: list[_Pending] = []
        for p in self.pending:
            if p.replica_id is not None and p.replica_id in ids:
                continue  # registered
            if p.replica_id is None and fresh.get(p.expert, 0) > 0:
                fresh[p.expert] -= 1
                continue
            if now >= p.deadline:
                metrics.ALLOCATION_START_TIMEOUTS.labels(expert=p.expert).inc()
                log.warning(
                    "started replica never registered",
                    expert=p.expert,
                    replica_id=p.replica_id,
                    start_timeout_seconds=self.start_timeout_seconds,
                )
                continue
            kept.append(p)
        self.pending = kept

    def observe(self, now: float) -> list[PoolObservation]:
        """One observation per pool from the registry and the scheduler's counters since the last period."""
        elapsed = max(now - self._last_at, 1e-9)
        self._last_at = now
        by_pool: dict[str, list[ReplicaRecord]] = {e: [] for e in self.config.pools}
        for record in self.registry.replicas():
            if record.expert in by_pool and record.state is ReplicaState.READY and self.registry.is_healthy(record):
                by_pool[record.expert].append(record)
        out = []
        for expert in self.config.pools:
            serving = by_pool[expert]
            counters = metrics.pool_counters(expert)
            placed, finished, misses, tokens = counters
            before = self._counters.get(expert, (0.0, 0.0, 0.0, 0.0))
            self._counters[expert] = counters
            kv = [r.load.kv_utilization for r in serving]
            pending = sum(1 for p in self.pending if p.expert == expert)
            out.append(
                PoolObservation(
                    expert=expert,
                    # The demand placed, as the simulator counts arrivals: prompt + output budget per second.
                    tokens_per_second=max(0.0, tokens - before[3]) / elapsed,
                    requests_per_second=max(0.0, placed - before[0]) / elapsed,
                    queue_depth=sum(r.load.waiting for r in serving),
                    running=sum(r.load.running for r in serving),
                    kv_utilization=sum(kv) / len(kv) if kv else 0.0,
                    slo_misses=int(max(0.0, misses - before[2])),
                    finished=int(max(0.0, finished - before[1])),
                    replicas=len(serving) + pending,
                    ready=len(serving),
                )
            )
        return out

    # ------------------------------------------------------------------ acting

    async def _act(self, operation: str, expert: str, call: Callable[[], Any], decision: Decision | None) -> tuple[bool, Any]:
        """Run one blocking actuator call in a thread with the timeout; a failure is counted and logged."""
        try:
            result = await asyncio.wait_for(asyncio.to_thread(call), self.actuator_timeout_seconds)
        except ActuatorError as exc:
            reason, message = exc.reason, str(exc)
        except TimeoutError:
            reason, message = "timeout", f"no answer within {self.actuator_timeout_seconds:g} s"
        except Exception as exc:  # an actuator bug must not stop the controller (or placement)
            reason, message = "error", f"{type(exc).__name__}: {exc}"
        else:
            return True, result
        metrics.ALLOCATION_ACTUATOR_FAULTS.labels(actuator=self.actuator.name, operation=operation, reason=reason).inc()
        log.error(
            "allocation actuator failed; retrying next period",
            actuator=self.actuator.name,
            operation=operation,
            expert=expert,
            reason=reason,
            error=message,
        )
        if decision is not None:
            decision.faults.append(f"{operation} {expert}: {reason}")
        from opentelemetry import trace

        trace.get_current_span().add_event(
            "allocation.fault",
            {"switchboard.expert": expert, "operation": operation, "reason": reason, "actuator": self.actuator.name},
        )
        return False, None

    def _choose_to_drain(self, expert: str, count: int) -> list[str]:
        """The `count` least-loaded serving replicas of `expert` the actuator can stop."""
        candidates = [
            r
            for r in self.registry.replicas()
            if r.expert == expert
            and r.state is ReplicaState.READY
            and r.replica_id not in self.draining
            and self.actuator.can_remove(r.replica_id)
        ]
        candidates.sort(key=lambda r: (r.inflight, r.load.running + r.load.waiting, -r.registered_at, r.replica_id))
        return [r.replica_id for r in candidates[:count]]

    def _gauges_changed(self) -> None:
        metrics.update_replica_gauges(self.experts, self.registry.replicas())

    async def _seed(self, now: float) -> bool:
        """Once, before the first decision: count the replicas the actuator says are already starting
        (`Actuator.expected`) as pending, so a stack whose generators are still loading is not scaled
        up again. False when the actuator could not say (the period then only records the fault)."""
        registered: dict[str, set[str]] = {}
        for record in self.registry.replicas():
            registered.setdefault(record.expert, set()).add(record.replica_id)
        seeded: list[_Pending] = []
        for expert in self.config.pools:
            ok, expected = await self._act("read", expert, lambda e=expert: self.actuator.expected(e), None)
            if not ok:
                return False
            have = registered.get(expert, set())
            named = [rid for rid in expected if rid is not None and rid not in have]
            unnamed = max(0, sum(1 for rid in expected if rid is None) - len(have))
            deadline = now + self.start_timeout_seconds
            seeded += [_Pending(expert, rid, deadline) for rid in named]
            seeded += [_Pending(expert, None, deadline) for _ in range(unnamed)]
        self.pending += seeded
        self._seeded = True
        if seeded:
            log.info(
                "allocation counts replicas still starting",
                pending={e: sum(1 for p in seeded if p.expert == e) for e in self.config.pools},
            )
        return True

    async def step(self) -> Decision | None:
        """One control period: observe, allocate, constrain, record, act (None: the actuator could
        not yet say which replicas already run, see `_seed`; nothing is decided then)."""
        now = self.clock()
        if not self._seeded and not await self._seed(now):
            return None
        with tracer.start_as_current_span("scheduler.allocate") as span:
            allocator = self.active_allocator()
            self._refresh_pending(now)
            observations = self.observe(now)
            current = {o.expert: o.replicas for o in observations}
            before = dict(self.cooldown.last_change)
            desired = {k: int(v) for k, v in allocator.desired(observations, self.config).items()}
            applied = constrain(desired, current, self.config, self.cooldown, now)
            reasons = explain(desired, applied, current, self.config)
            name = allocator.name  # the heuristic's own name while it stands in for the learned one
            decision = Decision(now, name, current, desired, applied, reasons)
            span.set_attribute("switchboard.allocator", name)
            span.set_attribute("switchboard.actuator", self.actuator.name)
            for o in observations:
                e = o.expert
                metrics.ALLOCATION_DECISIONS.labels(expert=e, allocator=name, reason=reasons[e]).inc()
                for kind, value in (
                    ("current", o.replicas),
                    ("ready", o.ready),
                    ("pending", o.replicas - o.ready),
                    ("draining", sum(1 for d in self.draining.values() if d.expert == e)),
                    ("desired", desired.get(e, o.replicas)),
                    ("applied", applied[e]),
                ):
                    metrics.ALLOCATION_REPLICAS.labels(expert=e, kind=kind).set(value)
                attributes = {
                    "switchboard.expert": e,
                    "current": o.replicas,
                    "desired": desired.get(e, o.replicas),
                    "applied": applied[e],
                    "reason": reasons[e],
                }
                span.add_event("allocation.decision", attributes)
                changed = applied[e] != o.replicas or self._last_reason.get(e) != reasons[e]
                (log.info if changed else log.debug)(
                    "allocation decision",
                    expert=e,
                    allocator=name,
                    actuator=self.actuator.name,
                    current=o.replicas,
                    ready=o.ready,
                    desired=desired.get(e, o.replicas),
                    applied=applied[e],
                    reason=reasons[e],
                    tokens_per_second=round(o.tokens_per_second, 1),
                    queue_depth=o.queue_depth,
                    running=o.running,
                    slo_misses=o.slo_misses,
                    finished=o.finished,
                )
                self._last_reason[e] = reasons[e]
            for e in self.config.pools:
                change = applied[e] - current.get(e, 0)
                if change > 0:
                    ok, ids = await self._act("add", e, lambda e=e, n=change: self.actuator.add(e, n), decision)
                    if not ok:
                        self._restore_cooldown(e, before)
                    elif self.actuator.acts:
                        ids = list(ids or [])
                        deadline = now + self.start_timeout_seconds
                        self.pending += [_Pending(e, rid, deadline) for rid in ids]
                        self.pending += [_Pending(e, None, deadline) for _ in range(change - len(ids))]
                elif change < 0:
                    chosen = self._choose_to_drain(e, -change)
                    if len(chosen) < -change:
                        log.warning(
                            "scale-down short of replicas the actuator can stop",
                            expert=e,
                            wanted=-change,
                            stoppable=len(chosen),
                            actuator=self.actuator.name,
                        )
                    if not chosen:
                        self._restore_cooldown(e, before)
                        continue
                    decision.drained[e] = chosen
                    if not self.actuator.acts:  # dry run: say what would be drained and stopped
                        await self._act("remove", e, lambda e=e, c=chosen: self.actuator.remove(e, c), decision)
                        continue
                    for rid in chosen:
                        self.registry.set_draining(rid)
                        self.draining[rid] = _Drain(e, now)
                        log.info("replica draining for scale-down", expert=e, replica_id=rid)
                    self._gauges_changed()
            self.last = decision
        await self.drain_once()
        return decision

    def _restore_cooldown(self, expert: str, before: dict[str, float]) -> None:
        """Nothing changed after all: the cool-down clock goes back to where it was."""
        if expert in before:
            self.cooldown.last_change[expert] = before[expert]
        else:
            self.cooldown.last_change.pop(expert, None)

    async def drain_once(self) -> list[str]:
        """Stop every draining replica that is idle (nothing in flight) or gone; returns the stopped ids."""
        now = self.clock()
        stopped: list[str] = []
        for rid, drain in list(self.draining.items()):
            if now < drain.retry_at:
                continue
            record = self.registry.get(rid)
            if record is not None and record.state is not ReplicaState.DRAINING:
                self.registry.set_draining(rid)  # it registered again meanwhile (READY): still draining
                self._gauges_changed()
            if record is not None and record.inflight > 0:
                continue
            outcome = "gone" if record is None else "stopped"
            ok, _ = await self._act("remove", drain.expert, lambda e=drain.expert, r=rid: self.actuator.remove(e, [r]), None)
            if not ok:
                drain.retry_at = now + self.config.period_seconds
                continue
            del self.draining[rid]
            if not self.actuator.targeted and self.registry.get(rid) is not None:
                # The actuator lowered a count and the orchestrator picks the pod: this one serves again.
                self.registry.set_draining(rid, False)
                self._gauges_changed()
            metrics.ALLOCATION_DRAINS.labels(expert=drain.expert, outcome=outcome).inc()
            log.info(
                "drained replica stopped" if outcome == "stopped" else "draining replica gone; stopped",
                expert=drain.expert,
                replica_id=rid,
                drain_seconds=round(now - drain.since, 3),
            )
            stopped.append(rid)
        return stopped

    async def run(self) -> None:
        """Step every `period_seconds` and check drains every second, until cancelled."""
        log.info(
            "allocation controller starting",
            allocator=self.allocator_name,
            actuator=self.actuator.name,
            budget=self.config.budget,
            bounds={n: [b.min_replicas, b.max_replicas] for n, b in self.config.bounds.items()},
            period_seconds=self.config.period_seconds,
            cooldown_seconds=self.config.scale_down_cooldown_seconds,
        )
        next_step = self.clock() + self.config.period_seconds
        try:
            while True:
                wait = min(DRAIN_CHECK_SECONDS, max(0.0, next_step - self.clock()))
                await asyncio.sleep(wait)
                try:
                    if self.clock() >= next_step:
                        next_step += self.config.period_seconds * max(1, math.ceil((self.clock() - next_step) / self.config.period_seconds))
                        await self.step()
                    elif self.draining:
                        await self.drain_once()
                except Exception:  # keep controlling (and placing) whatever one period did
                    log.exception("allocation period failed")
        finally:
            await asyncio.to_thread(self.actuator.close)


def parse_bounds(text: str, pools: Sequence[str], budget: int) -> dict[str, Any]:
    """`expert=min:max,...` (SCHEDULER_ALLOCATION_BOUNDS) -> {expert: PoolBounds}; unlisted pools: 1..budget.

    Raises ValueError naming the problem.
    """
    from switchboard.scheduler.allocation import PoolBounds

    bounds = {name: PoolBounds(1, max(1, budget)) for name in pools}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, span = item.partition("=")
        low, colon, high = span.partition(":")
        if not sep or not colon:
            raise ValueError(f"{item!r} is not expert=min:max")
        name = name.strip()
        if name not in bounds:
            raise ValueError(f"{name!r} is not a declared expert ({', '.join(sorted(bounds)) or 'none'})")
        try:
            bounds[name] = PoolBounds(int(low), int(high))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return bounds



def make_actuator(settings: Any) -> Actuator:
    """The actuator SCHEDULER_ACTUATOR names, configured by its settings (`SchedulerSettings`)."""
    if settings.actuator == "local":
        from switchboard.scheduler.actuators.local import GeneratorTemplate, LocalProcessActuator

        return LocalProcessActuator(GeneratorTemplate.read(Path(settings.local_generators_file).expanduser()))
    if settings.actuator == "kubernetes":
        from switchboard.scheduler.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(
            namespace=settings.k8s_namespace,
            deployment=settings.k8s_deployment,
            request_timeout=settings.actuator_timeout_seconds,
        )
    from switchboard.scheduler.actuators import DryRunActuator

    return DryRunActuator()


def controller_from_settings(
    settings: Any, registry: ReplicaRegistry, experts: Collection[str], actuator: Actuator | None = None
) -> ScalingController | None:
    """The controller the settings ask for (None when SCHEDULER_ALLOCATOR=off); SettingsError or
    ValueError naming what is wrong."""
    if settings.allocator == "off":
        return None
    config = settings.allocation_config(experts)
    if actuator is None:
        try:
            actuator = make_actuator(settings)
        except ValueError as exc:  # an unreadable generator template
            from switchboard.common.settings import SettingsError

            raise SettingsError(f"SCHEDULER_LOCAL_GENERATORS_FILE: {exc}") from None
    return ScalingController(
        registry,
        config,
        settings.allocator,
        actuator,
        policy_file=settings.allocation_policy_file,
        kill_switch_file=settings.allocation_kill_switch_file,
        start_timeout_seconds=settings.allocation_start_timeout_seconds,
        actuator_timeout_seconds=settings.actuator_timeout_seconds,
        experts=experts,
    )
