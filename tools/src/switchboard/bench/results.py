"""The results file: one JSON document per run (schema in bench/README.md of this package).

Top-level keys: `schema`, `created_utc`, `command_line`, `git_revision`, `machine`, `target`,
`workload`, `slo`, `summary`, `requests`. NaN figures are written as null.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from switchboard.bench.records import RequestRecord

SCHEMA = "switchboard.bench.results/v1"


def git_revision(cwd: Path | None = None) -> str:
    """`git describe --always --dirty` of the checkout, or "unknown" outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=cwd or Path.cwd(),
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_facts() -> dict:
    """Facts about the client machine that affect the numbers."""
    facts: dict = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return facts


def _clean(value):
    """Replace NaN/inf by None recursively so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def build_results(command_line: list[str], target: dict, workload: dict, slo: dict, summary: dict,
                  records: list[RequestRecord]) -> dict:
    """Assemble the results document."""
    return _clean({
        "schema": SCHEMA,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command_line": command_line,
        "git_revision": git_revision(),
        "machine": machine_facts(),
        "target": target,
        "workload": workload,
        "slo": slo,
        "summary": summary,
        "requests": [r.to_dict() for r in records],
    })


def write_results(path: Path, results: dict) -> None:
    """Write the results file (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


def read_results(path: Path) -> dict:
    """Read a results file, checking its schema tag."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable results file: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file")
    return data


def records_of(results: dict) -> list[RequestRecord]:
    """The per-request records of a results document."""
    return [RequestRecord.from_dict(r) for r in results["requests"]]
