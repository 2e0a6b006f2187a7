"""Cluster simulator speed: simulated requests per wall-clock second on one core, against step-by-step.

Workload: the Azure LLM inference trace 2023, conversation (19,366 requests, ~58 min; Patel et al.,
"Splitwise", ISCA 2024, CC-BY 4.0), lengths scaled so 99% of prompt+output fit the demo experts'
512-token context (as `switchboard bench --fit-context 512`), arrivals sped up `--speedup` times,
every prompt starting with one of 16 shared 128-token system prompts (synthetic: the trace has
no content). Cluster: `--replicas` replicas of bard-small with its measured cost profile
(config/cost_models/bard-small.json), least-loaded placement, 1 s heartbeats with KV events.

Peer: the same simulator with fast-forward off (every engine step through `schedule()`), on the
first `--peer-requests` requests of the same workload, in the same run. The ratio is fast-forward
rate / step-by-step rate. Both produce the same per-request times (tools/tests/simulation).

Run: .venv/bin/python bench/simulator_bench.py [--replicas 8] [--speedup 8] [--json OUT]
Target (issue "Scheduler I"): >= 20,000 simulated requests per wall-clock second at 8 replicas;
printed, not asserted. One process, so one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_common import machine
from switchboard.bench.transform import WorkloadShape, shape
from switchboard.bench.workload import load_trace
from switchboard.common.experts_config import ExpertSpec
from switchboard.scheduler.policies import make_policy
from switchboard.simulation.cluster import SimConfig, Simulation
from switchboard.simulation.evaluate import pool_from_profile
from switchboard.simulation.workload import assign_shared_prefixes, from_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / ".." / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
PROFILE = ROOT / "config" / "cost_models" / "bard-small.json"


def rate(config: SimConfig, requests: list, policy: str) -> tuple[float, float]:
    """(simulated requests per wall second, simulated seconds) of one run."""
    sim = Simulation(config, make_policy(policy))
    started = time.perf_counter()
    result = sim.run(requests)
    wall = time.perf_counter() - started
    assert all(r.outcome == "ok" for r in result.records), "every request should complete"
    return len(requests) / wall, result.end_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=8.0)
    parser.add_argument("--policy", default="least-loaded")
    parser.add_argument("--peer-requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best rate is kept")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows, _ = shape(load_trace(TRACE), WorkloadShape(speedup=args.speedup, fit_context=512))
    rows = assign_shared_prefixes(rows, groups=16, prefix_tokens=128, trace_block_size=64)
    requests = from_trace(rows, lambda _row: "bard-small")
    pool = pool_from_profile(ExpertSpec(name="bard-small", description="", model="bard-small"), args.replicas, PROFILE)
    fast = SimConfig((pool,))
    slow = SimConfig((pool,), fast_forward=False)
    peer = requests[: args.peer_requests]
    fast_rates, slow_rates = [], []
    for _ in range(args.repeats):  # alternate, since the machine is shared and noisy
        fast_rates.append(rate(fast, requests, args.policy)[0])
        slow_rates.append(rate(slow, peer, args.policy)[0])
    best_fast, best_slow = max(fast_rates), max(slow_rates)
    simulated = rate(fast, requests, args.policy)[1]
    print(f"machine: {machine()}")
    print(
        f"workload: {len(requests)} requests over {rows[-1].arrival_s:.0f} s (speedup {args.speedup:g}),"
        f" {args.replicas} replicas, policy {args.policy}; simulated span {simulated:.0f} s"
    )
    print(f"fast-forward : {best_fast:9.0f} simulated requests / wall s (runs: {', '.join(f'{r:.0f}' for r in fast_rates)})")
    print(f"step-by-step : {best_slow:9.0f} simulated requests / wall s (first {len(peer)} requests)")
    print(f"ratio        : {best_fast / best_slow:9.2f}x   target >= 20,000 req/s at 8 replicas")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "fast_rps": best_fast, "step_rps": best_slow,
                                         "replicas": args.replicas, "speedup": args.speedup}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
