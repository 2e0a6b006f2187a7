"""PNG plots of one or more runs (matplotlib, Agg backend, small files).

- `latency_cdf.png`: CDFs of TTFT, TPOT and end-to-end latency, one line per run.
- `timeline.png`: output tokens/s (1-s bins) and queueing over time: requests in flight and
  requests still waiting for their first token, sampled every 0.5 s.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from switchboard.bench.records import STATUS_OK, RequestRecord

DPI = 72


def _cdf(ax, values: list[float], label: str) -> None:
    data = sorted(values)
    if data:
        ax.step(data, [(i + 1) / len(data) for i in range(len(data))], where="post", label=label)


def latency_cdf(runs: dict[str, list[RequestRecord]], path: Path) -> Path:
    """Write the latency CDF figure."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for name, records in runs.items():
        ok = [r for r in records if r.status == STATUS_OK]
        _cdf(axes[0], [r.ttft * 1000 for r in ok if r.ttft is not None], name)
        _cdf(axes[1], [r.tpot * 1000 for r in ok if r.tpot is not None], name)
        _cdf(axes[2], [r.e2e for r in ok if r.e2e is not None], name)
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)", "end-to-end (s)"), strict=True):
        ax.set_xlabel(title)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _token_times(records: list[RequestRecord]) -> list[tuple[float, int]]:
    return [(r.sent_s + t, n) for r in records if r.sent_s is not None for t, n in r.chunks]


def timeline(runs: dict[str, list[RequestRecord]], path: Path, step_s: float = 0.5) -> Path:
    """Write the throughput and queueing figure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for name, records in runs.items():
        ends = [r.end_s for r in records if r.end_s is not None]
        horizon = max(ends, default=0.0)
        bins = int(horizon) + 1
        per_second = [0] * bins
        for t, n in _token_times(records):
            per_second[min(int(t), bins - 1)] += n
        axes[0].plot(range(bins), per_second, label=name, linewidth=1)
        steps = [i * step_s for i in range(int(horizon / step_s) + 1)]
        sent = [r for r in records if r.sent_s is not None]
        in_flight = [sum(1 for r in sent if r.sent_s <= t < (r.end_s if r.end_s is not None else horizon)) for t in steps]
        waiting = [
            sum(1 for r in sent if r.sent_s <= t < min(x for x in (r.first_token_s, r.end_s, horizon) if x is not None))
            for t in steps
        ]
        line = axes[1].plot(steps, in_flight, label=f"{name} in flight", linewidth=1)
        axes[1].plot(steps, waiting, linestyle="--", color=line[0].get_color(), label=f"{name} waiting for 1st token",
                     linewidth=1)
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("requests")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(runs: dict[str, list[RequestRecord]], out_dir: Path, prefix: str = "") -> list[Path]:
    """Write both figures into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [latency_cdf(runs, out_dir / f"{prefix}latency_cdf.png"), timeline(runs, out_dir / f"{prefix}timeline.png")]
