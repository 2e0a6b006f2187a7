"""Paired comparisons of two policies' runs over the same requests."""

from __future__ import annotations

import pytest
from switchboard.simulation.evaluate import PolicyResult
from switchboard.simulation.metrics import summarize
from switchboard.simulation.paired import compare, render_paired
from switchboard.simulation.replica import SimRecord


def result(name: str, ttfts: list[float | None], met: list[bool]) -> PolicyResult:
    records = []
    for i, ttft in enumerate(ttfts):
        rec = SimRecord(i, str(i), "a", float(i), 100, 10)
        if ttft is None:
            rec.outcome = "rejected"
        else:
            rec.outcome, rec.first_token_at, rec.finished_at = "ok", i + ttft, i + ttft + 1.0
        records.append(rec)
    from switchboard.simulation.cluster import SimResult

    summary = summarize(SimResult(records, {}, {}, float(len(records)), {}))
    return PolicyResult(name, summary, records, 0.0, met)


def test_a_policy_twice_as_fast_on_every_request_is_2x_with_a_tight_interval() -> None:
    base = [0.1 + 0.01 * (i % 17) for i in range(500)]
    fast = result("fast", [t / 2 for t in base], [True] * 500)
    slow = result("slow", base, [i % 10 != 0 for i in range(500)])
    c = compare(fast, slow)
    assert c.ttft_mean_ratio == pytest.approx((2.0, 2.0, 2.0))
    assert c.ttft_p99_ratio[0] == pytest.approx(2.0)
    estimate, lo, hi = c.attainment_points
    assert estimate == pytest.approx(10.0) and lo < estimate < hi and lo > 0
    assert "fast vs slow (500 paired requests): TTFT mean 2.000x" in render_paired([c])


def test_failed_requests_count_against_attainment_but_not_in_the_ttft() -> None:
    a = result("a", [0.2, None, 0.2, 0.2], [True, False, True, True])
    b = result("b", [0.1, 0.1, 0.1, 0.1], [True, True, True, True])
    c = compare(a, b, resamples=200)
    assert c.ttft_mean_ratio[0] == pytest.approx(0.5)
    assert c.attainment_points[0] == pytest.approx(-25.0)


def test_runs_of_other_requests_cannot_be_paired() -> None:
    with pytest.raises(ValueError, match="same requests"):
        compare(result("a", [0.1, 0.2], [True, True]), result("b", [0.1], [True]))
    with pytest.raises(ValueError, match="completed no request"):
        compare(result("a", [None, None], [False, False]), result("b", [0.1, 0.1], [True, True]))
