"""Fitted step-cost model of one replica: load the profile JSON, predict a step's time.

The generator's profiler (`python -m switchboard.generator.engine.profile`) times
real engine steps and fits one linear model, written as the `fit` section of its
JSON (every sample is kept under `samples`):

    step_ms = base_ms + prefill_token_ms * prefill_tokens
                      + decode_seq_ms * decode_seqs + context_token_ms * decode_context_tokens

A step's composition comes from its `SchedulerOutput`: every single-token entry is
a decode (batched together by the runner's attention) whose context is the tokens
already in its cache; every longer entry adds its tokens to the prefill count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchboard.replica.outputs import SchedulerOutput

FORMULA = (
    "step_ms = base_ms + prefill_token_ms*prefill_tokens + decode_seq_ms*decode_seqs"
    " + context_token_ms*decode_context_tokens"
)


@dataclass(frozen=True)
class StepComposition:
    """What a step's time depends on."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0

    @classmethod
    def of(cls, output: SchedulerOutput) -> StepComposition:
        """The composition of a scheduled step."""
        prefill = decodes = context = 0
        for s in output.scheduled:
            if s.num_new_tokens == 1:
                decodes += 1
                context += s.num_computed_tokens
            else:
                prefill += s.num_new_tokens
        return cls(prefill, decodes, context)


@dataclass(frozen=True)
class CostModel:
    """Linear step-time model of one replica (milliseconds)."""

    base_ms: float
    prefill_token_ms: float
    decode_seq_ms: float
    context_token_ms: float

    def step_ms(self, prefill_tokens: int = 0, decode_seqs: int = 0, decode_context_tokens: int = 0) -> float:
        """Predicted time of one step with this mix of prefill tokens and decoding sequences."""
        return (
            self.base_ms
            + self.prefill_token_ms * prefill_tokens
            + self.decode_seq_ms * decode_seqs
            + self.context_token_ms * decode_context_tokens
        )

    def predict(self, step: SchedulerOutput | StepComposition) -> float:
        """Predicted time (ms) of a scheduled step; an empty step costs nothing."""
        if isinstance(step, SchedulerOutput):
            if step.is_empty:
                return 0.0
            step = StepComposition.of(step)
        return self.step_ms(step.prefill_tokens, step.decode_seqs, step.decode_context_tokens)

    @classmethod
    def from_profile(cls, data: dict[str, Any]) -> CostModel:
        """The model in a profile JSON document (its `fit` section)."""
        try:
            fit = data["fit"]
            return cls(
                base_ms=float(fit["base_ms"]),
                prefill_token_ms=float(fit["prefill_token_ms"]),
                decode_seq_ms=float(fit["decode_seq_ms"]),
                context_token_ms=float(fit["context_token_ms"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a step-cost profile (needs fit.base_ms, ...): missing {exc}") from exc

    @classmethod
    def load(cls, path: Path | str) -> CostModel:
        """Read the `fit` section of a cost JSON written by the generator's profiler."""
        return cls.from_profile(json.loads(Path(path).read_text()))
