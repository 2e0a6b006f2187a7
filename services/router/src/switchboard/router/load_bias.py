"""Load-aware bias per expert: a hot pool sheds traffic to the next best expert without retraining.

This is the auxiliary-loss-free balancing of DeepSeek-V3 applied to request routing: each expert
has a bias added to its utility; after every look at the cluster it is nudged down while the
expert's pool is saturated and back up (towards zero) while it is not. The gate's learned scores
never change; only the operating point moves, and it moves back by itself when the pool recovers.

Saturation ("pressure", 1.0 = at the limit) is the largest of:

- waiting sequences per ready replica over `waiting_per_replica` (queue depth, from heartbeats);
- KV-cache use over `kv_utilization` (mean over ready replicas);
- the median time to first token of the last `ttft_window_seconds` (from Feedback) over the
  expert's TTFT SLO.

A step is `step * min(pressure, 4)` down when pressure > 1 (faster the deeper the overload),
`step` up otherwise; the bias stays within [-max_penalty, 0]. An expert with no ready replica is
ineligible rather than penalized (the selector never sends it anything), and keeps its bias.
"""

from __future__ import annotations

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

    step: float = 0.05
    max_penalty: float = 2.0
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
        ttft = self.recent_ttft(pool.expert) / self._slo[pool.expert]
        return max(queue, kv, ttft)

    def update(self, pools: Mapping[str, PoolLoad]) -> dict[str, float]:
        """One step of every bias from a fresh look at the pools; returns the new biases."""
        cfg = self.config
        for name in self.experts:
            pool = pools.get(name)
            if pool is None or pool.ready_replicas == 0:
                continue
            pressure = self.pool_pressure(pool)
            self._pressure[name] = pressure
            if pressure > 1.0:
                change = -cfg.step * min(pressure, 4.0)
            else:
                change = cfg.step
            self._bias[name] = min(0.0, max(-cfg.max_penalty, self._bias[name] + change))
        return self.bias
