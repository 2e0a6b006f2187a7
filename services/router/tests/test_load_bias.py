"""Tests of the load bias: towards a target set by pressure, down while saturated, back when not."""

from __future__ import annotations

import pytest
from switchboard.router.load_bias import LoadBias, LoadBiasConfig, PoolLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pools(waiting: int = 0, kv: float = 0.0, ready: int = 1, running: int = 0, cool_waiting: int = 0) -> dict[str, PoolLoad]:
    return {
        "hot": PoolLoad("hot", ready_replicas=ready, waiting=waiting, running=running, kv_utilization=kv),
        "cool": PoolLoad("cool", ready_replicas=1, waiting=cool_waiting),
    }


CONFIG = LoadBiasConfig(step=0.5, max_penalty=2.0, full_penalty_pressure=16.0, waiting_per_replica=1.0)


def test_a_saturated_pool_is_pushed_down_then_recovers_at_the_same_rate() -> None:
    bias = LoadBias(("hot", "cool"), CONFIG)
    bias.update(pools(waiting=16))  # pressure 16: target -2, one step of 0.5
    assert bias.bias["hot"] == pytest.approx(-0.5) and bias.pressure["hot"] == pytest.approx(16.0)
    for _ in range(5):
        bias.update(pools(waiting=400))
    assert bias.bias["hot"] == -2.0  # never below -max_penalty
    assert bias.bias["cool"] == 0.0
    for expected in (-1.5, -1.0, -0.5, 0.0, 0.0):
        bias.update(pools(waiting=0))
        assert bias.bias["hot"] == pytest.approx(expected)  # never above zero


def test_the_less_saturated_of_two_hot_pools_keeps_the_smaller_penalty() -> None:
    bias = LoadBias(("hot", "cool"), CONFIG)
    for _ in range(10):
        bias.update(pools(waiting=50, cool_waiting=2))
    assert bias.bias["hot"] == -2.0
    assert bias.bias["cool"] == pytest.approx(-0.5)  # pressure 2: a quarter of the way (log 2 / log 16)
    assert bias.target(1.0) == 0.0 and bias.target(4.0) == pytest.approx(-1.0)


def test_waiting_counts_per_ready_replica_and_kv_use_counts_too() -> None:
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(waiting_per_replica=2.0, kv_utilization=0.9))
    assert bias.pool_pressure(pools(waiting=4, ready=4)["hot"]) == pytest.approx(0.5)
    assert bias.pool_pressure(pools(kv=0.99)["hot"]) == pytest.approx(1.1)


def test_recent_ttft_counts_while_the_pool_is_busy_and_expires() -> None:
    clock = Clock()
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(ttft_window_seconds=5.0), ttft_slo_seconds={"hot": 0.5}, clock=clock)
    for _ in range(5):
        bias.observe_ttft("hot", 1.5)
    assert bias.recent_ttft("hot") == 1.5
    bias.update(pools(running=2))
    assert bias.pressure["hot"] == pytest.approx(3.0) and bias.bias["hot"] < 0
    # The same TTFTs say nothing once the pool has emptied: they measured a queue that is gone.
    assert bias.pool_pressure(pools()["hot"]) == 0.0
    clock.now += 6.0
    assert bias.recent_ttft("hot") == 0.0
    bias.observe_ttft("unknown-expert", 1.0)  # ignored, no error


def test_an_expert_without_ready_replicas_keeps_its_bias() -> None:
    bias = LoadBias(("hot", "cool"), CONFIG)
    bias.update(pools(waiting=10))
    before = bias.bias["hot"]
    bias.update(pools(ready=0))
    assert bias.bias["hot"] == before
