"""SLO attainment: whether a completed request met its expert's objectives.

The experts config gives each pool optional objectives (`slo.ttft_seconds`, `slo.tpot_seconds`).
A request meets them when it succeeded, its time to first token is within the TTFT objective and
its time per output token after the first, (latency - TTFT) / (output tokens - 1), within the TPOT
objective. A failed request misses every objective: shedding or dropping work never counts as
attainment. Goodput counts the requests that met all their expert's objectives.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.common.experts_config import ExpertSLO


@dataclass(frozen=True)
class Verdict:
    """One completed request against its expert's objectives (None: no objective on that measure)."""

    ttft_met: bool | None
    tpot_met: bool | None

    @property
    def good(self) -> bool:
        """Met every objective it has (a request with no objectives is good when it succeeded)."""
        return all(met is not False for met in (self.ttft_met, self.tpot_met))


def time_per_output_token(latency_seconds: float, ttft_seconds: float, completion_tokens: int) -> float | None:
    """Seconds per output token after the first; None with fewer than two tokens."""
    if completion_tokens < 2 or latency_seconds <= 0:
        return None
    return max(0.0, latency_seconds - ttft_seconds) / (completion_tokens - 1)


def judge(
    slo: ExpertSLO | None, success: bool, ttft_seconds: float, latency_seconds: float, completion_tokens: int
) -> Verdict:
    """The verdict of one completed request."""
    if slo is None:
        return Verdict(None if success else False, None if success else False)
    ttft_met = None
    if slo.ttft_seconds is not None:
        ttft_met = success and 0 < ttft_seconds <= slo.ttft_seconds
    tpot_met = None
    if slo.tpot_seconds is not None:
        tpot = time_per_output_token(latency_seconds, ttft_seconds, completion_tokens)
        tpot_met = success and (tpot is None or tpot <= slo.tpot_seconds)
    return Verdict(ttft_met, tpot_met)
