"""SLO verdicts of completed requests."""

from __future__ import annotations

import pytest
from switchboard.common.experts_config import ExpertSLO
from switchboard.scheduler.slo import judge, time_per_output_token

SLO = ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05)


def test_time_per_output_token_excludes_the_first_token() -> None:
    assert time_per_output_token(1.5, 0.5, 11) == pytest.approx(0.1)
    assert time_per_output_token(1.0, 0.5, 1) is None
    assert time_per_output_token(0.0, 0.0, 5) is None


@pytest.mark.parametrize(
    ("success", "ttft", "latency", "tokens", "ttft_met", "tpot_met", "good"),
    [
        (True, 0.2, 0.6, 9, True, True, True),
        (True, 0.7, 1.0, 9, False, True, False),
        (True, 0.2, 2.2, 11, True, False, False),
        (True, 0.2, 0.2, 1, True, True, True),  # one token: no TPOT to miss
        (False, 0.1, 0.2, 5, False, False, False),  # a failure misses everything
        (True, 0.0, 0.0, 0, False, True, False),  # no first token: the TTFT objective is missed
    ],
)
def test_verdicts(success: bool, ttft: float, latency: float, tokens: int, ttft_met: bool, tpot_met: bool, good: bool) -> None:
    verdict = judge(SLO, success, ttft, latency, tokens)
    assert (verdict.ttft_met, verdict.tpot_met, verdict.good) == (ttft_met, tpot_met, good)


def test_no_objectives_means_success_is_good() -> None:
    assert judge(None, True, 9.0, 90.0, 100).good
    assert not judge(None, False, 0.1, 0.1, 2).good
    partial = judge(ExpertSLO(ttft_seconds=1.0), True, 0.5, 100.0, 3)
    assert partial.tpot_met is None and partial.good
