"""Tests of the load bias: down while a pool is saturated, back up when it recovers."""

from __future__ import annotations

import pytest
from switchboard.router.load_bias import LoadBias, LoadBiasConfig, PoolLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pools(waiting: int = 0, kv: float = 0.0, ready: int = 1) -> dict[str, PoolLoad]:
    return {
        "hot": PoolLoad("hot", ready_replicas=ready, waiting=waiting, kv_utilization=kv),
        "cool": PoolLoad("cool", ready_replicas=1),
    }


def test_a_saturated_pool_is_pushed_down_then_recovers() -> None:
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(step=0.1, max_penalty=1.0, waiting_per_replica=2.0))
    for _ in range(3):
        bias.update(pools(waiting=4))  # pressure 2: two steps a look
    assert bias.bias["hot"] == pytest.approx(-0.6)
    assert bias.bias["cool"] == 0.0
    assert bias.pressure["hot"] == pytest.approx(2.0)
    for _ in range(20):
        bias.update(pools(waiting=40))
    assert bias.bias["hot"] == -1.0  # never below -max_penalty
    for _ in range(9):
        bias.update(pools(waiting=0))
    assert bias.bias["hot"] == pytest.approx(-0.1)
    bias.update(pools(waiting=0))
    bias.update(pools(waiting=0))
    assert bias.bias["hot"] == 0.0  # never above zero


def test_waiting_counts_per_ready_replica_and_kv_use_counts_too() -> None:
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(waiting_per_replica=2.0, kv_utilization=0.9))
    assert bias.pool_pressure(pools(waiting=4, ready=4)["hot"]) == pytest.approx(0.5)
    assert bias.pool_pressure(pools(kv=0.99)["hot"]) == pytest.approx(1.1)


def test_recent_ttft_over_the_slo_is_saturation_and_expires() -> None:
    clock = Clock()
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(ttft_window_seconds=5.0), ttft_slo_seconds={"hot": 0.5}, clock=clock)
    for _ in range(5):
        bias.observe_ttft("hot", 1.5)
    assert bias.recent_ttft("hot") == 1.5
    bias.update(pools())
    assert bias.pressure["hot"] == pytest.approx(3.0) and bias.bias["hot"] < 0
    clock.now += 6.0
    assert bias.recent_ttft("hot") == 0.0
    bias.observe_ttft("unknown-expert", 1.0)  # ignored, no error


def test_an_expert_without_ready_replicas_keeps_its_bias() -> None:
    bias = LoadBias(("hot", "cool"), LoadBiasConfig(step=0.1))
    bias.update(pools(waiting=10))
    before = bias.bias["hot"]
    bias.update(pools(ready=0))
    assert bias.bias["hot"] == before
