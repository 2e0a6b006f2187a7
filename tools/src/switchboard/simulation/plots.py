"""PNG plots of a policy comparison: TTFT distributions, and attainment and tail latency per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from switchboard.simulation.evaluate import PolicyResult


def ttft_cdf(results: Sequence[PolicyResult], path: Path) -> Path:
    """Cumulative distribution of time to first token, one line per policy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        values = sorted(rec.ttft for rec in r.records if rec.outcome == "ok" and rec.ttft is not None)
        if values:
            ax.plot([1000 * v for v in values], [(i + 1) / len(values) for i in range(len(values))], label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of completed requests")
    ax.set_title("TTFT by placement policy (simulated)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def policy_bars(results: Sequence[PolicyResult], path: Path) -> Path:
    """SLO attainment, TTFT p99 and load imbalance per policy, side by side."""
    names = [r.policy for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    series = (
        ("SLO attainment (%)", [100 * r.summary.slo_attainment for r in results]),
        ("TTFT p99 (ms)", [1000 * (r.summary.ttft_p99 or 0.0) for r in results]),
        ("load imbalance (max/mean)", [r.summary.imbalance for r in results]),
    )
    for ax, (title, values) in zip(axes, series, strict=True):
        ax.bar(names, values, color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Sequence[PolicyResult], out_dir: Path) -> list[Path]:
    """Both plots under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [ttft_cdf(results, out_dir / "ttft_cdf.png"), policy_bars(results, out_dir / "policies.png")]
