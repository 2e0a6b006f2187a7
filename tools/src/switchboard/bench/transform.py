"""Shape a workload for a replay: window, time scaling, request cap, token-length scaling.

Every step is recorded in a `WorkloadShape` that goes into the results file, so a number
can always be traced back to exactly which requests were sent and how they were scaled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from switchboard.bench.workload import TraceRequest


@dataclass(frozen=True)
class WorkloadShape:
    """How a trace was cut and scaled before replay (all recorded in the results)."""

    window_start_s: float = 0.0
    window_duration_s: float | None = None  # None = to the end of the trace
    speedup: float = 1.0  # arrival times are divided by this
    max_requests: int | None = None
    length_scale: float = 1.0  # multiplies input and output lengths before clamping
    fit_context: int | None = None  # if set, length_scale is chosen to fit this context
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class ShapeReport:
    """What shaping did: the factor actually used and how many lengths were clamped."""

    length_scale_used: float
    requests_in_trace: int
    requests_in_window: int
    requests_selected: int
    inputs_clamped: int
    outputs_clamped: int

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def select_window(requests: list[TraceRequest], start_s: float, duration_s: float | None) -> list[TraceRequest]:
    """Keep requests arriving in [start_s, start_s + duration_s), re-timed to start at 0."""
    end = math.inf if duration_s is None else start_s + duration_s
    chosen = [r for r in requests if start_s <= r.arrival_s < end]
    return [replace(r, arrival_s=r.arrival_s - start_s) for r in chosen]


def scale_time(requests: list[TraceRequest], speedup: float) -> list[TraceRequest]:
    """Divide arrival times by `speedup` (2.0 replays twice as fast)."""
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    return [replace(r, arrival_s=r.arrival_s / speedup) for r in requests]


def _quantile(values: list[int], q: float) -> float:
    """Linear-interpolation quantile of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def fit_factor(requests: list[TraceRequest], context: int, quantile: float = 0.99) -> float:
    """The length factor (<= 1) that makes the `quantile` of input+output fit in `context`."""
    if not requests:
        return 1.0
    total = _quantile([r.input_tokens + r.output_tokens for r in requests], quantile)
    return min(1.0, context / total) if total > 0 else 1.0


def scale_lengths(
    requests: list[TraceRequest],
    factor: float,
    context: int | None,
    max_input: int | None,
    max_output: int | None,
) -> tuple[list[TraceRequest], int, int]:
    """Scale lengths by `factor` (rounded, >= 1), then clamp to the limits.

    Output is clamped first (to max_output), then input to min(max_input, context - output),
    so every request fits the context. Returns (requests, inputs clamped, outputs clamped).
    """
    out: list[TraceRequest] = []
    clamped_in = clamped_out = 0
    for r in requests:
        inp = max(1, round(r.input_tokens * factor))
        outp = max(1, round(r.output_tokens * factor))
        if max_output is not None and outp > max_output:
            outp, clamped_out = max_output, clamped_out + 1
        if context is not None and outp > context - 1:
            outp, clamped_out = context - 1, clamped_out + 1
        limits = [x for x in (max_input, None if context is None else context - outp) if x is not None]
        if limits and inp > min(limits):
            inp, clamped_in = min(limits), clamped_in + 1
        # hash_ids stay as they are: prompt synthesis uses only the blocks the prompt covers.
        out.append(replace(r, input_tokens=inp, output_tokens=outp))
    return out, clamped_in, clamped_out


def shape(requests: list[TraceRequest], spec: WorkloadShape) -> tuple[list[TraceRequest], ShapeReport]:
    """Apply window, time scaling, cap and length scaling, in that order."""
    total = len(requests)
    windowed = select_window(requests, spec.window_start_s, spec.window_duration_s)
    in_window = len(windowed)
    timed = scale_time(windowed, spec.speedup)
    if spec.max_requests is not None:
        timed = timed[: spec.max_requests]
    factor = spec.length_scale
    if spec.fit_context is not None:
        if spec.fit_context < 2:
            raise ValueError("fit_context must be >= 2 tokens")
        factor = min(factor, fit_factor(timed, spec.fit_context))
    scaled, clamped_in, clamped_out = scale_lengths(
        timed, factor, spec.fit_context, spec.max_input_tokens, spec.max_output_tokens
    )
    renumbered = [replace(r, index=i) for i, r in enumerate(scaled)]
    return renumbered, ShapeReport(factor, total, in_window, len(renumbered), clamped_in, clamped_out)
