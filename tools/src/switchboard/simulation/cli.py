"""`switchboard scheduler eval`: every placement policy side by side on held-out trace windows, simulated.

    switchboard scheduler eval                       # Azure conversation trace, demo experts, 4 replicas each
    switchboard scheduler eval --trace my.jsonl --replicas 8 --policies least-loaded,prefix-load
    switchboard scheduler eval --policy learned,prefix-load --policy-file scheduler-train/policy.json
    switchboard scheduler train --seed 0 --minutes 3 --out scheduler-train   # the learned policy (train.py)

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
    parser = subparsers.add_parser("scheduler", help="evaluate (and train) placement policies in the cluster simulator")
    sub = parser.add_subparsers(dest="scheduler_command", metavar="ACTION", required=True)
    ev = sub.add_parser(
        "eval",
        help="replay held-out trace windows in the simulator under every policy and compare them",
        description=__doc__.split("\n\n")[0],
    )
    _add_cluster_args(ev)
    ev.add_argument("--policies", "--policy", dest="policies", default=None,
                    help="comma-separated policy names (default: every heuristic, and learned with --policy-file)")
    ev.add_argument("--policy-file", type=Path, default=None,
                    help="the learned policy's file (from switchboard scheduler train), for the policy 'learned'")
    ev.add_argument("--windows", type=int, default=3, help="held-out windows (default: 3)")
    ev.add_argument("--window-seconds", type=float, default=300.0, help="trace seconds per window (default: 300)")
    ev.add_argument("--seeds", default=None,
                    help="comma-separated seeds: replay the windows once per seed, pooled (default: --seed)")
    ev.add_argument("--baseline", default=None,
                    help="compare every other policy with this one on the same requests: TTFT mean and p99 ratios "
                         "and the attainment difference, with 95%% paired bootstrap intervals (default: prefix-load "
                         "when it is evaluated)")
    ev.add_argument("--out", type=Path, default=Path("scheduler-eval"), help="folder for results.json and plots")
    ev.set_defaults(func=run_eval)
    tr = sub.add_parser(
        "train",
        help="train the learned placement policy in the simulator (behaviour cloning, then policy gradient)",
        description="Train the learned placement policy in the cluster simulator and write its versioned policy file.",
    )
    _add_cluster_args(tr)
    tr.add_argument("--train-window", default=None, metavar="START:END",
                    help="trace seconds training episodes are drawn from (default: the first 60%% of the trace)")
    tr.add_argument("--val-window", default=None, metavar="START:END",
                    help="trace seconds of the validation windows that pick the best policy (default: 60-70%%)")
    tr.add_argument("--eval-window", default=None, metavar="START:END",
                    help="held-out trace seconds scored at the end (default: the last 30%%, as eval's windows)")
    tr.add_argument("--episode-seconds", type=float, default=60.0, help="trace seconds per episode (default: 60)")
    tr.add_argument("--bc-episodes", type=int, default=8, help="episodes of the teacher to clone (default: 8)")
    tr.add_argument("--episodes", type=int, default=None, help="policy-gradient episodes (default: 100 without --minutes)")
    tr.add_argument("--minutes", type=float, default=None, help="stop the policy gradient after this wall-clock budget")
    tr.add_argument("--val-windows", type=int, default=2, help="validation windows (default: 2)")
    tr.add_argument("--eval-every", type=int, default=10, help="validate (and checkpoint) every this many episodes")
    tr.add_argument("--hidden", type=int, default=32, help="hidden units per layer (default: 32)")
    tr.add_argument("--lr", type=float, default=3e-3, help="policy-gradient learning rate (default: 3e-3)")
    tr.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the sampled choices (default: 1)")
    tr.add_argument("--entropy", type=float, default=0.01, help="entropy bonus weight (default: 0.01)")
    tr.add_argument("--bc-weight", type=float, default=0.1,
                    help="weight of the cross-entropy to prefix-load's choice during the policy gradient (default: 0.1)")
    tr.add_argument("--bc-smoothing", type=float, default=0.0, help="label smoothing of behaviour cloning (default: 0)")
    tr.add_argument("--teacher", choices=("prefix-load", "lookahead"), default="prefix-load",
                    help="what cloning imitates: the prefix-load heuristic, or the simulator's look-ahead of each "
                         "candidate (then --dagger-rounds; default: prefix-load)")
    tr.add_argument("--dagger-rounds", type=int, default=0,
                    help="with --teacher lookahead: rounds of episodes placed by the network and labelled by the "
                         "look-ahead, refitting on all labels after each (default: 0)")
    tr.add_argument("--dagger-episodes", type=int, default=4, help="episodes per DAgger round (default: 4)")
    tr.add_argument("--target-temperature", type=float, default=0.05,
                    help="seconds: look-ahead costs become targets softmax(-cost / this) (default: 0.05)")
    tr.add_argument("--workers", type=int, default=1, help="processes for the labelled episodes (default: 1)")
    tr.add_argument("--out", type=Path, default=Path("scheduler-train"),
                    help="folder for policy.json, checkpoints/, learning_curve.png and train.json")
    tr.set_defaults(func=run_train)
    from switchboard.simulation.allocation_cli import add_parsers as add_allocation_parsers

    add_allocation_parsers(sub)


def _add_cluster_args(parser: Any) -> None:
    """The simulated cluster and workload (shared by eval and train)."""
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure CSV or JSONL trace (default: Azure 2023 conversation)")
    parser.add_argument("--experts-config", type=Path, default=None, help="experts config (default: config/experts.yaml)")
    parser.add_argument("--cost-models", type=Path, default=DEFAULT_COST_MODELS,
                        help="folder of <expert>.json step-cost profiles (default: config/cost_models)")
    parser.add_argument("--replicas", type=int, default=4, help="replicas per expert (default: 4)")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this (default: 1)")
    parser.add_argument("--fit-context", type=int, default=None,
                        help="scale token lengths so 99%% of requests fit this context (default: the replicas' max_model_len)")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="clamp output lengths")
    parser.add_argument("--mix", default=None, help="expert shares, name=weight,... (default: equal)")
    parser.add_argument("--prefix-groups", type=int, default=16,
                        help="rows without hash_ids get one of this many shared system prompts (synthetic; 0: none)")
    parser.add_argument("--prefix-tokens", type=int, default=128, help="length of those system prompts (default: 128)")
    parser.add_argument("--step-overhead-ms", type=float, default=0.0,
                        help="added to every predicted step (the engine's per-step cost outside the model; see bench/README.md)")
    parser.add_argument("--dispatch-ms", type=float, default=0.0,
                        help="arrival-to-replica time of a request through gateway, router and scheduler (from the calibration)")
    parser.add_argument("--seed", type=int, default=0)


def _range(text: str | None, default: tuple[float, float], flag: str) -> tuple[float, float]:
    if text is None:
        return default
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"{flag} must be START:END in trace seconds, got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"{flag} must have 0 <= START < END, got {text!r}")
    return lo, hi


def run_train(args: argparse.Namespace) -> int:
    """Train, print the progress and the held-out comparison; 2 on bad input."""
    from dataclasses import replace

    from switchboard.simulation.train import TEACHER, TrainConfig, train

    try:
        setup = _base_setup(args)
        span = setup.rows[-1].arrival_s
        config = TrainConfig(
            setup=replace(setup, window_seconds=args.episode_seconds),
            train_range=_range(args.train_window, (0.0, 0.6 * span), "--train-window"),
            val_range=_range(args.val_window, (0.6 * span, 0.7 * span), "--val-window"),
            eval_range=_range(args.eval_window, (0.7 * span, span), "--eval-window"),
            out=args.out,
            seed=args.seed,
            episode_seconds=args.episode_seconds,
            bc_episodes=args.bc_episodes,
            episodes=args.episodes if args.episodes is not None or args.minutes else 100,
            minutes=args.minutes,
            eval_every=args.eval_every,
            val_windows=args.val_windows,
            hidden=args.hidden,
            lr=args.lr,
            temperature=args.temperature,
            entropy=args.entropy,
            bc_weight=args.bc_weight,
            bc_smoothing=args.bc_smoothing,
            teacher=args.teacher,
            dagger_rounds=args.dagger_rounds,
            dagger_episodes=args.dagger_episodes,
            target_temperature=args.target_temperature,
            workers=args.workers,
        )
        if args.bc_episodes < 1:
            raise ValueError("--bc-episodes must be at least 1")
        if args.dagger_rounds < 0 or args.dagger_episodes < 1 or args.workers < 1:
            raise ValueError("--dagger-rounds must be at least 0, --dagger-episodes and --workers at least 1")
        if args.dagger_rounds and args.teacher != "lookahead":
            raise ValueError("--dagger-rounds needs --teacher lookahead (DAgger labels with the look-ahead)")
        summary = train(config, progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, row in summary["held_out"].items():
        label = f"{name} (teacher)" if name == TEACHER else name
        print(f"held-out {label}: SLO {row['slo_attainment']:.1%}, TTFT mean {1000 * row['ttft_mean']:.0f} ms, "
              f"p99 {1000 * row['ttft_p99']:.0f} ms, reward {row['reward']:.4f} ({row['requests']} requests)")
    for name in ("policy.json", "learning_curve.png", "train.json", "checkpoints"):
        print(f"wrote {args.out / name}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation and print the table; 2 on bad input."""
    try:
        setup, policies, options = _setup(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from switchboard.simulation.evaluate import evaluate
    from switchboard.simulation.plots import write_plots
    from switchboard.simulation.report import render_table

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    from switchboard.scheduler.policies import PREFIX_LOAD

    baseline = args.baseline or (PREFIX_LOAD if PREFIX_LOAD in policies else None)
    if baseline is not None and baseline not in policies:
        print(f"error: the baseline {baseline!r} is not among the evaluated policies ({', '.join(policies)})",
              file=sys.stderr)
        return 2
    windows = setup.windows()
    total = sum(len(w) for w in windows) * (len(seeds) if seeds else 1)
    print(
        f"{len(setup.window_starts)} held-out windows of {setup.window_seconds:g} s from {args.trace.name}"
        f"{f' x {len(seeds)} seeds' if seeds else ''} ({total} requests, speedup {setup.speedup:g}); "
        f"{args.replicas} replicas of each of " + ", ".join(p.expert for p in setup.pools),
        flush=True,
    )
    results = evaluate(setup, policies, None if seeds else windows, options=options, seeds=seeds)
    print(render_table(results))
    means = {r.policy: _mean_ttft(r.records, args.seed) for r in results}
    print("TTFT mean (completed requests, 95% bootstrap CI over requests): " + "; ".join(
        f"{name} {1000 * m:.0f} ms [{1000 * lo:.0f}, {1000 * hi:.0f}]" for name, (m, lo, hi) in means.items()
    ))
    paired = []
    if baseline is not None:
        from switchboard.simulation.paired import compare, render_paired

        base = next(r for r in results if r.policy == baseline)
        paired = [compare(r, base, seed=args.seed) for r in results if r.policy != baseline]
        if paired:
            print(render_paired(paired))
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
        "policy_file": str(args.policy_file) if args.policy_file else None,
        "seeds": list(seeds) if seeds else [args.seed],
        "paired": {c.policy: c.as_dict() for c in paired},
        "policies": {
            r.policy: {
                **r.summary.as_row(),
                "ttft_mean": means[r.policy][0],
                "ttft_mean_ci95": list(means[r.policy][1:]),
                "wall_seconds": r.wall_seconds,
            }
            for r in results
        },
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    for path in write_plots(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _mean_ttft(records: Any, seed: int, resamples: int = 1000) -> tuple[float, float, float]:
    """Mean TTFT (s) of the completed requests and a 95% bootstrap interval (NaN when none)."""
    import numpy as np

    values = np.array([r.ttft for r in records if r.outcome == "ok" and r.ttft is not None])
    if not len(values):
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def _setup(args: argparse.Namespace) -> tuple[Any, list[str], Any]:
    from dataclasses import replace

    from switchboard.scheduler.learned_policy import PolicyFileError, load_policy_file
    from switchboard.scheduler.policies import LEARNED, POLICY_NAMES, SELECTABLE_POLICY_NAMES, PolicyOptions
    from switchboard.simulation.evaluate import LOOKAHEAD, held_out_windows

    default = ",".join(SELECTABLE_POLICY_NAMES if args.policy_file else POLICY_NAMES)
    policies = [p.strip() for p in (args.policies or default).split(",") if p.strip()]
    unknown = [p for p in policies if p not in (*SELECTABLE_POLICY_NAMES, LOOKAHEAD)]
    if unknown:
        raise ValueError(
            f"unknown policies {', '.join(unknown)}; choose from {', '.join(SELECTABLE_POLICY_NAMES)} "
            f"(and {LOOKAHEAD}, the simulator-only oracle)"
        )
    options = PolicyOptions(policy_file=str(args.policy_file or ""))
    if LEARNED in policies:
        if not args.policy_file:
            raise ValueError("the policy 'learned' needs --policy-file (written by switchboard scheduler train)")
        try:
            load_policy_file(args.policy_file)  # fail here rather than evaluate the fallback under its name
        except PolicyFileError as exc:
            raise ValueError(str(exc)) from None
    setup = _base_setup(args)
    starts = held_out_windows(setup.rows, args.windows, args.window_seconds * 1.0)
    return replace(setup, window_starts=tuple(starts), window_seconds=args.window_seconds), policies, options


def _base_setup(args: argparse.Namespace) -> Any:
    """The cluster and the trace of eval and train (no windows chosen yet)."""
    from switchboard.bench.workload import load_trace
    from switchboard.cli.stack import default_experts_config
    from switchboard.common.experts_config import load_experts_config
    from switchboard.simulation.evaluate import EvalSetup, pool_from_profile
    from switchboard.simulation.workload import parse_mix

    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    experts = load_experts_config(Path(args.experts_config or default_experts_config()))
    pools = tuple(
        pool_from_profile(e, args.replicas, args.cost_models / f"{e.name}.json", args.step_overhead_ms) for e in experts
    )
    mix = parse_mix(args.mix) if args.mix else {p.expert: 1.0 for p in pools}
    missing = set(mix) - {p.expert for p in pools}
    if missing:
        raise ValueError(f"--mix names experts not in the experts config: {', '.join(sorted(missing))}")
    rows = load_trace(args.trace)
    if not rows:
        raise ValueError(f"{args.trace}: the trace is empty")
    contexts = [p.spec.max_model_len for p in pools if p.spec.max_model_len]
    fit = args.fit_context if args.fit_context is not None else (min(contexts) if contexts else None)
    return EvalSetup(
        rows=tuple(rows),
        pools=pools,
        mix=mix,
        window_starts=(),
        window_seconds=1.0,
        speedup=args.speedup,
        fit_context=fit,
        max_output_tokens=args.max_output_tokens,
        prefix_groups=args.prefix_groups,
        prefix_tokens=args.prefix_tokens,
        dispatch_seconds=args.dispatch_ms / 1000.0,
        seed=args.seed,
    )
