"""`switchboard scheduler eval`: every placement policy side by side on held-out trace windows, simulated.

    switchboard scheduler eval                       # Azure conversation trace, demo experts, 4 replicas each
    switchboard scheduler eval --trace my.jsonl --replicas 8 --policies least-loaded,prefix-load

Prints one table (SLO attainment, goodput, TTFT/TPOT/E2E p50 and p99, prefix-cache hit rate, load
imbalance, replica-seconds per policy) and writes it as JSON with PNG plots under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The repository root when the tools are installed in place (editable), else the working directory.
_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_TRACE = _ROOT / ".." / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
DEFAULT_COST_MODELS = _ROOT / "config" / "cost_models"


def add_parser(subparsers: Any) -> None:
    """Add the `scheduler` subcommand and its actions."""
    parser = subparsers.add_parser("scheduler", help="evaluate placement policies in the cluster simulator")
    sub = parser.add_subparsers(dest="scheduler_command", metavar="ACTION", required=True)
    ev = sub.add_parser(
        "eval",
        help="replay held-out trace windows in the simulator under every policy and compare them",
        description=__doc__.split("\n\n")[0],
    )
    ev.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure CSV or JSONL trace (default: Azure 2023 conversation)")
    ev.add_argument("--experts-config", type=Path, default=None, help="experts config (default: config/experts.yaml)")
    ev.add_argument("--cost-models", type=Path, default=DEFAULT_COST_MODELS,
                    help="folder of <expert>.json step-cost profiles (default: config/cost_models)")
    ev.add_argument("--replicas", type=int, default=4, help="replicas per expert (default: 4)")
    ev.add_argument("--policies", default=None, help="comma-separated policy names (default: every policy)")
    ev.add_argument("--windows", type=int, default=3, help="held-out windows (default: 3)")
    ev.add_argument("--window-seconds", type=float, default=300.0, help="trace seconds per window (default: 300)")
    ev.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this (default: 1)")
    ev.add_argument("--fit-context", type=int, default=None,
                    help="scale token lengths so 99%% of requests fit this context (default: the replicas' max_model_len)")
    ev.add_argument("--max-output-tokens", type=int, default=None, help="clamp output lengths")
    ev.add_argument("--mix", default=None, help="expert shares, name=weight,... (default: equal)")
    ev.add_argument("--prefix-groups", type=int, default=16,
                    help="rows without hash_ids get one of this many shared system prompts (synthetic; 0: none)")
    ev.add_argument("--prefix-tokens", type=int, default=128, help="length of those system prompts (default: 128)")
    ev.add_argument("--step-overhead-ms", type=float, default=0.0,
                    help="added to every predicted step (the engine's per-step cost outside the model; see bench/README.md)")
    ev.add_argument("--dispatch-ms", type=float, default=0.0,
                    help="arrival-to-replica time of a request through gateway, router and scheduler (from the calibration)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", type=Path, default=Path("scheduler-eval"), help="folder for results.json and plots")
    ev.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation and print the table; 2 on bad input."""
    try:
        setup, policies = _setup(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from switchboard.simulation.evaluate import evaluate
    from switchboard.simulation.plots import write_plots
    from switchboard.simulation.report import render_table

    windows = setup.windows()
    total = sum(len(w) for w in windows)
    print(
        f"{len(setup.window_starts)} held-out windows of {setup.window_seconds:g} s from {args.trace.name}"
        f" ({total} requests, speedup {setup.speedup:g}); {args.replicas} replicas of each of "
        + ", ".join(p.expert for p in setup.pools),
        flush=True,
    )
    results = evaluate(setup, policies, windows)
    print(render_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "trace": str(args.trace),
        "windows": list(setup.window_starts),
        "window_seconds": setup.window_seconds,
        "speedup": setup.speedup,
        "replicas_per_expert": args.replicas,
        "prefix_groups": setup.prefix_groups,
        "prefix_tokens": setup.prefix_tokens,
        "step_overhead_ms": args.step_overhead_ms,
        "dispatch_ms": args.dispatch_ms,
        "policies": {r.policy: {**r.summary.as_row(), "wall_seconds": r.wall_seconds} for r in results},
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    for path in write_plots(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _setup(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from switchboard.bench.workload import load_trace
    from switchboard.cli.stack import default_experts_config
    from switchboard.common.experts_config import load_experts_config
    from switchboard.scheduler.policies import POLICY_NAMES
    from switchboard.simulation.evaluate import EvalSetup, held_out_windows, pool_from_profile
    from switchboard.simulation.workload import parse_mix

    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    policies = [p.strip() for p in (args.policies or ",".join(POLICY_NAMES)).split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICY_NAMES)}")
    experts = load_experts_config(Path(args.experts_config or default_experts_config()))
    pools = tuple(
        pool_from_profile(e, args.replicas, args.cost_models / f"{e.name}.json", args.step_overhead_ms) for e in experts
    )
    mix = parse_mix(args.mix) if args.mix else {p.expert: 1.0 for p in pools}
    missing = set(mix) - {p.expert for p in pools}
    if missing:
        raise ValueError(f"--mix names experts not in the experts config: {', '.join(sorted(missing))}")
    rows = load_trace(args.trace)
    contexts = [p.spec.max_model_len for p in pools if p.spec.max_model_len]
    fit = args.fit_context if args.fit_context is not None else (min(contexts) if contexts else None)
    starts = held_out_windows(rows, args.windows, args.window_seconds * 1.0)
    setup = EvalSetup(
        rows=tuple(rows),
        pools=pools,
        mix=mix,
        window_starts=tuple(starts),
        window_seconds=args.window_seconds,
        speedup=args.speedup,
        fit_context=fit,
        max_output_tokens=args.max_output_tokens,
        prefix_groups=args.prefix_groups,
        prefix_tokens=args.prefix_tokens,
        dispatch_seconds=args.dispatch_ms / 1000.0,
        seed=args.seed,
    )
    return setup, policies
