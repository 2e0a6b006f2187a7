"""The scheduler's domain metrics (Prometheus); per-RPC counters and latency come from the shared server."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge
from switchboard.scheduler.placement import UNDECLARED, PlacementResult
from switchboard.scheduler.registry import ReplicaRecord, ReplicaState
from switchboard.scheduler.slo import Verdict

REPLICAS = Gauge(
    "switchboard_scheduler_replicas",
    "Known generator replicas by expert and state.",
    ["expert", "state"],
)
PLACEMENTS = Counter(
    "switchboard_scheduler_placements_total",
    "Requested experts of Place calls by outcome: placed (holds the reserved primary), candidate (placed, not"
    " reserved), no_replica, too_short (every replica's max_model_len is below the request's), queue_full (every fitting replica's"
    " reported waiting queue is at its announced bound), unknown_expert.",
    ["expert", "outcome"],
)
EXPIRATIONS = Counter(
    "switchboard_scheduler_expirations_total",
    "Replicas dropped because their heartbeats stopped.",
    ["expert"],
)
COMPLETIONS = Counter(
    "switchboard_scheduler_completions_total",
    "Complete reports by expert and success.",
    ["expert", "success"],
)
INFLIGHT = Gauge(
    "switchboard_scheduler_inflight_requests",
    "Requests placed and not yet completed, by expert.",
    ["expert"],
)


def update_replica_gauges(experts: Iterable[str], replicas: Iterable[ReplicaRecord]) -> None:
    """Set the per-expert gauges from the registry (every declared expert appears, zeros included)."""
    counts: dict[tuple[str, str], int] = {}
    inflight: dict[str, int] = {}
    names = set(experts)
    for record in replicas:
        names.add(record.expert)
        key = (record.expert, record.state.value)
        counts[key] = counts.get(key, 0) + 1
        inflight[record.expert] = inflight.get(record.expert, 0) + record.inflight
    for expert in names:
        for state in ReplicaState:
            REPLICAS.labels(expert=expert, state=state.value).set(counts.get((expert, state.value), 0))
        INFLIGHT.labels(expert=expert).set(inflight.get(expert, 0))


SLO_REQUESTS = Counter(
    "switchboard_scheduler_slo_requests_total",
    "Completed requests judged against their expert's objective, by expert, objective and whether met.",
    ["expert", "objective", "met"],
)
GOODPUT = Counter(
    "switchboard_scheduler_goodput_requests_total",
    "Completed requests by expert and whether they met every objective of their expert (a failure never does).",
    ["expert", "good"],
)


def count_slo(expert: str, verdict: Verdict) -> None:
    """Count one completed request's SLO verdict."""
    for objective, met in (("ttft", verdict.ttft_met), ("tpot", verdict.tpot_met)):
        if met is not None:
            SLO_REQUESTS.labels(expert=expert, objective=objective, met=str(met).lower()).inc()
    GOODPUT.labels(expert=expert, good=str(verdict.good).lower()).inc()


PLACED_TOKENS = Counter(
    "switchboard_scheduler_placed_tokens_total",
    "Prompt tokens plus output budget (max_tokens) of the requests placed on each expert (primaries only): the"
    " demand whose rate the allocation controller reads as a pool's tokens/s.",
    ["expert"],
)


def count_placements(result: PlacementResult, demand_tokens: int = 0) -> None:
    """Count one Place call's outcome on every expert it asked for; `demand_tokens` go to the primary's expert."""
    for index, placement in enumerate(result.placements):
        PLACEMENTS.labels(expert=placement.expert, outcome="placed" if index == 0 else "candidate").inc()
        if index == 0 and demand_tokens > 0:
            PLACED_TOKENS.labels(expert=placement.expert).inc(demand_tokens)
    for shortfall in result.unavailable:
        # An undeclared name comes from the caller: one label for all keeps the series bounded.
        expert = "unknown" if shortfall.outcome == UNDECLARED else shortfall.expert
        PLACEMENTS.labels(expert=expert, outcome=shortfall.outcome).inc()


# Allocation across expert pools (controller.py): decisions, their reasons, replica counts, faults.
ALLOCATION_DECISIONS = Counter(
    "switchboard_scheduler_allocation_decisions_total",
    "Allocation decisions per pool and control period, by the allocator that made them and the reason for the"
    " applied count (steady, scale_up, scale_down, bounds, cooldown, budget).",
    ["expert", "allocator", "reason"],
)
ALLOCATION_REPLICAS = Gauge(
    "switchboard_scheduler_allocation_replicas",
    "Replica counts of each pool at the last control period: current (serving or starting, not draining), ready,"
    " pending (started, not registered yet), draining, desired (the allocator's raw proposal), applied (after"
    " bounds, cool-down and budget).",
    ["expert", "kind"],
)
ALLOCATION_ACTUATOR_FAULTS = Counter(
    "switchboard_scheduler_allocation_actuator_faults_total",
    "Actuator calls that failed (retried the next period), by actuator, operation (add, remove) and reason"
    " (http_<status>, timeout, unreachable, spawn, ...).",
    ["actuator", "operation", "reason"],
)
ALLOCATION_DRAINS = Counter(
    "switchboard_scheduler_allocation_drains_total",
    "Replicas the controller drained for a scale-down, by how the drain ended: stopped (idle, then stopped),"
    " gone (it died or expired while draining).",
    ["expert", "outcome"],
)
ALLOCATION_START_TIMEOUTS = Counter(
    "switchboard_scheduler_allocation_start_timeouts_total",
    "Replicas started by the actuator that did not register within SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS.",
    ["expert"],
)
ALLOCATION_KILL_SWITCH = Gauge(
    "switchboard_scheduler_allocation_kill_switch",
    "1 while the kill switch (SCHEDULER_ALLOCATION_KILL_SWITCH_FILE exists) holds the learned allocator off.",
)
ALLOCATION_FALLBACKS = Counter(
    "switchboard_scheduler_allocation_fallbacks_total",
    "Times the learned allocator's policy file could not be used (missing, corrupt, schema), so it allocated with"
    " the heuristic (or its last good weights).",
    ["reason"],
)


def pool_counters(expert: str) -> tuple[float, float, float, float]:
    """Of one pool, since start: requests placed (primary), requests finished, those that missed an objective,
    and the demand tokens placed (prompt + output budget)."""
    from prometheus_client import REGISTRY

    def value(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    placed = value("switchboard_scheduler_placements_total", {"expert": expert, "outcome": "placed"})
    good = value("switchboard_scheduler_goodput_requests_total", {"expert": expert, "good": "true"})
    bad = value("switchboard_scheduler_goodput_requests_total", {"expert": expert, "good": "false"})
    tokens = value("switchboard_scheduler_placed_tokens_total", {"expert": expert})
    return placed, good + bad, bad, tokens


# ----------------------------------------------------------------------------- rollouts

ROLLOUT_STATE = Gauge(
    "switchboard_scheduler_rollout_state",
    "1 for the state an expert's current (or last) rollout is in (running, paused, promoted, rolled_back, aborted), 0 for the others.",
    ["expert", "state"],
)
ROLLOUT_WEIGHT = Gauge(
    "switchboard_scheduler_rollout_weight",
    "The share of an expert's requests placed first on the new revision of its rollout.",
    ["expert", "revision"],
)
ROLLOUT_STEP = Gauge(
    "switchboard_scheduler_rollout_step",
    "The current step (0-based) of an expert's rollout.",
    ["expert"],
)
ROLLOUT_STEP_SECONDS = Gauge(
    "switchboard_scheduler_rollout_step_seconds",
    "Seconds an expert's running or paused rollout has been in its current step (0 once ended): a stuck rollout keeps growing.",
    ["expert"],
)
ROLLOUT_TRANSITIONS = Counter(
    "switchboard_scheduler_rollout_transitions_total",
    "Rollout transitions by expert and kind: started, deployed (the new replicas are ready), probed (the quality probe passed), step, paused, resumed, promoted, rolled_back, aborted.",
    ["expert", "transition"],
)
REVISION_PLACEMENTS = Counter(
    "switchboard_scheduler_revision_placements_total",
    "Reserved placements (primaries) by expert and the revision of the replica.",
    ["expert", "revision"],
)
REVISION_REQUESTS = Counter(
    "switchboard_scheduler_revision_requests_total",
    "Requests replicas ended, by expert, revision and whether they failed (from the replicas' heartbeats).",
    ["expert", "revision", "failed"],
)


def update_rollout_gauges(expert: str, state: str, to_revision: str, weight: float, step: int, step_seconds: float) -> None:
    """Set one expert's rollout gauges."""
    for name in ("running", "paused", "promoted", "rolled_back", "aborted"):
        ROLLOUT_STATE.labels(expert=expert, state=name).set(1 if name == state else 0)
    ROLLOUT_WEIGHT.labels(expert=expert, revision=to_revision).set(weight)
    ROLLOUT_STEP.labels(expert=expert).set(step)
    ROLLOUT_STEP_SECONDS.labels(expert=expert).set(step_seconds)
