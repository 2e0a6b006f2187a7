"""Replica allocation on the real local stack, against the simulator on the very same requests.

Issue 17's check that the simulator's comparison of allocators holds on a running system. One
command; every process it starts is stopped when it ends:

    .venv/bin/python bench/make_random_llama.py /tmp/chat-half-b
    .venv/bin/python bench/allocation_stack_bench.py --model-dir /tmp/chat-half-b   # about 20 minutes
    (add learned with --allocators ...,learned --policy-file FILE, a file alloc-train wrote for these settings)

1. Shapes one held-out window of each pool's real trace (default: chat = the Azure 2023
   conversation trace, code = the code trace; the same trace seconds of both), slowed by
   `--speedup` so a few replicas on this machine carry it, lengths scaled to the model's context
   and outputs capped, every prompt starting with one of 16 shared 128-token system prompts, and
   writes each as a JSONL trace with `hash_ids`: the real replay and the simulator get the very
   same requests.
2. Profiles the model's step cost with the replicas' settings (OMP_NUM_THREADS=1), once.
3. For each allocator: starts the local stack (`switchboard up --no-gate`, the two pools served
   by the same model folder, each pool's minimum at the start: the replicas `switchboard up` owns) with the allocation
   controller on and the local-process actuator live (SCHEDULER_ALLOCATOR, SCHEDULER_ACTUATOR=local:
   new replicas are real generator processes, scale-down drains and stops them), replays both
   pools' traces at once (`switchboard bench run`, one per pool, exact output lengths), and samples
   the scheduler's `switchboard_scheduler_allocation_replicas` gauges every second: replica-seconds
   are the integral of current (serving or starting) plus draining replicas, as the simulator
   counts them from creation to stop.
4. Simulates the same requests under the same allocator, budget, bounds, period, cool-down and
   targets (start-up delay: measured from the stack's own log, the time its generators took from
   launch to registration), and prints both systems' SLO attainment (every request counts: an error
   is a miss), mean replicas and attainment per mean replica side by side.

Results (JSON, the traces, the bench results, the stack logs) go under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench_common import ROOT, VENV_BIN, machine, switchboard_up, trace_window, write_jsonl
from switchboard.bench.records import STATUS_OK
from switchboard.bench.results import read_results, records_of
from switchboard.bench.workload import load_jsonl, load_trace

TRACES = ROOT / ".." / "shared" / "data" / "traces"
DEFAULT_POOLS = f"chat={TRACES / 'azure_llm_2023_conv.csv'},code={TRACES / 'azure_llm_2023_code.csv'}"
TRACE_BLOCK = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True,
                   help="the model every pool serves (e.g. bench/make_random_llama.py's folder)")
    p.add_argument("--pools", default=DEFAULT_POOLS, help="NAME=TRACE,NAME=TRACE (default: chat and code)")
    p.add_argument("--allocators", default="hpa,static,keda")
    p.add_argument("--policy-file", type=Path, default=None, help="the learned allocator's file (alloc-train)")
    p.add_argument("--window-start", type=float, default=2520.0,
                   help="trace second of the window (default: 2520, in the held-out last 30%%, a code burst)")
    p.add_argument("--window-seconds", type=float, default=30.0, help="trace seconds replayed (default: 30)")
    p.add_argument("--speedup", type=float, default=0.1,
                   help="arrival-time scale (default 0.1: 10x slower, what 2 cores carry)")
    p.add_argument("--fit-context", type=int, default=512, help="scale lengths so 99%% fit this context")
    p.add_argument("--max-output-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=3)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--period", type=float, default=10.0)
    p.add_argument("--cooldown", type=float, default=30.0)
    p.add_argument("--hpa-target", type=float, default=1000.0)
    p.add_argument("--keda-target", type=float, default=4.0)
    p.add_argument("--ttft-slo", type=float, default=1.5)
    p.add_argument("--tpot-slo", type=float, default=0.2)
    p.add_argument("--step-overhead-ms", type=float, default=14.3,
                   help="the simulator's per-step overhead (bench/README.md's calibration of this model: 14.3)")
    p.add_argument("--dispatch-ms", type=float, default=24.4, help="the simulator's dispatch time (calibration: 24.4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse the real runs already under --out; only simulate")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "allocation-stack")
    return p.parse_args()


def pools_of(spec: str) -> dict[str, Path]:
    out = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, _, trace = part.partition("=")
        out[name] = Path(trace)
    if len(out) < 2:
        raise SystemExit("--pools needs two pools, NAME=TRACE,NAME=TRACE")
    return out


def initial_counts(names: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Each pool's minimum: the generators `switchboard up` starts and owns (the local actuator stops
    only what it started), so every allocator scales from there, in both systems."""
    return {n: args.min_replicas for n in names}


@contextlib.contextmanager
def allocating_stack(names: list[str], args: argparse.Namespace, allocator: str, profile: Path,
                     log: Path, log_dir: Path) -> Iterator[tuple[str, str]]:
    """The local stack with the allocation controller on; yields (gateway address, scheduler metrics URL)."""
    folder = Path(tempfile.mkdtemp())
    start = initial_counts(names, args)
    if min(start.values()) < 1:
        raise SystemExit("--min-replicas must be at least 1: the stack starts each pool's minimum itself")
    lines = ["experts:"]
    for name in names:
        lines += [f"  - name: {name}", f"    description: the {name} pool of the allocation bench",
                  f"    model: {args.model_dir.resolve()}", "    relative_cost: 1.0", f"    replicas: {start[name]}"]
    (folder / "experts.yaml").write_text("\n".join(lines) + "\n")
    (folder / "cost_models").mkdir()
    for name in names:
        (folder / "cost_models" / f"{name}.json").write_text(profile.read_text())
    env = {
        "OMP_NUM_THREADS": "1",
        "SCHEDULER_PLACEMENT_POLICY": "prefix-load",
        "SCHEDULER_ALLOCATOR": allocator,
        "SCHEDULER_ACTUATOR": "local",
        "SCHEDULER_ALLOCATION_BUDGET": str(args.budget),
        "SCHEDULER_ALLOCATION_BOUNDS": ",".join(f"{n}={args.min_replicas}:{args.max_replicas}" for n in names),
        "SCHEDULER_ALLOCATION_PERIOD_SECONDS": str(args.period),
        "SCHEDULER_ALLOCATION_COOLDOWN_SECONDS": str(args.cooldown),
        "SCHEDULER_ALLOCATION_HPA_TARGET_TOKENS": str(args.hpa_target),
        "SCHEDULER_ALLOCATION_KEDA_TARGET_QUEUE": str(args.keda_target),
        "SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS": "180",
    }
    if allocator == "learned":
        env["SCHEDULER_ALLOCATION_POLICY_FILE"] = str(args.policy_file.resolve())
    up_args = ["--no-gate", "--log-dir", str(log_dir)]
    with switchboard_up(folder / "experts.yaml", log, args=up_args, env=env, ready_timeout_s=600) as address:
        match = re.search(r"scheduler\s+\S+\s+metrics (http://\S+/metrics)", log.read_text())
        if not match:
            raise RuntimeError(f"no scheduler metrics URL in {log}")
        yield address, match.group(1)


class ReplicaSampler:
    """Samples the scheduler's allocation gauges every second; integrates current + draining replicas."""

    def __init__(self, url: str, names: list[str], initial: dict[str, int]) -> None:
        self.url, self.names = url, names
        self.counts = {n: float(initial[n]) for n in names}  # before the first period sets the gauges
        self.replica_seconds = 0.0
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def read(self) -> None:
        text = urllib.request.urlopen(self.url, timeout=2).read().decode()
        seen: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'switchboard_scheduler_allocation_replicas\{expert="([^"]+)",kind="(current|draining)"\} (\S+)', line)
            if m and m.group(1) in self.counts:
                seen[m.group(1)] = seen.get(m.group(1), 0.0) + float(m.group(3))
        for name, value in seen.items():
            self.counts[name] = value

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.read()
            now = time.monotonic()
            self.replica_seconds += sum(self.counts.values()) * (now - last)
            self.samples.append({"t": now, **self.counts})
            last = now
            self.stop.wait(1.0)


def replay(address: str, name: str, trace: Path, tokenizer: Path, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    command = [str(VENV_BIN / "switchboard"), "bench", "run", "--target", f"grpc://{address}", "--model", name,
               "--tokenizer", str(tokenizer), "--trace", str(trace), "--block-size", str(TRACE_BLOCK),
               "--temperature", "0", "--timeout", "120", "--slo-ttft-ms", str(1000 * args.ttft_slo),
               "--slo-tpot-ms", str(1000 * args.tpot_slo), "--no-progress", "--label", name, "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def real_score(results: dict[str, Path], args: argparse.Namespace) -> tuple[int, int]:
    """(requests, met) over every pool's records, judged as the scheduler and the simulator judge."""
    from switchboard.common.experts_config import ExpertSLO
    from switchboard.scheduler.slo import judge

    slo = ExpertSLO(ttft_seconds=args.ttft_slo, tpot_seconds=args.tpot_slo)
    total = met = 0
    for path in results.values():
        for r in records_of(read_results(path)):
            total += 1
            ok = r.status == STATUS_OK and r.ttft is not None and r.e2e is not None
            met += ok and judge(slo, True, r.ttft, r.e2e, r.output_tokens).good
    return total, met


def startup_seconds(scheduler_log: Path) -> list[float]:
    """Launch-to-registration seconds of each generator the actuator started (the scheduler's log)."""
    from datetime import datetime

    started: dict[str, datetime] = {}
    out = []
    for line in scheduler_log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        rid, stamp = entry.get("replica_id"), entry.get("timestamp")
        if not rid or not stamp:
            continue
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if entry.get("event") == "generator process started":
            started[rid] = at
        elif entry.get("event") == "replica registered" and rid in started:
            out.append((at - started.pop(rid)).total_seconds())
    return out


def simulate(names: list[str], traces: dict[str, Path], args: argparse.Namespace, allocator: str, profile: Path,
             startup: float, seconds: float) -> dict[str, float]:
    from dataclasses import replace

    from switchboard.common.experts_config import ExpertSLO, ExpertSpec
    from switchboard.scheduler.allocation import AllocationConfig, PoolBounds, make_allocator
    from switchboard.simulation.allocation_run import AllocSetup, run_window
    from switchboard.simulation.evaluate import pool_from_profile
    from switchboard.simulation.workload import from_trace

    slo = ExpertSLO(ttft_seconds=args.ttft_slo, tpot_seconds=args.tpot_slo)
    pools = []
    for name in names:
        pool = pool_from_profile(ExpertSpec(name=name, description="", model=name), 0, profile, args.step_overhead_ms)
        pools.append(replace(pool, slo=slo, startup_seconds=startup))
    requests = []
    for name in names:
        requests.extend(from_trace(load_jsonl(traces[name]), lambda _r, e=name: e))
    requests.sort(key=lambda r: (r.arrival, r.expert, r.index))
    requests = [replace(r, index=i) for i, r in enumerate(requests)]
    alloc = AllocationConfig(args.budget, {n: PoolBounds(args.min_replicas, args.max_replicas) for n in names},
                             period_seconds=args.period, scale_down_cooldown_seconds=args.cooldown,
                             hpa_target_tokens_per_replica=args.hpa_target, keda_target_queue=args.keda_target)
    setup = AllocSetup(tuple(pools), {n: () for n in names}, alloc, trace_block_size=TRACE_BLOCK,
                       dispatch_seconds=args.dispatch_ms / 1000.0, initial_counts=initial_counts(names, args))
    score, _result, _sim = run_window(setup, make_allocator(allocator, args.policy_file), 0.0, seconds, args.seed,
                                      requests)
    return {"requests": score.requests, "met": score.met, "attainment": score.attainment,
            "mean_replicas": score.mean_replicas, "attainment_per_replica": score.per_replica_second}


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    allocators = [a for a in args.allocators.split(",") if a]
    if "learned" in allocators and not args.policy_file:
        raise SystemExit("the learned allocator needs --policy-file (switchboard scheduler alloc-train)")
    pool_traces = pools_of(args.pools)
    names = sorted(pool_traces)
    rows = {n: load_trace(p) for n, p in pool_traces.items()}
    span = min(r[-1].arrival_s for r in rows.values())
    start = args.window_start
    if not 0 <= start < span:
        raise SystemExit(f"--window-start must be within the traces' {span:.0f} s")
    traces = {n: args.out / f"{n}.jsonl" for n in names}
    if not args.reuse:
        for k, n in enumerate(names):
            window = trace_window(rows[n], start, args.window_seconds, args.speedup, args.fit_context,
                                  args.max_output_tokens, args.seed * 101 + k, trace_block=TRACE_BLOCK)
            if not window:
                raise SystemExit(f"pool {n}: no request in trace seconds {start:g}-{start + args.window_seconds:g}; "
                                 "choose another --window-start or a longer --window-seconds")
            write_jsonl(window, traces[n])
    profile = args.out / "profile.cost.json"
    if not profile.is_file():
        subprocess.run([sys.executable, "-m", "switchboard.generator.engine.profile", "--model", str(args.model_dir),
                        "--out", str(profile)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = args.window_seconds / args.speedup
    summary: dict[str, dict] = {}
    for allocator in allocators:
        real_file = args.out / f"real-{allocator}.json"
        if not args.reuse:
            log = args.out / f"stack-{allocator}.log"
            results = {n: args.out / f"real-{allocator}-{n}.json" for n in names}
            print(f"{allocator}: starting the stack", flush=True)
            log_dir = args.out / f"logs-{allocator}"
            with allocating_stack(names, args, allocator, profile, log, log_dir) as (address, metrics_url):
                sampler = ReplicaSampler(metrics_url, names, initial_counts(names, args))
                sampler.thread.start()
                began = time.monotonic()
                procs = [replay(address, n, traces[n], args.model_dir / "tokenizer.json", args, results[n]) for n in names]
                codes = [p.wait() for p in procs]
                sampler.stop.set()
                sampler.thread.join()
                elapsed = time.monotonic() - began
            if any(codes):
                raise RuntimeError(f"a replay failed ({codes}); see {results}")
            total, met = real_score(results, args)
            real = {"requests": total, "met": met, "attainment": met / total if total else 0.0,
                    "seconds": elapsed, "replica_seconds": sampler.replica_seconds,
                    "mean_replicas": sampler.replica_seconds / elapsed,
                    "startup_seconds": startup_seconds(log_dir / "scheduler.log"),
                    "samples": sampler.samples}
            real["attainment_per_replica"] = real["attainment"] / real["mean_replicas"]
            real_file.write_text(json.dumps(real, indent=2) + "\n")
        real = json.loads(real_file.read_text())
        summary[allocator] = {"real": {k: v for k, v in real.items() if k != "samples"}}
        print(f"{allocator}: real SLO {real['attainment']:.1%}, mean replicas {real['mean_replicas']:.2f}", flush=True)
    measured = sorted(t for s in summary.values() for t in s["real"].get("startup_seconds") or [])
    startup = measured[len(measured) // 2] if measured else 10.0  # no scale-up in any run: a guess, said below
    for allocator in allocators:
        summary[allocator]["sim"] = simulate(names, traces, args, allocator, profile, startup, seconds)
    print(f"\nmachine: {machine()}; start-up used by the simulator: {startup:.1f} s "
          f"({f'median of {len(measured)} measured' if measured else 'none measured: assumed'})\n")
    print(f"{'allocator':<10}{'real SLO':>10}{'sim SLO':>10}{'real repl.':>12}{'sim repl.':>11}{'real att./repl.':>17}{'sim att./repl.':>16}")
    for allocator, s in summary.items():
        r, m = s["real"], s["sim"]
        print(f"{allocator:<10}{100 * r['attainment']:>9.1f}%{100 * m['attainment']:>9.1f}%{r['mean_replicas']:>12.2f}"
              f"{m['mean_replicas']:>11.2f}{r['attainment_per_replica']:>17.4f}{m['attainment_per_replica']:>16.4f}")
    (args.out / "allocation_stack.json").write_text(json.dumps(
        {"machine": machine(), "startup_seconds": startup, "window_start": start, "window_seconds": args.window_seconds,
         "speedup": args.speedup, "budget": args.budget, "bounds": [args.min_replicas, args.max_replicas],
         "period": args.period, "cooldown": args.cooldown, "hpa_target": args.hpa_target,
         "keda_target": args.keda_target, "policy_file": str(args.policy_file) if args.policy_file else None,
         "allocators": summary}, indent=2) + "\n")
    print(f"\nwrote {args.out / 'allocation_stack.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
