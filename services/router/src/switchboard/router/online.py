"""Online learning: a small contextual-bandit head on top of the gate, trained from Feedback.

The offline gate predicts each expert's quality. What it cannot know is what happens to a request
in this cluster: failures, timeouts and SLO misses of an expert for a kind of prompt. The head adds
a learned correction per expert,

    correction(e) = w_e . h + c_e          (h: the gate's last hidden layer, kept in the decision)

trained by normalized least mean squares towards the reward the served expert actually earned
minus what the gate predicted for it: reward - (quality - lambda * cost) = -penalty. Only the
served expert's row moves (the bandit sees one arm per request), weighted by the inverse of the
probability the policy gave that arm (capped), so exploration does not bias it.

Bounds: each update's step is clipped (`max_step`), every correction stays within
[-max_correction, max_correction], and exploration (selector.py) is capped by a setting. The head
is tied to the gate version it was trained on: a snapshot of another version is ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchboard.router.decision_log import TrainingRecord

SNAPSHOT_FORMAT = "switchboard-router-online/1"


@dataclass(frozen=True)
class OnlineConfig:
    """Step sizes and bounds of the online head."""

    learning_rate: float = 0.05
    max_step: float = 0.05
    max_correction: float = 1.0
    max_importance: float = 10.0


class OnlineHead:
    """Per-expert linear correction over the gate's hidden layer."""

    def __init__(self, experts: Sequence[str], hidden_dim: int, gate_version: str, config: OnlineConfig = OnlineConfig()) -> None:
        self.experts = tuple(experts)
        self.hidden_dim = hidden_dim
        self.gate_version = gate_version
        self.config = config
        self.weights = {name: [0.0] * hidden_dim for name in self.experts}
        self.offsets = dict.fromkeys(self.experts, 0.0)
        self.updates = 0

    def correction(self, hidden: Sequence[float]) -> dict[str, float]:
        """The correction of every expert for one request (zeros when the gate has no hidden layer)."""
        if len(hidden) != self.hidden_dim:
            return dict.fromkeys(self.experts, 0.0)
        limit = self.config.max_correction
        out = {}
        for name in self.experts:
            value = self.offsets[name] + sum(w * h for w, h in zip(self.weights[name], hidden, strict=True))
            out[name] = max(-limit, min(limit, value))
        return out

    def update(self, record: TrainingRecord) -> float:
        """One bandit step from a joined record; returns the error before the step."""
        expert = record.outcome.expert
        hidden = record.decision.hidden
        if expert not in self.weights or len(hidden) != self.hidden_dim:
            return 0.0
        cfg = self.config
        predicted = record.quality - record.decision.selection.cost_weight * record.cost
        target = record.reward - predicted  # the part of the reward the gate did not foresee
        error = target - self.correction(hidden)[expert]
        importance = min(cfg.max_importance, 1.0 / max(record.propensity, 1e-6))
        scale = cfg.learning_rate * importance * error / (1.0 + sum(h * h for h in hidden))
        step = max(-cfg.max_step, min(cfg.max_step, scale))
        row = self.weights[expert]
        for i, h in enumerate(hidden):
            row[i] += step * h
        self.offsets[expert] = max(-cfg.max_correction, min(cfg.max_correction, self.offsets[expert] + step))
        self.updates += 1
        return error

    def to_json(self) -> dict[str, Any]:
        """The snapshot's content."""
        return {
            "format": SNAPSHOT_FORMAT,
            "gate_version": self.gate_version,
            "updates": self.updates,
            "experts": list(self.experts),
            "weights": self.weights,
            "offsets": self.offsets,
        }

    def save(self, path: Path) -> None:
        """Write a snapshot atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(self.to_json(), out)
        os.replace(tmp, path)

    def load(self, path: Path) -> str | None:
        """Load a snapshot; returns why it was not used (None when it was)."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return "no snapshot yet"
        except (OSError, ValueError) as exc:
            return f"unreadable snapshot ({exc})"
        if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
            return "not an online-head snapshot"
        if data.get("gate_version") != self.gate_version or data.get("experts") != list(self.experts):
            return f"snapshot is for gate {data.get('gate_version')!r}, this gate is {self.gate_version!r}"
        weights, offsets = data.get("weights"), data.get("offsets")
        try:
            parsed = {name: [float(x) for x in weights[name]] for name in self.experts}
            parsed_offsets = {name: float(offsets[name]) for name in self.experts}
        except (KeyError, TypeError, ValueError):
            return "malformed snapshot"
        if any(len(row) != self.hidden_dim for row in parsed.values()):
            return "snapshot has another hidden size"
        self.weights, self.offsets = parsed, parsed_offsets
        self.updates = int(data.get("updates", 0))
        return None
