"""Calibrate the cluster simulator against the real local stack, then check it on a second window.

One command; every process it starts is stopped when it ends:

    .venv/bin/python bench/calibrate_simulator.py              # bard-small, 2 replicas, two policies

1. Shapes two windows of the Azure LLM inference trace 2023, conversation (Patel et al.,
   "Splitwise", ISCA 2024, CC-BY 4.0) as `switchboard bench` would (lengths scaled to fit the
   expert's 512-token context, outputs capped), gives every prompt one of 16 shared 128-token
   system prompts (synthetic, as `switchboard scheduler eval` does: the trace has no content),
   and writes each as a JSONL trace with `hash_ids`, so the real replay and the simulator get the
   very same requests: the fit window, and a check window later in the trace at a higher load.
2. Profiles the expert's step cost with the generators' settings (OMP_NUM_THREADS=1 per replica,
   so two replicas do not fight over the 2 cores; the profile is written next to the results).
3. For each policy: starts the local stack (`switchboard up`, one expert, --replicas generators,
   SCHEDULER_PLACEMENT_POLICY=policy, the profile as GENERATOR_COST_PROFILE) and replays both
   windows with `switchboard bench run`.
4. Fits the simulator's two free parameters on the fit window of the first policy: the engine's
   per-step cost outside the model (real TPOT p50 minus simulated) and the dispatch time of a
   request through gateway, router and scheduler (real TTFT p50 minus simulated). Then
   simulates every (policy, window) with those and prints TTFT and E2E p50/p90, real against
   simulated, with the relative error. The check window and the second policy are out of sample.
5. Prints every policy against the first, real and simulated side by side, on each window: the
   ratios of TTFT mean and p99 and the SLO attainment over every request (`--slo-ttft`,
   `--slo-tpot`, also written into the stack's experts config): whether the two systems agree in
   direction. `learned` needs `--policy-file` (from `switchboard scheduler train`): the scheduler
   loads it as SCHEDULER_POLICY_FILE and the simulator the same file.

Results (JSON, the traces, the bench results, the stack logs) go under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench_common import machine, switchboard_up, trace_window, write_jsonl
from switchboard.bench.records import STATUS_OK
from switchboard.bench.results import read_results, records_of
from switchboard.bench.workload import TraceRequest, load_jsonl, load_trace
from switchboard.common.experts_config import ExpertSLO, ExpertSpec
from switchboard.scheduler.policies import PolicyOptions, make_policy
from switchboard.scheduler.slo import judge
from switchboard.simulation.cluster import SimConfig, Simulation
from switchboard.simulation.evaluate import pool_from_profile
from switchboard.simulation.metrics import quantile
from switchboard.simulation.workload import from_trace

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRACE = ROOT / ".." / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
TRACE_BLOCK = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expert", default="bard-small")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="serve this model folder as --expert instead of the demo expert (e.g. bench/make_random_llama.py's)")
    p.add_argument("--fit-context", type=int, default=512, help="scale lengths so 99%% fit this context")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policies", default="least-loaded,prefix-load")
    p.add_argument("--fit-window", default="0:120", help="start:seconds of the trace (default 0:120)")
    p.add_argument("--fit-speedup", type=float, default=1.0)
    p.add_argument("--check-window", default="1200:60", help="start:seconds (default 1200:60)")
    p.add_argument("--check-speedup", type=float, default=2.0)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--prefix-groups", type=int, default=16, help="shared system prompts (synthetic)")
    p.add_argument("--prefix-tokens", type=int, default=128)
    p.add_argument("--policy-file", type=Path, default=None,
                   help="the learned placement policy (switchboard scheduler train) for the policy 'learned'")
    p.add_argument("--slo-ttft", type=float, default=1.5, help="the expert's TTFT objective, seconds (default 1.5)")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="the expert's TPOT objective, seconds (default 0.2)")
    p.add_argument("--kv-cache-mb", type=int, default=0, help="GENERATOR_KV_CACHE_MB of the replicas (0: default)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the traces, the profile and every policy's real runs already under --out; run only "
                        "the policies that have none (e.g. one added to --policies), then simulate")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration")
    return p.parse_args()


def window(rows: list[TraceRequest], spec: str, speedup: float, args: argparse.Namespace, seed: int) -> list[TraceRequest]:
    start, seconds = (float(x) for x in spec.split(":"))
    return trace_window(rows, start, seconds, speedup, args.fit_context, args.max_output_tokens, seed,
                        args.prefix_groups, args.prefix_tokens, TRACE_BLOCK)


@contextlib.contextmanager
def local_stack(expert: str, model: Path, replicas: int, policy: str, profile: Path, log: Path, slo: ExpertSLO,
                kv_cache_mb: int = 0, policy_file: Path | None = None) -> Iterator[str]:
    """`switchboard up` with `replicas` generators of one expert under `policy`; yields the gateway address."""
    folder = Path(tempfile.mkdtemp())
    config = folder / "experts.yaml"
    config.write_text(
        "experts:\n"
        f"  - name: {expert}\n"
        f"    description: the {expert} demo expert, alone, for the simulator's calibration\n"
        f"    model: {model}\n"
        "    relative_cost: 1.0\n"
        f"    replicas: {replicas}\n"
        # The objectives the simulator scores and predicted-latency's (and the learned policy's)
        # headroom features read: the same on both sides.
        f"    slo:\n      ttft_seconds: {slo.ttft_seconds}\n      tpot_seconds: {slo.tpot_seconds}\n"
    )
    # The stack finds <config folder>/cost_models/<expert>.json: the profile measured here.
    (folder / "cost_models").mkdir()
    (folder / "cost_models" / f"{expert}.json").write_text(profile.read_text())
    env = {"SCHEDULER_PLACEMENT_POLICY": policy, "OMP_NUM_THREADS": "1"}
    if policy_file is not None:
        env["SCHEDULER_POLICY_FILE"] = str(policy_file.resolve())
    if kv_cache_mb:
        env["GENERATOR_KV_CACHE_MB"] = str(kv_cache_mb)
    # One expert, requests pinned to it: no learned gate to build or consult.
    with switchboard_up(config, log, args=["--no-gate"], env=env, ready_timeout_s=600) as address:
        yield address


def replay(address: str, trace: Path, tokenizer: Path, expert: str, out: Path) -> list:
    command = [str(VENV_BIN / "switchboard"), "bench", "run", "--target", f"grpc://{address}", "--model", expert,
               "--tokenizer", str(tokenizer), "--trace", str(trace), "--block-size", str(TRACE_BLOCK),
               "--temperature", "0", "--timeout", "60", "--out", str(out)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return [r for r in records_of(read_results(out)) if r.status == STATUS_OK]


def simulate(trace: Path, expert: str, replicas: int, profile: Path, policy: str, overhead_ms: float,
             dispatch: float | tuple[float, ...], slo: ExpertSLO, kv_blocks: int = 0,
             policy_file: Path | None = None) -> list:
    """The simulator's records of every request of `trace` (ok or not), in the trace's order."""
    rows = load_jsonl(trace)
    requests = from_trace(rows, lambda _row: expert)
    pool = pool_from_profile(ExpertSpec(name=expert, description="", model=expert, slo=slo), replicas, profile,
                             overhead_ms)
    if kv_blocks:
        pool = dataclasses.replace(pool, spec=dataclasses.replace(pool.spec, num_blocks=kv_blocks))
    samples = dispatch if isinstance(dispatch, tuple) else ()
    constant = 0.0 if samples else float(dispatch)  # type: ignore[arg-type]
    config = SimConfig((pool,), trace_block_size=TRACE_BLOCK, dispatch_seconds=constant, dispatch_samples=samples)
    options = PolicyOptions(policy_file=str(policy_file)) if policy_file is not None else None
    placement = make_policy(policy, slos={expert: slo}, options=options)
    return list(Simulation(config, placement).run(requests).records)


def direction(rows: list[tuple[bool, float | None, float | None, int]], slo: ExpertSLO) -> dict[str, float]:
    """(ok, TTFT, E2E, output tokens) of every request -> TTFT mean and p99 of those that got a
    first token, and SLO attainment over all of them (a failed request is a miss)."""
    ttft = [t for ok, t, _, _ in rows if ok and t is not None]
    met = sum(1 for ok, t, e, n in rows
              if ok and t is not None and e is not None and judge(slo, True, t, e, n).good)
    return {"ttft_mean": sum(ttft) / max(len(ttft), 1), "ttft_p99": quantile(ttft, 0.99),
            "attainment": met / max(len(rows), 1)}


def stats(rows: list[tuple[float, float, int]]) -> dict[str, float]:
    """(TTFT, E2E, output tokens) per request -> quantiles, and the mean time per token after the
    first, weighted by tokens (what E2E adds up, unlike the TPOT median)."""
    ttft = [t for t, _, _ in rows]
    e2e = [e for _, e, _ in rows]
    decode = sum(e - t for t, e, n in rows if n > 1)
    tokens = sum(n - 1 for _, _, n in rows if n > 1)
    return {"ttft_p50": quantile(ttft, 0.5), "ttft_p90": quantile(ttft, 0.9), "ttft_p99": quantile(ttft, 0.99),
            "e2e_p50": quantile(e2e, 0.5), "e2e_p90": quantile(e2e, 0.9), "token_s": decode / max(tokens, 1)}


def ok_records(path: Path) -> list:
    return [r for r in records_of(read_results(path)) if r.status == STATUS_OK]


def real_stats(records: list) -> dict[str, float]:
    return stats([(r.ttft, r.e2e, r.output_tokens) for r in records])


def sim_stats(records: list) -> dict[str, float]:
    return stats([(r.ttft, r.e2e, r.generated) for r in records if r.outcome == "ok"])


def real_direction(path: Path, slo: ExpertSLO) -> dict[str, float]:
    return direction([(r.status == STATUS_OK, r.ttft, r.e2e, r.output_tokens) for r in records_of(read_results(path))],
                     slo)


def sim_direction(records: list, slo: ExpertSLO) -> dict[str, float]:
    return direction([(r.outcome == "ok", r.ttft, r.e2e, r.generated) for r in records], slo)


def print_direction(policies: list[str], windows: list[str], reals: dict, sims: dict) -> None:
    """Every policy against the first on each window, real and simulated: TTFT mean and p99 ratios
    (first / policy: above 1 means the policy is faster) and SLO attainment (every request)."""
    print(f"\ndirection against {policies[0]} (ratio {policies[0]} / policy; attainment over every request):")
    print(f"{'policy':<18} {'window':<6} {'TTFT mean ratio real / sim':>28} {'TTFT p99 ratio real / sim':>28} "
          f"{'attainment real / sim':>24}")
    for policy in policies:
        for name in windows:
            cells = []
            for metric in ("ttft_mean", "ttft_p99"):
                r = reals[(policies[0], name)][metric] / max(reals[(policy, name)][metric], 1e-9)
                s = sims[(policies[0], name)][metric] / max(sims[(policy, name)][metric], 1e-9)
                cells.append(f"{r:.3f}x / {s:.3f}x")
            att = f"{reals[(policy, name)]['attainment']:.1%} / {sims[(policy, name)]['attainment']:.1%}"
            print(f"{policy:<18} {name:<6} {cells[0]:>28} {cells[1]:>28} {att:>24}")


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from switchboard.experts import ensure_experts

    model = args.model_dir.resolve() if args.model_dir else ensure_experts([args.expert])[args.expert]
    rows = load_trace(TRACE)
    traces = {}
    for name, spec, speedup, seed in (("fit", args.fit_window, args.fit_speedup, 1),
                                      ("check", args.check_window, args.check_speedup, 2)):
        traces[name] = args.out / f"{name}.jsonl"
        if not args.reuse:
            write_jsonl(window(rows, spec, speedup, args, seed), traces[name])
    profile = args.out / f"{args.expert}.cost.json"
    if not args.reuse:
        kv = ["--kv-cache-bytes", str(args.kv_cache_mb << 20)] if args.kv_cache_mb else []
        subprocess.run([sys.executable, "-m", "switchboard.generator.engine.profile", "--model", str(model),
                        "--out", str(profile), *kv], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    kv_blocks = 0  # the profile's pool: measured with the replicas' own KV-cache size
    policies = [p for p in args.policies.split(",") if p]
    if "learned" in policies and args.policy_file is None:
        raise SystemExit("the policy 'learned' needs --policy-file (from switchboard scheduler train)")
    slo = ExpertSLO(ttft_seconds=args.slo_ttft, tpot_seconds=args.slo_tpot)
    real: dict[tuple[str, str], dict] = {}
    for policy in policies:
        runs = {name: args.out / f"real-{policy}-{name}.json" for name in traces}
        if args.reuse and all(path.exists() for path in runs.values()):
            for name, path in runs.items():
                real[(policy, name)] = real_stats(ok_records(path))
            continue
        log = args.out / f"stack-{policy}.log"
        with local_stack(args.expert, model, args.replicas, policy, profile, log, slo, args.kv_cache_mb,
                         args.policy_file) as addr:
            for name, trace in traces.items():
                recs = replay(addr, trace, model / "tokenizer.json", args.expert, args.out / f"real-{policy}-{name}.json")
                real[(policy, name)] = real_stats(recs)
    # Fit on (first policy, fit window): the per-step overhead from the mean time per token after
    # the first; then the dispatch time of each request as its real TTFT minus its simulated one
    # (with no dispatch), an empirical distribution the simulator draws from.
    first = (policies[0], "fit")
    fit = traces["fit"]
    def sim(trace: Path, policy: str, overhead: float, dispatch: float | tuple[float, ...]) -> list:
        return simulate(trace, args.expert, args.replicas, profile, policy, overhead, dispatch, slo, kv_blocks,
                        args.policy_file)

    base = sim_stats(sim(fit, policies[0], 0.0, 0.0))
    overhead_ms = max(0.0, 1000 * (real[first]["token_s"] - base["token_s"]))
    stepped = [r for r in sim(fit, policies[0], overhead_ms, 0.0) if r.ttft is not None]
    measured = {r.index: r.ttft for r in ok_records(args.out / f"real-{policies[0]}-fit.json")}
    residuals = tuple(sorted(max(0.0, measured[r.index] - r.ttft) for r in stepped if r.index in measured))
    dispatch_s = quantile(residuals, 0.5)
    print(f"\nmachine: {machine()}")
    print(f"fitted on {first}: step overhead {overhead_ms:.2f} ms; dispatch drawn from {len(residuals)} samples,"
          f" p50 {1000 * dispatch_s:.1f} ms, p90 {1000 * quantile(residuals, 0.9):.1f} ms\n")
    table = []
    header = f"{'policy':<14} {'window':<6} " + " ".join(f"{m:>26}" for m in ("TTFT p50", "TTFT p90", "E2E p50", "E2E p90"))
    print(header + "\n" + "-" * len(header))
    sims: dict[tuple[str, str], dict[str, float]] = {}
    reals: dict[tuple[str, str], dict[str, float]] = {}
    for policy in policies:
        for name, trace in traces.items():
            records = sim(trace, policy, overhead_ms, residuals)
            sims[(policy, name)] = sim_direction(records, slo)
            reals[(policy, name)] = real_direction(args.out / f"real-{policy}-{name}.json", slo)
            sim_ = sim_stats(records)
            cells = []
            row = {"policy": policy, "window": name, "real_ttft_p99_ms": 1000 * real[(policy, name)]["ttft_p99"],
                   "sim_ttft_p99_ms": 1000 * sim_["ttft_p99"]}
            for metric in ("ttft_p50", "ttft_p90", "e2e_p50", "e2e_p90"):
                r, s = real[(policy, name)][metric], sim_[metric]
                err = (s - r) / r
                row[metric] = {"real_ms": 1000 * r, "sim_ms": 1000 * s, "rel_error": err}
                cells.append(f"{1000 * r:7.1f} vs {1000 * s:7.1f} ({100 * err:+5.1f}%)")
            table.append(row)
            print(f"{policy:<14} {name:<6} " + " ".join(f"{c:>26}" for c in cells))
    print_direction(policies, list(traces), reals, sims)
    (args.out / "calibration.json").write_text(json.dumps(
        {"machine": machine(), "step_overhead_ms": overhead_ms, "dispatch_p50_seconds": dispatch_s,
         "dispatch_p90_seconds": quantile(residuals, 0.9),
         "windows": {"fit": [args.fit_window, args.fit_speedup], "check": [args.check_window, args.check_speedup]},
         "replicas": args.replicas, "expert": args.expert, "rows": table,
         "slo": {"ttft_seconds": slo.ttft_seconds, "tpot_seconds": slo.tpot_seconds},
         "direction": [{"policy": p, "window": w, "real": reals[(p, w)], "sim": sims[(p, w)]}
                       for p in policies for w in traces]}, indent=2) + "\n")
    print(f"\nwrote {args.out / 'calibration.json'} (real ms vs simulated ms, relative error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
