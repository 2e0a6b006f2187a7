"""Statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
from switchboard.bench.records import RequestRecord
from switchboard.bench.stats import SLO, distribution, percentile, summarize


def record(index: int, sent: float, chunks: list[tuple[float, int]], status: str = "ok",
           output_tokens: int | None = None) -> RequestRecord:
    rec = RequestRecord(index, sent, 10, 4, sent_s=sent, status=status, chunks=chunks)
    rec.first_token_s = sent + chunks[0][0] if chunks else None
    rec.end_s = sent + (chunks[-1][0] if chunks else 1.0)
    rec.output_tokens = output_tokens if output_tokens is not None else sum(n for _, n in chunks)
    return rec


def test_percentile_linear_interpolation() -> None:
    data = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(data, 50) == 3.0
    assert percentile(data, 90) == pytest.approx(7.6)  # 4 + 0.6 * (10 - 4)
    assert percentile(data, 99) == pytest.approx(9.76)  # 4 + 0.96 * 6
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    dist = distribution([4.0, 1.0, 3.0, 2.0])
    assert dist == {"count": 4, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97),
                    "max": 4.0}


def test_record_derived_figures() -> None:
    rec = record(0, 1.0, [(0.5, 1), (0.7, 1), (1.3, 2)])
    assert rec.ttft == 0.5
    assert rec.e2e == pytest.approx(1.3)
    assert rec.tpot == pytest.approx((1.3 - 0.5) / 3)
    assert rec.inter_token_gaps() == pytest.approx([0.2, 0.3, 0.3])


def test_summary_counts_throughput_and_goodput() -> None:
    records = [
        record(0, 0.0, [(0.1, 1), (0.3, 1), (0.5, 1)]),  # ttft .1, tpot .2, e2e .5
        record(1, 1.0, [(0.4, 1), (0.5, 1)]),  # ttft .4, tpot .1, e2e .5 -> ends at 1.5
        record(2, 2.0, [(0.2, 1), (1.2, 1)]),  # ttft .2, tpot 1.0, ends at 3.2
        record(3, 2.5, [], status="UNAVAILABLE"),
        record(4, 2.5, [(0.1, 1)], status="timeout"),
        RequestRecord(5, 9.0, 10, 4, status="not_sent"),
    ]
    summary = summarize(records, SLO(ttft_s=0.3, tpot_s=0.5))
    assert summary["requests_total"] == 6
    assert summary["requests_sent"] == 5
    assert summary["requests_completed"] == 3
    assert summary["requests_timed_out"] == 1
    assert summary["requests_failed"] == 1
    assert summary["status_counts"] == {"UNAVAILABLE": 1, "not_sent": 1, "ok": 3, "timeout": 1}
    assert summary["duration_s"] == pytest.approx(3.5)  # first send 0.0, last end 3.5 (UNAVAILABLE at 2.5+1.0)
    assert summary["request_throughput_rps"] == pytest.approx(3 / 3.5)
    assert summary["output_token_throughput_tps"] == pytest.approx(7 / 3.5)
    # Only request 0 meets both objectives (1 fails TTFT, 2 fails TPOT); goodput is over sent requests.
    assert summary["goodput_fraction"] == pytest.approx(1 / 5)
    assert summary["goodput_rps"] == pytest.approx(1 / 3.5)
    assert summary["ttft_s"]["mean"] == pytest.approx((0.1 + 0.4 + 0.2) / 3)
    assert summary["ttft_s"]["p50"] == pytest.approx(0.2)
    assert summary["tpot_s"]["p90"] == pytest.approx(0.2 + 0.8 * 0.8)  # sorted .1 .2 1.0
    assert summary["e2e_s"]["max"] == pytest.approx(1.2)
    assert summary["itl_s"]["count"] == 2 + 1 + 1


def test_slo_unset_means_every_completed_request_counts() -> None:
    records = [record(0, 0.0, [(5.0, 1), (9.0, 1)]), record(1, 0.0, [], status="INTERNAL")]
    assert summarize(records, SLO())["goodput_fraction"] == 0.5
