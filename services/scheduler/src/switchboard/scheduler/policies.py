"""Placement policies: rank one expert's candidate replicas for a request, best first.

A policy is a function of the request (`PlacementQuery`), the candidates (frozen `ReplicaView`s of
one `ClusterSnapshot`: the healthy, untried, long-enough replicas of one expert) and the policy's own
small state (a round-robin cursor, a seeded RNG). It returns every candidate exactly once, best
first: the first becomes the expert's choice and the next ones its alternates. It never reads the
registry, so it cannot see half-updated state, and a learned policy later gets the same input.

`SCHEDULER_PLACEMENT_POLICY` picks one of `POLICY_NAMES` through `make_policy`. Prefix-cache-aware
and predicted-latency policies come next; they need KV-cache events and the request's token ids from
upstream, which this interface will carry in `PlacementQuery` once the router sends them.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from switchboard.replica.hashing import prompt_block_hashes
from switchboard.scheduler.registry import ReplicaView

LEAST_LOADED = "least-loaded"
LEAST_OUTSTANDING = "least-outstanding"
ROUND_ROBIN = "round-robin"
POWER_OF_TWO = "power-of-two"
# The values of SCHEDULER_PLACEMENT_POLICY; the first is the default.
POLICY_NAMES = (LEAST_LOADED, LEAST_OUTSTANDING, ROUND_ROBIN, POWER_OF_TWO)


@dataclass(frozen=True)
class PlacementQuery:
    """What a policy knows about the request being placed.

    `prompt_token_ids` (empty when the prompt was not tokenized upstream) come from the tokenizer
    named by `tokenizer_fingerprint`; `block_hashes` hashes them the way a replica's prefix cache
    does, once per (block size, seed) however many candidates share it.
    """

    request_id: str
    expert: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    prompt_token_ids: tuple[int, ...] = ()
    tokenizer_fingerprint: str = ""
    _hashes: dict[tuple[int, int], list[int]] = field(default_factory=dict, compare=False, repr=False)

    def block_hashes(self, block_size: int, seed: int) -> list[int]:
        """The hash chain of the prompt's full blocks for a replica with this block size and seed."""
        key = (block_size, seed)
        hashes = self._hashes.get(key)
        if hashes is None:
            hashes = prompt_block_hashes(self.prompt_token_ids, block_size, seed) if block_size > 0 else []
            self._hashes[key] = hashes
        return hashes


class PlacementPolicy(Protocol):
    """Ranks candidate replicas for one request, best first.

    A policy whose state should move only when a request is really placed (round-robin's cursor)
    may also define `placed(query, replica)`: `Placer.place` calls it with the chosen primary.
    """

    name: str

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Return the candidates ordered best first (the same views, each once, none added)."""
        ...


def _by_id(view: ReplicaView) -> str:
    return view.replica_id


@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Least-loaded first: the walking-skeleton policy of issue 2, and the default.

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
    name: str = LEAST_LOADED

    def score(self, replica: ReplicaView) -> float:
        """The load score of one replica (lower is better)."""
        load = replica.load
        return (
            self.inflight_weight * replica.inflight
            + self.running_weight * load.running
            + self.waiting_weight * load.waiting
        )

    def key(self, replica: ReplicaView) -> tuple[float, float, str]:
        """The sort key: score, then KV utilization, then replica id."""
        return (self.score(replica), replica.load.kv_utilization, replica.replica_id)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Order candidates by load score, then KV utilization, then replica id."""
        return sorted(candidates, key=self.key)


@dataclass(frozen=True)
class LeastOutstandingPolicy:
    """Fewest in-flight placements first (what this scheduler itself counts, never a stale heartbeat).

    Ties go to the lower KV-cache utilization, then to the replica id.
    """

    name: str = LEAST_OUTSTANDING

    @staticmethod
    def key(replica: ReplicaView) -> tuple[int, float, str]:
        """The sort key: in-flight count, then KV utilization, then replica id."""
        return (replica.inflight, replica.load.kv_utilization, replica.replica_id)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Order candidates by in-flight count, then KV utilization, then replica id."""
        return sorted(candidates, key=self.key)


class RoundRobinPolicy:
    """Each expert's replicas in turn, by id: the one after the last placed, wrapping around.

    The cursor per expert is the id of the replica last placed on (moved by `placed`, so `plan` and
    the fallback experts of a request do not move it). Starting after that id, not at an index,
    skips draining and excluded replicas and stays fair when replicas come and go. The alternates
    follow in the same cyclic order.
    """

    name = ROUND_ROBIN

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """The candidates by id, rotated to start after the expert's last placed replica."""
        ordered = sorted(candidates, key=_by_id)
        last = self._last.get(query.expert)
        if last is None:
            return ordered
        start = bisect.bisect_right([v.replica_id for v in ordered], last)
        return ordered[start:] + ordered[:start]

    def placed(self, query: PlacementQuery, replica: ReplicaView) -> None:
        """Move the expert's cursor to the replica just placed on."""
        self._last[query.expert] = replica.replica_id


class PowerOfTwoPolicy:
    """Power of two choices: two candidates drawn at random, the less loaded of them first.

    "Less loaded" is `LeastLoadedPolicy.key` (score, KV utilization, id), so the choice is never
    the worse of the two draws; the other candidates follow, least loaded first, as alternates.
    The draws come from the policy's own RNG seeded with `seed` (SCHEDULER_PLACEMENT_SEED), over
    the candidates ordered by id, so the same seed and the same calls give the same placements.
    Two random draws avoid the herd that a strict least-loaded choice sends to one replica when
    the load numbers it ranks by are stale.
    """

    name = POWER_OF_TWO

    def __init__(self, seed: int = 0, scorer: LeastLoadedPolicy | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._key = (scorer or LeastLoadedPolicy()).key

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """The better of two random draws first, then every other candidate by load."""
        key = self._key
        n = len(candidates)
        if n < 2:
            return list(candidates)
        by_id = sorted(candidates, key=_by_id)
        first = self._rng.randrange(n)
        second = self._rng.randrange(n - 1)
        if second >= first:
            second += 1  # two distinct candidates
        winner = min(by_id[first], by_id[second], key=key)
        rest = sorted((v for v in by_id if v is not winner), key=key)
        return [winner, *rest]


def make_policy(name: str, seed: int = 0) -> PlacementPolicy:
    """The policy named `name` (one of POLICY_NAMES); `seed` seeds the random ones."""
    if name == LEAST_LOADED:
        return LeastLoadedPolicy()
    if name == LEAST_OUTSTANDING:
        return LeastOutstandingPolicy()
    if name == ROUND_ROBIN:
        return RoundRobinPolicy()
    if name == POWER_OF_TWO:
        return PowerOfTwoPolicy(seed)
    raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
