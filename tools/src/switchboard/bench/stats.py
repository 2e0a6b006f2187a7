"""Aggregates over request records: percentiles, throughput, goodput, errors by status.

Percentiles use linear interpolation between order statistics (numpy's default and vLLM's
`bench serve`): p of sorted x[0..n-1] is x[k] + (x[k+1] - x[k]) * f with k + f = p/100 * (n-1).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from switchboard.bench.records import STATUS_OK, STATUS_TIMEOUT, RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = p / 100.0 * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: Iterable[float]) -> dict[str, float | int]:
    """count, mean, p50, p90, p99, max of the values (NaN where empty)."""
    data = [v for v in values if v is not None]
    out: dict[str, float | int] = {"count": len(data), "mean": sum(data) / len(data) if data else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(data, p)
    out["max"] = max(data) if data else math.nan
    return out


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput; None means no limit on that figure."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        """A request counts toward goodput if it completed and met every set objective."""
        if record.status != STATUS_OK:
            return False
        if self.ttft_s is not None and (record.ttft is None or record.ttft > self.ttft_s):
            return False
        # A single-token answer has no TPOT; it cannot violate the TPOT objective.
        return not (self.tpot_s is not None and record.tpot is not None and record.tpot > self.tpot_s)


def summarize(records: Sequence[RequestRecord], slo: SLO) -> dict:
    """The summary block of a results file."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.status == STATUS_OK]
    statuses = Counter(r.status for r in records)
    starts = [r.sent_s for r in sent if r.sent_s is not None]
    ends = [r.end_s for r in sent if r.end_s is not None]
    duration = (max(ends) - min(starts)) if starts and ends else 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if slo.met_by(r)]
    gaps = [g for r in ok for g in r.inter_token_gaps()]

    def rate(x: float) -> float:
        return x / duration if duration > 0 else math.nan

    return {
        "requests_total": len(records),
        "requests_sent": len(sent),
        "requests_completed": len(ok),
        "requests_timed_out": statuses.get(STATUS_TIMEOUT, 0),
        "requests_failed": len(sent) - len(ok) - statuses.get(STATUS_TIMEOUT, 0),
        "status_counts": dict(sorted(statuses.items())),
        "completed_by_model": dict(sorted(Counter(r.model for r in ok).items())),
        "duration_s": duration,
        "request_throughput_rps": rate(len(ok)),
        "output_token_throughput_tps": rate(output_tokens),
        "input_tokens_total": sum(r.input_tokens for r in ok),
        "output_tokens_total": output_tokens,
        "output_tokens_requested_total": sum(r.output_tokens_requested for r in ok),
        "goodput_fraction": len(good) / len(sent) if sent else math.nan,
        "goodput_rps": rate(len(good)),
        "slo": asdict(slo),
        "ttft_s": distribution(r.ttft for r in ok),
        "tpot_s": distribution(r.tpot for r in ok),
        "itl_s": distribution(gaps),
        "e2e_s": distribution(r.e2e for r in ok),
    }
