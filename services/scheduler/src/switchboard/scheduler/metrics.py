"""The scheduler's domain metrics (Prometheus); per-RPC counters and latency come from the shared server."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge
from switchboard.scheduler.registry import ReplicaRecord, ReplicaState

REPLICAS = Gauge(
    "switchboard_scheduler_replicas",
    "Known generator replicas by expert and state.",
    ["expert", "state"],
)
PLACEMENTS = Counter(
    "switchboard_scheduler_placements_total",
    "Place calls by expert and outcome (placed, no_replica, unknown_expert).",
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
