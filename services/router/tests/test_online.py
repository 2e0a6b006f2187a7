"""Tests of the online head: learns a bounded correction from outcomes; snapshots per gate version."""

from __future__ import annotations

import json
import random

import pytest
from switchboard.router.decision_log import Decision, Outcome, TrainingRecord
from switchboard.router.online import OnlineConfig, OnlineHead
from switchboard.router.selector import Selector, SelectorConfig

SELECTOR = Selector(("a", "b"), {"a": 1.0, "b": 1.0}, SelectorConfig())


def record(expert: str, hidden: tuple[float, ...], penalty: float, probability: float = 0.5) -> TrainingRecord:
    selection = SELECTOR.select({"a": -5.0, "b": -5.0}, 0.1, cost_weight=0.0)
    d = Decision("r", "", "learned", "v1", selection, 0.1, 10, 8, (), hidden, expert, 0.0)
    outcome = Outcome(expert, "x", penalty == 0, "FINISH_REASON_LENGTH", 10, 8, 0.1, 0.2)
    return TrainingRecord(d, outcome, quality=-5.0, cost=1.0, penalty=penalty, reward=-5.0 - penalty, propensity=probability)


def test_learns_that_an_expert_fails_for_one_kind_of_prompt_only() -> None:
    head = OnlineHead(("a", "b"), 2, "v1")
    rng = random.Random(0)
    kind_x, kind_y = (1.0, 0.0), (0.0, 1.0)
    for _ in range(600):
        kind = rng.choice([kind_x, kind_y])
        head.update(record("a", kind, penalty=1.0 if kind is kind_x else 0.0))
    assert head.correction(kind_x)["a"] < -0.5
    assert abs(head.correction(kind_y)["a"]) < 0.2
    assert head.correction(kind_x)["b"] == 0.0  # only the served arm moves
    assert head.updates == 600


def test_steps_and_corrections_are_bounded() -> None:
    head = OnlineHead(("a", "b"), 1, "v1", OnlineConfig(learning_rate=100.0, max_step=0.01, max_correction=0.3))
    head.update(record("a", (1.0,), penalty=50.0, probability=1e-9))
    assert head.correction((1.0,))["a"] == pytest.approx(-0.02)  # one clipped step on the weight and the offset
    for _ in range(1000):
        head.update(record("a", (1.0,), penalty=50.0))
    assert head.correction((1.0,))["a"] == -0.3
    assert head.correction((1.0, 2.0)) == {"a": 0.0, "b": 0.0}  # wrong hidden size: no correction


def test_snapshot_round_trip_and_refusals(tmp_path) -> None:
    path = tmp_path / "online.json"
    head = OnlineHead(("a", "b"), 2, "v1")
    head.update(record("a", (1.0, 0.0), penalty=1.0))
    head.save(path)
    again = OnlineHead(("a", "b"), 2, "v1")
    assert again.load(path) is None
    assert again.correction((1.0, 0.0)) == head.correction((1.0, 0.0)) and again.updates == 1
    assert "gate" in (OnlineHead(("a", "b"), 2, "v2").load(path) or "")
    assert OnlineHead(("a", "b"), 2, "v1").load(tmp_path / "missing.json") == "no snapshot yet"
    path.write_text("{broken")
    assert "unreadable" in (OnlineHead(("a", "b"), 2, "v1").load(path) or "")
    path.write_text(json.dumps({"format": "switchboard-router-online/1", "gate_version": "v1", "experts": ["a", "b"], "weights": {"a": [1]}, "offsets": {}}))
    assert OnlineHead(("a", "b"), 2, "v1").load(path) == "malformed snapshot"
