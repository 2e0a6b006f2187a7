"""Placement policies: which replica of an expert takes a request.

A policy only ranks candidates: the servicer has already narrowed them to the healthy,
non-excluded replicas of the requested expert, and takes the first as the choice and the next
ones as alternates. Keeping the interface this small lets a learned policy (the reinforcement
learning policy of a later issue) replace the heuristic without touching the servicer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from switchboard.scheduler.registry import ReplicaRecord


@dataclass(frozen=True)
class PlacementQuery:
    """What a policy knows about the request being placed."""

    request_id: str
    expert: str
    prompt_tokens: int = 0
    max_tokens: int = 0


class PlacementPolicy(Protocol):
    """Ranks candidate replicas for one request, best first."""

    name: str

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaRecord]) -> list[ReplicaRecord]:
        """Return the candidates ordered best first (the same records, none added)."""
        ...


@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Least-loaded first: the walking-skeleton policy of issue 2.

    score = inflight_weight * inflight + running_weight * running + waiting_weight * waiting

    `inflight` (placed, not yet completed) reacts at once to every placement, while running and
    waiting come from the replica's last heartbeat; a request that has reached its replica is
    counted by both, equally on every replica, so the ranking stays fair. Waiting sequences weigh
    more than running ones because they have not even been admitted to the batch. Ties go to the
    replica with the lower KV-cache utilization (more room for long prompts), then to the replica
    id, so the order is deterministic.
    """

    inflight_weight: float = 1.0
    running_weight: float = 1.0
    waiting_weight: float = 2.0
    name: str = "least-loaded"

    def score(self, record: ReplicaRecord) -> float:
        """The load score of one replica (lower is better)."""
        load = record.load
        return (
            self.inflight_weight * record.inflight
            + self.running_weight * load.running
            + self.waiting_weight * load.waiting
        )

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaRecord]) -> list[ReplicaRecord]:
        """Order candidates by load score, then KV utilization, then replica id."""
        return sorted(candidates, key=lambda r: (self.score(r), r.load.kv_utilization, r.replica_id))
