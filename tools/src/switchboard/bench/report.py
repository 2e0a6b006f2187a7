"""Printed summaries: the table after a run and the side-by-side `compare` table (rich)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

# (label, path into the summary, unit scale, format, higher is better)
METRICS: list[tuple[str, tuple[str, ...], float, str, bool]] = [
    ("requests sent", ("requests_sent",), 1, "{:.0f}", True),
    ("completed", ("requests_completed",), 1, "{:.0f}", True),
    ("timed out", ("requests_timed_out",), 1, "{:.0f}", False),
    ("failed", ("requests_failed",), 1, "{:.0f}", False),
    ("duration (s)", ("duration_s",), 1, "{:.1f}", False),
    ("request throughput (req/s)", ("request_throughput_rps",), 1, "{:.3f}", True),
    ("output tokens produced", ("output_tokens_total",), 1, "{:.0f}", True),
    ("output tokens requested", ("output_tokens_requested_total",), 1, "{:.0f}", True),
    ("output throughput (tok/s)", ("output_token_throughput_tps",), 1, "{:.1f}", True),
    ("goodput (share of sent)", ("goodput_fraction",), 1, "{:.3f}", True),
    ("goodput (req/s)", ("goodput_rps",), 1, "{:.3f}", True),
    *[
        (f"{name} {stat} (ms)", (key, stat), 1000, "{:.1f}", False)
        for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s"))
        for stat in ("mean", "p50", "p90", "p99")
    ],
]


def metric(summary: dict, path: tuple[str, ...]) -> float:
    """A summary figure by path; NaN when absent or null."""
    value: object = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return float(value) if isinstance(value, int | float) else math.nan


def _fmt(value: float, fmt: str, scale: float) -> str:
    return "-" if math.isnan(value) else fmt.format(value * scale)


def summary_table(summary: dict, title: str) -> Table:
    """One run's figures, plus errors by status."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, path, scale, fmt, _ in METRICS:
        table.add_row(label, _fmt(metric(summary, path), fmt, scale))
    for status, count in (summary.get("status_counts") or {}).items():
        table.add_row(f"status {status}", str(count))
    return table


def compare_table(names: list[str], summaries: list[dict]) -> Table:
    """Runs side by side; every run after the first gets a ratio column against the first."""
    table = Table(title=f"compare (ratios vs {names[0]})")
    table.add_column("metric")
    table.add_column(names[0], justify="right")
    for name in names[1:]:
        table.add_column(name, justify="right")
        table.add_column("ratio", justify="right")
    for label, path, scale, fmt, _higher in METRICS:
        base = metric(summaries[0], path)
        row = [label, _fmt(base, fmt, scale)]
        for other in summaries[1:]:
            value = metric(other, path)
            row.append(_fmt(value, fmt, scale))
            row.append("-" if math.isnan(value) or math.isnan(base) or base == 0 else f"{value / base:.2f}x")
        table.add_row(*row)
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print a table to the terminal (or the given console)."""
    (console or Console()).print(table)
