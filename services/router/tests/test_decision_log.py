"""Tests of the decision log: bounded by count and age, joined once."""

from __future__ import annotations

import json

from switchboard.router.decision_log import Decision, DecisionLog, Outcome, OutcomeSink, TrainingRecord
from switchboard.router.selector import Selector, SelectorConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def decision(request_id: str, at: float) -> Decision:
    selection = Selector(("a", "b"), {"a": 1.0, "b": 2.0}, SelectorConfig()).select({"a": -5.0, "b": -4.0}, 0.1, cost_weight=0.0)
    return Decision(request_id, "t", "learned", "v1", selection, 0.1, 10, 8, (1.0, 2.0), (0.5, -0.5), "b", at)


def test_entries_are_bounded_by_count_and_age() -> None:
    clock = Clock()
    log = DecisionLog(max_entries=3, ttl_seconds=10.0, clock=clock)
    for i in range(5):
        log.record(decision(f"r{i}", clock.now))
    assert len(log) == 3 and log.get("r0") is None and log.get("r4") is not None
    clock.now = 11.0
    assert log.get("r4") is None and len(log) == 0


def test_pop_joins_once() -> None:
    log = DecisionLog(clock=Clock())
    log.record(decision("r1", 0.0))
    assert log.pop("r1") is not None
    assert log.pop("r1") is None


def test_sink_writes_json_lines_without_the_prompt(tmp_path) -> None:
    outcome = Outcome("b", "replica-1", True, "FINISH_REASON_LENGTH", 10, 8, 0.1, 0.5)
    record = TrainingRecord(decision("r1", 0.0), outcome, quality=-4.0, cost=2.0, penalty=0.0, reward=-4.0, propensity=0.7)
    sink = OutcomeSink(tmp_path / "out" / "outcomes.jsonl")
    sink.write(record)
    sink.write(record)
    lines = (tmp_path / "out" / "outcomes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0])
    assert row["request_id"] == "r1" and row["outcome"]["expert"] == "b" and row["reward"] == -4.0
    assert "prompt" not in row and [e["expert"] for e in row["experts"]] == ["a", "b"]
