"""Load-aware bias per expert: a hot pool sheds traffic to the next best expert without retraining.

As in the auxiliary-loss-free balancing of DeepSeek-V3, each expert has a bias added to its
utility and the gate's learned scores never change: only the operating point moves, and it moves
back by itself when the pool recovers.

Saturation ("pressure", 1.0 = at the limit) is the largest of:

- waiting sequences per ready replica over `waiting_per_replica` (queue depth, from heartbeats);
- KV-cache use over `kv_utilization` (mean over ready replicas);
- the median time to first token of the last `ttft_window_seconds` (from Feedback) over the
  expert's TTFT SLO, only while the pool has work running or waiting: the TTFTs of requests that
  queued behind a burst say nothing about a pool that has since emptied.

Every look at the cluster moves each bias towards a target set by its pressure, by at most `step`:

    target = 0                                                       if pressure <= 1
    target = -max_penalty * min(1, log(pressure) / log(full_penalty_pressure))   otherwise

so a pool twice over its limit is penalized a quarter as much as one 16 times over (at the
default), and the less saturated of two hot pools keeps the traffic. (A first version stepped
every saturated bias down to one floor: once the second-best pool was slightly over its limit too,
both sat at the floor and the far hotter pool won its traffic back; the load test on the local
stack showed its queue grow from 9 to 59.) Falling and rising move at the same rate, so a pool
that recovers gets its traffic back in about `max_penalty / step` looks. An expert with no ready
replica is unavailable rather than penalized (the selector puts it last), and keeps its bias.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolLoad:
    """One expert pool as the scheduler sees it (summed or averaged over its ready replicas)."""

    expert: str
    ready_replicas: int = 0
    running: int = 0
    waiting: int = 0
    inflight: int = 0
    kv_utilization: float = 0.0
    max_model_len: int = 0  # the longest sequence any ready replica accepts (0: unknown)


@dataclass(frozen=True)
class LoadBiasConfig:
    """How fast and how far the bias moves, and where saturation starts."""

    step: float = 0.2  # most change of one bias per look (nats)
    max_penalty: float = 2.0
    full_penalty_pressure: float = 16.0  # pressure at which the penalty reaches max_penalty
    waiting_per_replica: float = 2.0
    kv_utilization: float = 0.9
    ttft_window_seconds: float = 5.0


class LoadBias:
    """Keeps one bias per expert, updated from pool loads and observed TTFTs."""

    def __init__(
        self,
        experts: Sequence[str],
        config: LoadBiasConfig = LoadBiasConfig(),
        ttft_slo_seconds: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.experts = tuple(experts)
        self.config = config
        self._slo = {name: (ttft_slo_seconds or {}).get(name, 1.0) for name in self.experts}
        self._clock = clock
        self._bias = dict.fromkeys(self.experts, 0.0)
        self._pressure = dict.fromkeys(self.experts, 0.0)
        self._ttft: dict[str, deque[tuple[float, float]]] = {name: deque() for name in self.experts}

    @property
    def bias(self) -> dict[str, float]:
        """The current bias of every expert (<= 0)."""
        return dict(self._bias)

    @property
    def pressure(self) -> dict[str, float]:
        """The saturation of every expert at the last update (1.0 = at the limit)."""
        return dict(self._pressure)

    def observe_ttft(self, expert: str, seconds: float) -> None:
        """Record one time to first token reported for `expert`."""
        if expert in self._ttft and seconds > 0:
            self._ttft[expert].append((self._clock(), seconds))

    def recent_ttft(self, expert: str) -> float:
        """Median TTFT of the window (0 when the window holds none)."""
        window = self._ttft[expert]
        horizon = self._clock() - self.config.ttft_window_seconds
        while window and window[0][0] < horizon:
            window.popleft()
        return statistics.median(s for _, s in window) if window else 0.0

    def pool_pressure(self, pool: PoolLoad) -> float:
        """How saturated one pool is (0 = idle, 1 = at a limit)."""
        cfg = self.config
        queue = pool.waiting / max(1, pool.ready_replicas) / cfg.waiting_per_replica
        kv = pool.kv_utilization / cfg.kv_utilization
        busy = pool.waiting > 0 or pool.running > 0
        ttft = self.recent_ttft(pool.expert) / self._slo[pool.expert] if busy else 0.0
        return max(queue, kv, ttft)

    def target(self, pressure: float) -> float:
        """The bias a pool at this pressure settles at."""
        if pressure <= 1.0:
            return 0.0
        cfg = self.config
        return -cfg.max_penalty * min(1.0, math.log(pressure) / math.log(max(cfg.full_penalty_pressure, 1.0001)))

    def update(self, pools: Mapping[str, PoolLoad]) -> dict[str, float]:
        """One step of every bias from a fresh look at the pools; returns the new biases."""
        cfg = self.config
        for name in self.experts:
            pool = pools.get(name)
            if pool is None or pool.ready_replicas == 0:
                continue
            pressure = self.pool_pressure(pool)
            self._pressure[name] = pressure
            target, now = self.target(pressure), self._bias[name]
            self._bias[name] = max(target, now - cfg.step) if target < now else min(target, now + cfg.step)
        return self.bias
