"""What every benchmark under bench/ reports the same way: the machine it ran on, and quantiles.

Imported by the bench scripts, which run as `python bench/<name>.py` (so this folder is on the path).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


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


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGINT (the stack's Ctrl-C path), then SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0)):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def switchboard_up(
    config: Path,
    log: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 900.0,
) -> Iterator[str]:
    """`switchboard up --experts-config CONFIG ARGS` until ready; yields the gateway address.

    Sets SWITCHBOARD_API_KEY from the stack's banner (the client commands read it) and stops the
    stack when the block ends, also on errors and Ctrl-C.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "switchboard"), "up", *args, "--experts-config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while "Switchboard is up" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"switchboard up exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"switchboard up not ready after {ready_timeout_s:.0f} s; see {log}")
            time.sleep(0.5)  # polling interval for the readiness line
        text = log.read_text()
        address = next(line.split()[1] for line in text.splitlines() if line.strip().startswith("gateway "))
        key = next(line.split("=", 1)[1] for line in text.splitlines() if "export SWITCHBOARD_API_KEY=" in line)
        os.environ["SWITCHBOARD_API_KEY"] = key.strip()
        yield address
    finally:
        stop(proc)


def write_jsonl(rows: Sequence[Any], path: Path) -> None:
    """Trace rows (`switchboard.bench.workload.TraceRequest`) as a JSONL trace with `hash_ids`, so a
    replay (`switchboard bench run --trace`) and the simulator get the very same requests."""
    with path.open("w") as out:
        for r in rows:
            out.write(json.dumps({"timestamp": round(r.arrival_s * 1000, 3), "input_length": r.input_tokens,
                                  "output_length": r.output_tokens, "hash_ids": list(r.hash_ids)}) + "\n")


def trace_window(rows: Sequence[Any], start: float, seconds: float, speedup: float, fit_context: int | None,
                 max_output_tokens: int | None, seed: int, prefix_groups: int = 16, prefix_tokens: int = 128,
                 trace_block: int = 64) -> list[Any]:
    """One window of a trace shaped as `switchboard bench` shapes it (time scaled, lengths fitted and
    capped), every prompt starting with one of `prefix_groups` shared system prompts (synthetic, as
    `switchboard scheduler eval` does: the traces have no content)."""
    from switchboard.bench.transform import WorkloadShape, shape
    from switchboard.simulation.workload import assign_shared_prefixes

    shaped, _ = shape(list(rows), WorkloadShape(window_start_s=start, window_duration_s=seconds, speedup=speedup,
                                                 fit_context=fit_context, max_output_tokens=max_output_tokens))
    return assign_shared_prefixes(shaped, groups=prefix_groups, prefix_tokens=prefix_tokens,
                                  trace_block_size=trace_block, seed=seed)
