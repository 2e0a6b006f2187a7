"""The evaluation table: one row per policy, the issue's columns, as plain text."""

from __future__ import annotations

from collections.abc import Sequence

from switchboard.simulation.evaluate import PolicyResult

# (header, summary field, format): times print in milliseconds.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("SLO att.", "slo_attainment", "pct"),
    ("goodput/s", "goodput_rps", "f2"),
    ("TTFT p50", "ttft_p50", "ms"),
    ("TTFT p99", "ttft_p99", "ms"),
    ("TPOT p50", "tpot_p50", "ms"),
    ("TPOT p99", "tpot_p99", "ms"),
    ("E2E p50", "e2e_p50", "ms"),
    ("E2E p99", "e2e_p99", "ms"),
    ("cache hit", "prefix_hit_rate", "pct"),
    ("imbalance", "imbalance", "f2"),
    ("replica-s", "replica_seconds", "f0"),
    ("failed", "failed", "int"),
)


def _cell(value: object, kind: str) -> str:
    if value is None:
        return "-"
    number = float(value)  # type: ignore[arg-type]
    if kind == "pct":
        return f"{100 * number:.1f}%"
    if kind == "ms":
        return f"{1000 * number:.0f} ms"
    if kind == "int":
        return str(int(number))
    return f"{number:.{kind[1]}f}"


def render_table(results: Sequence[PolicyResult]) -> str:
    """A fixed-width table of every policy's pooled summary (times in ms; failed = rejected + dropped)."""
    headers = ["policy", *(c[0] for c in COLUMNS)]
    rows = []
    for r in results:
        row = r.summary.as_row()
        row["failed"] = r.summary.rejected + r.summary.dropped
        rows.append([r.policy, *(_cell(row[field], kind) for _, field, kind in COLUMNS)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)
