"""The decision log: what the router decided for each request, joined with its outcome.

`Route` records a `Decision` (the gate's features and hidden layer, every expert's numbers, k,
lambda, biases, the gate version); `Feedback` joins the outcome to it and gets back a
`TrainingRecord` with the reward, for the online head and, as JSON lines, for offline retraining.
The log is bounded in entries and age, so a gateway that never sends feedback cannot grow it.

Records never hold the prompt or its token ids (those are the prompt); only the dense signals and
the gate's hidden layer, which are enough to train a head on top of the gate.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from switchboard.common.outcomes import never_served
from switchboard.router.selector import Selection


@dataclass(frozen=True)
class Decision:
    """One routing decision."""

    request_id: str
    tenant: str
    gate_kind: str
    gate_version: str
    selection: Selection
    temperature: float
    prompt_tokens: int
    max_tokens: int
    dense: tuple[float, ...]
    hidden: tuple[float, ...]
    primary: str  # the expert of the primary candidate actually returned
    decided_at: float


@dataclass(frozen=True)
class Outcome:
    """What happened to a routed request (from Feedback)."""

    expert: str
    replica_id: str
    success: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_seconds: float
    latency_seconds: float

    @property
    def not_served(self) -> bool:
        """Never served (`switchboard.common.outcomes.never_served`): nothing to learn from it."""
        return never_served(
            self.finish_reason == "FINISH_REASON_CANCELLED", self.completion_tokens, self.time_to_first_token_seconds
        )


@dataclass(frozen=True)
class TrainingRecord:
    """A decision, its outcome and the reward it earned."""

    decision: Decision
    outcome: Outcome
    quality: float  # the gate's predicted quality of the expert that served
    cost: float  # relative cost of that expert
    penalty: float  # failure and SLO penalty
    reward: float  # quality - cost_weight * cost - penalty
    propensity: float  # probability the policy gave the served expert

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines form (no prompt text, no token ids)."""
        d = self.decision
        return {
            "request_id": d.request_id,
            "tenant": d.tenant,
            "gate_kind": d.gate_kind,
            "gate_version": d.gate_version,
            "experts": [asdict(c) for c in d.selection.choices],
            "k": d.selection.k,
            "cost_weight": d.selection.cost_weight,
            "explored": d.selection.explored,
            "prompt_tokens": d.prompt_tokens,
            "max_tokens": d.max_tokens,
            "dense": list(d.dense),
            "hidden": list(d.hidden),
            "outcome": asdict(self.outcome),
            "quality": self.quality,
            "cost": self.cost,
            "penalty": self.penalty,
            "reward": self.reward,
            "propensity": self.propensity,
        }


class DecisionLog:
    """request id -> Decision, bounded by count and age; `join` pops the entry."""

    def __init__(
        self, max_entries: int = 50_000, ttl_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, Decision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, decision: Decision) -> None:
        """Remember a decision (a request id routed again replaces its earlier decision)."""
        self._entries.pop(decision.request_id, None)
        self._entries[decision.request_id] = decision
        self._evict()

    def get(self, request_id: str) -> Decision | None:
        """The decision of a request, if still held."""
        self._evict()
        return self._entries.get(request_id)

    def pop(self, request_id: str) -> Decision | None:
        """Take a decision out (Feedback does, once per request)."""
        self._evict()
        return self._entries.pop(request_id, None)

    def _evict(self) -> None:
        horizon = self._clock() - self.ttl_seconds
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if len(self._entries) > self.max_entries or oldest.decided_at < horizon:
                self._entries.popitem(last=False)
            else:
                break


class OutcomeSink:
    """Appends training records as JSON lines to a file (for offline retraining)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: TrainingRecord) -> None:
        """Append one record (one line, flushed, so a crash loses at most that line)."""
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
