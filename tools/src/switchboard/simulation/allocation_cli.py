"""`switchboard scheduler alloc-eval` and `alloc-train`: replica allocation across expert pools, simulated.

    switchboard scheduler alloc-train --seed 0 --iterations 10 --out alloc-train
    switchboard scheduler alloc-eval --policy-file alloc-train/allocation.json --seeds 0,1 --windows 3

Each pool replays its own trace (`--pool NAME=TRACE`, default: chat = Azure conversation, code =
Azure code), every pool's replicas have the cost profile `--cost-profile`, and the allocator sets
each pool's replica count out of `--budget` every `--period` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[4]
_TRACES = _ROOT / ".." / "shared" / "data" / "traces"
DEFAULT_POOLS = f"chat={_TRACES / 'azure_llm_2023_conv.csv'},code={_TRACES / 'azure_llm_2023_code.csv'}"
DEFAULT_PROFILE = _ROOT / "bench" / "sim" / "cost_models" / "chat-half-b.json"


def add_parsers(sub: Any) -> None:
    """Add `alloc-eval` and `alloc-train` under `switchboard scheduler`."""
    ev = sub.add_parser("alloc-eval", help="compare replica allocators (static, proportional, hpa, keda, learned) "
                        "on held-out windows of real traces, simulated")
    _common(ev)
    ev.add_argument("--allocators", default=None,
                    help="comma-separated (default: static,proportional,hpa,keda, and learned with --policy-file); "
                         "hpa@TOKENS and keda@QUEUE run a baseline at another target (tuned baselines)")
    ev.add_argument("--policy-file", type=Path, default=None, help="the learned allocator's file (alloc-train)")
    ev.add_argument("--windows", type=int, default=3, help="held-out windows (default: 3)")
    ev.add_argument("--window-seconds", type=float, default=300.0, help="trace seconds per window (default: 300)")
    ev.add_argument("--seeds", default="0", help="comma-separated seeds (synthetic prefixes, heartbeat phases)")
    ev.add_argument("--out", type=Path, default=Path("alloc-eval"), help="folder for results.json")
    ev.set_defaults(func=run_alloc_eval)
    tr = sub.add_parser("alloc-train", help="train the learned allocator in the simulator (cross-entropy method, torch)")
    _common(tr)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--train-window", default=None, metavar="START:END", help="default: the first 60%% of the traces")
    tr.add_argument("--val-window", default=None, metavar="START:END", help="default: 60-70%%")
    tr.add_argument("--episode-seconds", type=float, default=300.0)
    tr.add_argument("--episodes-per-candidate", type=int, default=2)
    tr.add_argument("--population", type=int, default=12)
    tr.add_argument("--elites", type=int, default=3)
    tr.add_argument("--iterations", type=int, default=None, help="CEM iterations (default: 10 without --minutes)")
    tr.add_argument("--minutes", type=float, default=None, help="stop after this wall-clock budget")
    tr.add_argument("--val-windows", type=int, default=2)
    tr.add_argument("--hidden", type=int, default=8, help="hidden units (default: 8; 0: a linear policy)")
    tr.add_argument("--init-std", type=float, default=0.3, help="CEM's initial spread around the hpa start (default: 0.3)")
    tr.add_argument("--workers", type=int, default=1, help="processes scoring the candidates (default: 1)")
    tr.add_argument("--out", type=Path, default=Path("alloc-train"),
                    help="folder for allocation.json, checkpoints/, allocation_learning_curve.png, train_allocation.json")
    tr.set_defaults(func=run_alloc_train)


def _common(p: Any) -> None:
    p.add_argument("--pool", dest="pools", default=DEFAULT_POOLS, help="NAME=TRACE,... one trace per pool")
    p.add_argument("--cost-profile", type=Path, default=DEFAULT_PROFILE, help="step-cost profile of every replica")
    p.add_argument("--ttft-slo", type=float, default=1.5, help="TTFT objective, seconds (default: 1.5)")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="TPOT objective, seconds (default: 0.2)")
    p.add_argument("--budget", type=int, default=12, help="replicas shared by all pools (default: 12)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=10)
    p.add_argument("--period", type=float, default=10.0, help="control period, seconds (default: 10)")
    p.add_argument("--cooldown", type=float, default=60.0, help="scale-down cool-down, seconds (default: 60)")
    p.add_argument("--startup-seconds", type=float, default=30.0, help="a new replica's start-up delay (default: 30)")
    p.add_argument("--hpa-target", type=float, default=1000.0, help="HPA target tokens/s per replica (default: 1000)")
    p.add_argument("--hpa-tolerance", type=float, default=0.1)
    p.add_argument("--keda-target", type=float, default=4.0, help="KEDA target requests per replica (default: 4)")
    p.add_argument("--cost-per-replica", type=float, default=0.02,
                   help="reward cost per mean replica (replica-seconds / seconds) (default: 0.02)")
    p.add_argument("--initial", choices=("split", "min"), default="split",
                   help="replicas at the start: the budget split equally (default) or each pool's minimum "
                        "(as a local stack starts, bench/allocation_stack_bench.py)")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--fit-context", type=int, default=None,
                   help="scale lengths so 99%% fit this context (default: the profile's max_model_len)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap every request's output (default: none)")
    p.add_argument("--step-overhead-ms", type=float, default=1.69)
    p.add_argument("--dispatch-ms", type=float, default=15.2)


def build_setup(args: argparse.Namespace) -> Any:
    """The `AllocSetup` the arguments describe."""
    from switchboard.bench.workload import load_trace
    from switchboard.common.experts_config import ExpertSLO
    from switchboard.replica.cost_model import CostModel
    from switchboard.scheduler.allocation import AllocationConfig, PoolBounds
    from switchboard.simulation.allocation_run import AllocSetup
    from switchboard.simulation.cluster import PoolSpec
    from switchboard.simulation.replica import ReplicaSpec

    try:
        data = json.loads(Path(args.cost_profile).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.cost_profile}: not JSON ({exc.msg})") from None
    cost = CostModel.from_profile(data)
    spec = ReplicaSpec(
        num_blocks=int(data.get("kv_blocks_total") or 4096), block_size=int(data.get("block_size") or 16),
        max_num_seqs=int(data.get("max_num_seqs") or 64), max_tokens_per_step=int(data.get("max_tokens_per_step") or 512),
        max_model_len=int(data.get("max_model_len") or 0),
    )
    slo = ExpertSLO(ttft_seconds=args.ttft_slo, tpot_seconds=args.tpot_slo)
    pools, traces = [], {}
    for part in filter(None, (x.strip() for x in args.pools.split(","))):
        name, sep, trace = part.partition("=")
        if not sep or not name or not trace:
            raise ValueError(f"--pool wants NAME=TRACE, got {part!r}")
        rows = load_trace(Path(trace))
        if not rows:
            raise ValueError(f"{trace}: the trace is empty")
        traces[name] = tuple(rows)
        pools.append(PoolSpec(name, 0, cost, spec, slo, args.step_overhead_ms, startup_seconds=args.startup_seconds,
                              model_identity=name))
    if len(pools) < 2:
        raise ValueError("allocation needs at least two pools (--pool a=TRACE,b=TRACE)")
    alloc = AllocationConfig(
        budget=args.budget, bounds={p.expert: PoolBounds(args.min_replicas, args.max_replicas) for p in pools},
        period_seconds=args.period, scale_down_cooldown_seconds=args.cooldown,
        hpa_target_tokens_per_replica=args.hpa_target, hpa_tolerance=args.hpa_tolerance,
        keda_target_queue=args.keda_target,
    )
    return AllocSetup(tuple(pools), traces, alloc, speedup=args.speedup,
                      fit_context=args.fit_context or spec.max_model_len or None, max_output_tokens=args.max_output_tokens,
                      dispatch_seconds=args.dispatch_ms / 1000.0, cost_per_replica=args.cost_per_replica,
                      initial_counts={p.expert: args.min_replicas for p in pools} if args.initial == "min" else None)


def run_alloc_eval(args: argparse.Namespace) -> int:
    from switchboard.scheduler.allocation import ALLOCATOR_NAMES, AllocationPolicyError, load_allocation_file
    from switchboard.simulation.allocation_run import compare, held_out_starts, render, render_paired, variant

    try:
        setup = build_setup(args)
        default = "static,proportional,hpa,keda" + (",learned" if args.policy_file else "")
        names = [n.strip() for n in (args.allocators or default).split(",") if n.strip()]
        unknown = [n for n in names if n.partition("@")[0] not in ALLOCATOR_NAMES]
        if unknown:
            raise ValueError(f"unknown allocators {', '.join(unknown)}; choose from {', '.join(ALLOCATOR_NAMES)}")
        for name in names:
            variant(setup, name)  # a bad target is an error here, not a traceback mid-comparison
        if "learned" in names:
            if not args.policy_file:
                raise ValueError("the allocator 'learned' needs --policy-file (written by switchboard scheduler alloc-train)")
            try:
                load_allocation_file(args.policy_file)  # evaluate the real thing, not its fallback under its name
            except AllocationPolicyError as exc:
                raise ValueError(str(exc)) from None
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        starts = held_out_starts(setup, args.windows, args.window_seconds)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(starts)} held-out windows of {args.window_seconds:g} s x seeds {seeds}; budget {args.budget} "
          f"replicas over {', '.join(p.expert for p in setup.pools)}; start-up {args.startup_seconds:g} s", flush=True)
    results = compare(setup, names, starts, args.window_seconds, seeds, args.policy_file,
                      progress=lambda line: print(line, flush=True))
    print(render(results))
    paired = render_paired(results)
    if paired:
        print("\n" + paired)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"windows": starts, "window_seconds": args.window_seconds, "seeds": seeds, "budget": args.budget,
               "pools": args.pools, "startup_seconds": args.startup_seconds, "period": args.period,
               "cooldown": args.cooldown, "policy_file": str(args.policy_file) if args.policy_file else None,
               "allocators": results}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 0


def run_alloc_train(args: argparse.Namespace) -> int:
    from switchboard.simulation.allocation_run import AllocTrainConfig, train_allocation
    from switchboard.simulation.cli import _range

    try:
        setup = build_setup(args)
        span = setup.span
        config = AllocTrainConfig(
            setup=setup,
            train_range=_range(args.train_window, (0.0, 0.6 * span), "--train-window"),
            val_range=_range(args.val_window, (0.6 * span, 0.7 * span), "--val-window"),
            out=args.out, seed=args.seed, episode_seconds=args.episode_seconds,
            episodes_per_candidate=args.episodes_per_candidate, population=args.population, elites=args.elites,
            iterations=args.iterations if args.iterations is not None or args.minutes else 10,
            minutes=args.minutes, val_windows=args.val_windows, hidden=args.hidden,
            init_std=args.init_std, workers=args.workers,
        )
        if args.workers < 1 or args.init_std <= 0 or args.hidden < 0:
            raise ValueError("need --workers >= 1, --init-std > 0 and --hidden >= 0")
        if args.elites < 1 or args.population < args.elites:
            raise ValueError("need 1 <= --elites <= --population")
        summary = train_allocation(config, progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best validation reward {summary['val_best']:.4f} (hpa {summary['val_hpa']:.4f})")
    for name in ("allocation.json", "allocation_learning_curve.png", "train_allocation.json", "checkpoints"):
        print(f"wrote {args.out / name}")
    return 0
