"""Scheduler placement benchmark: decision time of every placement policy against least-loaded.

Times `Placer.place` (validate, one `ClusterSnapshot` of the registry, the policy's ranking of each
requested expert, the result, the reservation of the primary: what the `Place` handler calls) at 8,
64 and 256 replicas spread evenly over 4 experts, p50/p99 per policy. The peer is `least-loaded`
(the default policy) over the same registry, measured in the same run; ratios are policy / peer.
Also times `ReplicaRegistry.snapshot()` alone, the part of the decision that grows with the cluster.

Each request names two candidate experts (as the router sends them) with 2 alternates; it is
completed right after (untimed), so the in-flight counts stay flat. Between blocks every replica
reports a new load (untimed), as heartbeats would. Policies alternate in blocks over the run,
because the machine is shared and noisy.

Run: .venv/bin/python bench/scheduler_bench.py [--iterations N] [--sizes 8,64,256] [--json OUT] [--quick]
Target (issue "Scheduler I"): decision p99 <= 1 ms at 64 replicas; printed, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

from bench_common import machine, quantiles_ms
from switchboard.scheduler.placement import PlacementRequest, Placer
from switchboard.scheduler.policies import LEAST_LOADED, POLICY_NAMES, make_policy
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRegistry

EXPERTS = ("expert-0", "expert-1", "expert-2", "expert-3")
DEFAULT_SIZES = (8, 64, 256)
TARGET_REPLICAS, TARGET_P99_MS = 64, 1.0
BLOCK = 200  # decisions of one policy before the next policy's turn
KV_BLOCKS = 1000
SEED = 1234


def random_load(rng: random.Random) -> LoadSnapshot:
    """A plausible heartbeat: a few running and waiting sequences, part of the KV pool in use."""
    return LoadSnapshot(
        running=rng.randrange(0, 16), waiting=rng.randrange(0, 4),
        kv_blocks_used=rng.randrange(0, KV_BLOCKS), kv_blocks_total=KV_BLOCKS,
        tokens_per_second=rng.uniform(50.0, 500.0),
    )


def build_registry(replicas: int, rng: random.Random) -> ReplicaRegistry:
    """`replicas` replicas spread evenly over the experts, with random loads; none ever expires here."""
    registry = ReplicaRegistry(expiry_seconds=3600.0)
    for n in range(replicas):
        expert = EXPERTS[n % len(EXPERTS)]
        registry.register(
            ReplicaInfo(f"{expert}-r{n:03d}", expert, f"10.0.{n // 250}.{n % 250 + 1}:50061",
                        device="cuda:0", model_name=expert, max_model_len=4096),
            random_load(rng),
        )
    return registry


def heartbeat(registry: ReplicaRegistry, rng: random.Random) -> None:
    """Every replica reports a new load."""
    for record in registry.replicas():
        registry.report_load(record.replica_id, random_load(rng))


def measure(replicas: int, iterations: int, warmup: int) -> dict[str, Any]:
    """Place and snapshot samples of every policy at one cluster size."""
    rng = random.Random(SEED + replicas)
    registry = build_registry(replicas, rng)
    placers = {name: Placer(registry, make_policy(name, seed=SEED), EXPERTS) for name in POLICY_NAMES}
    clock = time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in POLICY_NAMES}
    samples["snapshot"] = []
    counter = 0

    def place(placer: Placer) -> float:
        nonlocal counter
        counter += 1
        first = EXPERTS[counter % len(EXPERTS)]
        second = EXPERTS[(counter + 1) % len(EXPERTS)]
        request = PlacementRequest(
            request_id=f"req-{counter}", experts=(first, second), prompt_tokens=200, max_tokens=64,
            max_alternates=2, min_model_len=264,
        )
        t = clock()
        result = placer.place(request)
        seconds = clock() - t
        assert result.primary is not None
        registry.complete(request.request_id, result.primary.replica.replica_id)
        return seconds

    for placer in placers.values():
        for _ in range(warmup):
            place(placer)
    done = 0
    while done < iterations:
        heartbeat(registry, rng)
        gc.collect()
        block = min(BLOCK, iterations - done)
        # Rotate which policy goes first, so none always runs right after the heartbeat.
        order = list(POLICY_NAMES)
        shift = (done // BLOCK) % len(order)
        for name in order[shift:] + order[:shift]:
            for _ in range(block):
                samples[name].append(place(placers[name]))
        for _ in range(block):
            t = clock()
            registry.snapshot()
            samples["snapshot"].append(clock() - t)
        done += block
    return {name: quantiles_ms(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure every size and print one table per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5000, help="timed decisions per policy and size")
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="replica counts, comma-separated (spread over 4 experts)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run; the numbers mean little)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    iterations, warmup = (300, 50) if args.quick else (args.iterations, 500)

    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "machine": machine(), "python": platform.python_version(), "date": started.isoformat(timespec="seconds"),
        "iterations": iterations, "warmup": warmup, "experts": len(EXPERTS), "quick": args.quick, "sizes": {},
    }
    print(f"machine: {results['machine']}; Python {results['python']}; {results['date']}")
    print(f"Placer.place (snapshot + policy + result + reservation), {iterations} decisions per policy and size, "
          f"2 candidate experts and 2 alternates per request, {len(EXPERTS)} experts; ms; peer = {LEAST_LOADED}")
    print("| replicas | policy | p50 | p99 | max | ratio policy / peer p50 / p99 | target p99 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for replicas in sizes:
        stats = measure(replicas, iterations, warmup)
        peer = stats[LEAST_LOADED]
        entry: dict[str, Any] = {"snapshot": stats["snapshot"], "policies": {}}
        for name in POLICY_NAMES:
            s = stats[name]
            ratio = {k: s[k] / peer[k] for k in ("p50", "p99")}
            met = None
            cell = ""
            if replicas == TARGET_REPLICAS:
                met = s["p99"] <= TARGET_P99_MS
                cell = f"<= {TARGET_P99_MS:g} ({'met' if met else 'MISSED'})"
            entry["policies"][name] = {**s, "ratio_over_peer": ratio, "target_met": met}
            label = f"{name} (peer)" if name == LEAST_LOADED else name
            print(f"| {replicas} | {label} | {s['p50']:.4f} | {s['p99']:.4f} | {s['max']:.3f} | "
                  f"{ratio['p50']:.2f}x / {ratio['p99']:.2f}x | {cell} |")
        snap = stats["snapshot"]
        share = snap["p50"] / peer["p50"]
        entry["snapshot_share_of_peer_p50"] = share
        print(f"| {replicas} | snapshot() alone | {snap['p50']:.4f} | {snap['p99']:.4f} | {snap['max']:.3f} | "
              f"{share:.0%} of the peer's p50 | |")
        results["sizes"][str(replicas)] = entry
    results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"load average after: {' '.join(f'{x:.2f}' for x in results['load_average_after'] or [])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
