"""What every benchmark under bench/ reports the same way: the machine it ran on, and quantiles.

Imported by the bench scripts, which run as `python bench/<name>.py` (so this folder is on the path).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path


def machine(torch_threads: int | None = None, load: bool = True) -> str:
    """CPU model and its bf16/AMX flags, cores, torch threads (when given) and the load average."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in text)
    parts = [f"{model} ({flags or 'no bf16 ISA'})", f"{os.cpu_count()} cores"]
    if torch_threads is not None:
        parts.append(f"torch threads {torch_threads}")
    if load and hasattr(os, "getloadavg"):
        parts.append("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return ", ".join(parts)


def quantiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of a sample in milliseconds; nearest rank, so each is a value really seen."""
    ordered = sorted(seconds)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))] * 1000

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": ordered[-1] * 1000,
        "mean": statistics.fmean(ordered) * 1000,
        "n": len(ordered),
    }
