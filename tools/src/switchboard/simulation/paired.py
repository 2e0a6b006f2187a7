"""Paired comparison of two placement policies on the same requests (`switchboard scheduler eval --baseline`).

Every policy of one evaluation replays the same requests (same seeds, same windows), so request i
of one policy is request i of the other and the comparison is paired: each bootstrap resample
draws requests (the same ones for both policies) and recomputes both policies' scores on them.
Reported with 95% intervals:

- `ttft_mean_ratio`: the baseline's mean TTFT over the policy's (above 1: the policy is faster),
  each over its completed requests of the resample;
- `ttft_p99_ratio`: the same for the 99th percentile (linear interpolation, as the table's);
- `attainment_points`: the policy's SLO attainment minus the baseline's, in points (every request
  counts: a rejected or dropped one is a miss).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from switchboard.simulation.evaluate import PolicyResult

Interval = tuple[float, float, float]  # estimate, 2.5%, 97.5%


@dataclass(frozen=True)
class PairedComparison:
    policy: str
    baseline: str
    requests: int
    ttft_mean_ratio: Interval
    ttft_p99_ratio: Interval
    attainment_points: Interval

    def as_dict(self) -> dict[str, object]:
        return {
            "baseline": self.baseline,
            "requests": self.requests,
            "ttft_mean_ratio": list(self.ttft_mean_ratio),
            "ttft_p99_ratio": list(self.ttft_p99_ratio),
            "attainment_points": list(self.attainment_points),
        }


def _ttfts(result: PolicyResult) -> np.ndarray:
    return np.array([r.ttft if r.outcome == "ok" and r.ttft is not None else np.nan for r in result.records])


def compare(policy: PolicyResult, baseline: PolicyResult, seed: int = 0, resamples: int = 1000,
            chunk: int = 100) -> PairedComparison:
    """`policy` against `baseline` on the same requests (see the module docstring)."""
    n = len(policy.records)
    if n != len(baseline.records) or any(
        a.request_id != b.request_id or a.arrival != b.arrival for a, b in zip(policy.records, baseline.records, strict=True)
    ):
        raise ValueError(f"{policy.policy} and {baseline.policy} did not replay the same requests")
    if n == 0:
        raise ValueError("no requests to compare")
    a, b = _ttfts(policy), _ttfts(baseline)
    met_a = np.asarray(policy.met, dtype=np.float64)
    met_b = np.asarray(baseline.met, dtype=np.float64)
    if np.all(np.isnan(a)) or np.all(np.isnan(b)):
        raise ValueError("a policy completed no request: no TTFT to compare")

    def scores(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ta, tb = a[idx], b[idx]
        with warnings.catch_warnings():
            # A resample may hold no completed request of a policy (tiny runs): its ratio is NaN
            # and the interval is taken over the others.
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(tb, axis=-1) / np.nanmean(ta, axis=-1)
            p99 = np.nanpercentile(tb, 99, axis=-1) / np.nanpercentile(ta, 99, axis=-1)
        points = 100.0 * (met_a[idx].mean(axis=-1) - met_b[idx].mean(axis=-1))
        return mean, p99, points

    point = [float(x) for x in scores(np.arange(n))]
    rng = np.random.default_rng(seed)
    draws: list[list[np.ndarray]] = [[], [], []]
    for done in range(0, resamples, chunk):
        idx = rng.integers(0, n, (min(chunk, resamples - done), n))
        for k, values in enumerate(scores(idx)):
            draws[k].append(values)
    intervals = []
    for k, est in enumerate(point):
        values = np.concatenate(draws[k])
        intervals.append((est, float(np.nanquantile(values, 0.025)), float(np.nanquantile(values, 0.975))))
    return PairedComparison(policy.policy, baseline.policy, n, *intervals)


def render_paired(comparisons: Sequence[PairedComparison]) -> str:
    """One line per policy: its ratios and attainment difference against the baseline, with intervals."""
    lines = []
    for c in comparisons:
        m, p, d = c.ttft_mean_ratio, c.ttft_p99_ratio, c.attainment_points
        lines.append(
            f"{c.policy} vs {c.baseline} ({c.requests} paired requests): TTFT mean {m[0]:.3f}x [{m[1]:.3f}, {m[2]:.3f}] "
            f"lower, p99 {p[0]:.3f}x [{p[1]:.3f}, {p[2]:.3f}] lower, SLO attainment {d[0]:+.2f} points "
            f"[{d[1]:+.2f}, {d[2]:+.2f}]"
        )
    return "\n".join(lines)
