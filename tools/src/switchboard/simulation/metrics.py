"""What a simulated run scores: SLO attainment, goodput, latencies, cache hits, imbalance, replica-seconds.

Every request counts. A request that was rejected (no replica could take it) or dropped (its
replica died while it streamed) misses its objectives, so a policy cannot buy attainment by
shedding work. A request meets its expert's objectives as the scheduler itself judges it
(`switchboard.scheduler.slo.judge`: TTFT within `ttft_seconds`, time per output token after the
first within `tpot_seconds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from switchboard.scheduler.slo import judge
from switchboard.simulation.cluster import SimResult
from switchboard.simulation.replica import SimRecord


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (linear interpolation) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class RunSummary:
    """The scores of one run (times in seconds)."""

    requests: int
    completed: int
    rejected: int
    dropped: int
    slo_attainment: float  # fraction of all requests that met every objective of their expert
    goodput_rps: float  # requests per second that met their objectives, over the arrival span
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    e2e_p90: float | None
    e2e_p99: float | None
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens, over completed requests
    imbalance: float  # max / mean tokens computed per replica of a pool, worst pool
    replica_seconds: float
    span_seconds: float

    def as_row(self) -> dict[str, float | int | None]:
        """The summary as a flat mapping (for tables and JSON)."""
        return dict(self.__dict__)


def good(result: SimResult, record: SimRecord) -> bool:
    """Whether one request met its expert's objectives (a failed request never does)."""
    if record.outcome != "ok" or record.ttft is None or record.e2e is None:
        return False
    verdict = judge(result.slos.get(record.expert), True, record.ttft, record.e2e, record.generated)
    return verdict.good


def summarize(result: SimResult) -> RunSummary:
    """Score one run."""
    records = result.records
    done = [r for r in records if r.outcome == "ok"]
    ttft = [r.ttft for r in done if r.ttft is not None]
    tpot = [t for t in (r.tpot for r in done) if t is not None]
    e2e = [r.e2e for r in done if r.e2e is not None]
    n_good = sum(1 for r in records if good(result, r))
    arrivals = [r.arrival for r in records]
    span = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_prompt_tokens for r in done)
    return RunSummary(
        requests=len(records),
        completed=len(done),
        rejected=sum(1 for r in records if r.outcome == "rejected"),
        dropped=sum(1 for r in records if r.outcome == "dropped"),
        slo_attainment=n_good / len(records) if records else 0.0,
        goodput_rps=n_good / span if span > 0 else float(n_good),
        ttft_p50=quantile(ttft, 0.5),
        ttft_p90=quantile(ttft, 0.9),
        ttft_p99=quantile(ttft, 0.99),
        tpot_p50=quantile(tpot, 0.5),
        tpot_p99=quantile(tpot, 0.99),
        e2e_p50=quantile(e2e, 0.5),
        e2e_p90=quantile(e2e, 0.9),
        e2e_p99=quantile(e2e, 0.99),
        prefix_hit_rate=cached / prompt if prompt else 0.0,
        imbalance=imbalance(result),
        replica_seconds=sum(stop - start for start, stop in result.lifetimes.values()),
        span_seconds=span,
    )


def imbalance(result: SimResult) -> float:
    """Max over mean of the tokens each replica computed, in the worst pool (1.0 = even)."""
    by_pool: dict[str, list[int]] = {}
    for replica in result.replicas.values():
        stats = replica.stats
        by_pool.setdefault(replica.expert, []).append(stats.prefill_tokens + stats.decode_tokens)
    worst = 1.0
    for loads in by_pool.values():
        mean = sum(loads) / len(loads)
        if mean > 0:
            worst = max(worst, max(loads) / mean)
    return worst
