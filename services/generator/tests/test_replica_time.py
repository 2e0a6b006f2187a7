"""The replica-time meter: each request's share of its replica's busy time."""

from __future__ import annotations

import pytest
from switchboard.generator.replica_time import ReplicaTimeMeter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_shares_add_up_to_the_busy_time() -> None:
    clock = Clock()
    meter = ReplicaTimeMeter(clock)
    a, b, c = object(), object(), object()
    meter.start(a)  # t=0: a alone
    clock.now = 2.0
    meter.start(b)  # t=2: a and b share
    clock.now = 6.0
    charged_a = meter.finish(a)  # a: 2 + 4/2
    clock.now = 10.0  # idle from 7 to 10 is nobody's
    charged_b = meter.finish(b)  # b: 4/2 + 4 alone
    clock.now = 20.0
    meter.start(c)
    clock.now = 21.0
    charged_c = meter.finish(c)
    assert (charged_a, charged_b, charged_c) == (pytest.approx(4.0), pytest.approx(6.0), pytest.approx(1.0))
    # The charges add up to the time the replica had work: 0-10 and 20-21.
    assert charged_a + charged_b + charged_c == pytest.approx(11.0)
    assert meter.in_flight == 0


def test_an_unknown_or_finished_key_costs_nothing() -> None:
    clock = Clock()
    meter = ReplicaTimeMeter(clock)
    key = object()
    meter.start(key)
    clock.now = 1.0
    assert meter.finish(key) == pytest.approx(1.0)
    assert meter.finish(key) == 0.0 and meter.finish(object()) == 0.0
