"""Compare placement policies on held-out trace windows in the simulator: one table, one run.

`evaluate(setup, policies)` replays every window once per policy on the same simulated cluster
(same replicas, cost models, SLOs and requests) and scores each policy over all its windows
pooled (`metrics.summarize`). The windows are held out: they come from the last part of the trace
(`HELD_OUT_FRACTION` of its time span), the part a learned policy is not trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from switchboard.bench.transform import WorkloadShape, shape
from switchboard.bench.workload import TraceRequest
from switchboard.common.experts_config import ExpertSpec
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.policies import PREFIX_LOAD, PlacementPolicy, PolicyOptions, make_policy
from switchboard.simulation.cluster import PoolSpec, SimConfig, SimResult, Simulation, policy_factory
from switchboard.simulation.metrics import RunSummary, good, summarize
from switchboard.simulation.replica import ReplicaSpec, SimRecord
from switchboard.simulation.workload import SimRequest, assign_shared_prefixes, expert_mix, from_trace

# The last 30% of a trace's time span is held out from training (issue 17 trains on the rest).
HELD_OUT_FRACTION = 0.3


def held_out_windows(
    rows: Sequence[TraceRequest], count: int, seconds: float, fraction: float = HELD_OUT_FRACTION
) -> list[float]:
    """Start times of `count` windows of `seconds` spread evenly over the held-out part of the trace."""
    if count < 1 or seconds <= 0 or not 0 < fraction <= 1:
        raise ValueError("need count >= 1, seconds > 0 and 0 < fraction <= 1")
    if not rows:
        raise ValueError("the trace is empty")
    span = rows[-1].arrival_s
    start = span * (1 - fraction)
    room = span - start - seconds
    if room < 0:
        raise ValueError(
            f"a {seconds:g} s window does not fit the held-out {span - start:.0f} s of this trace; use shorter windows"
        )
    if count == 1:
        return [start]
    return [start + room * i / (count - 1) for i in range(count)]


def pool_from_profile(
    expert: ExpertSpec, replicas: int, profile_path: Path, step_overhead_ms: float = 0.0
) -> PoolSpec:
    """A pool of `replicas` replicas of `expert`, each with the engine settings and cost of its profile JSON."""
    try:
        data = json.loads(profile_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no cost profile for expert {expert.name!r} at {profile_path}; write one with "
            f"python -m switchboard.generator.engine.profile --model DIR --out {profile_path}"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{profile_path}: not JSON ({exc.msg})") from None
    cost = CostModel.from_profile(data)
    spec = ReplicaSpec(
        num_blocks=int(data.get("kv_blocks_total") or 4096),
        block_size=int(data.get("block_size") or 16),
        max_num_seqs=int(data.get("max_num_seqs") or 64),
        max_tokens_per_step=int(data.get("max_tokens_per_step") or 512),
        max_model_len=int(data.get("max_model_len") or 0),
    )
    return PoolSpec(expert.name, replicas, cost, spec, expert.slo, step_overhead_ms, model_identity=expert.name)


@dataclass(frozen=True)
class EvalSetup:
    """What every policy is evaluated on."""

    rows: tuple[TraceRequest, ...]  # the whole trace
    pools: tuple[PoolSpec, ...]
    mix: dict[str, float]  # expert -> share of the requests
    window_starts: tuple[float, ...]
    window_seconds: float
    speedup: float = 1.0
    fit_context: int | None = None  # scale lengths to fit this context (the bench's --fit-context)
    max_output_tokens: int | None = None
    prefix_groups: int = 0  # > 0: give rows without hash_ids a shared system prompt (synthetic)
    prefix_tokens: int = 0
    trace_block_size: int = 64
    heartbeat_seconds: float = 1.0
    dispatch_seconds: float = 0.0
    seed: int = 0

    def windows(self) -> list[list[SimRequest]]:
        """The simulated requests of every window (the same for every policy)."""
        out = []
        for i, start in enumerate(self.window_starts):
            spec = WorkloadShape(
                window_start_s=start,
                window_duration_s=self.window_seconds,
                speedup=self.speedup,
                fit_context=self.fit_context,
                max_output_tokens=self.max_output_tokens,
            )
            rows, _report = shape(list(self.rows), spec)
            if self.prefix_groups > 0:
                rows = assign_shared_prefixes(
                    rows, self.prefix_groups, self.prefix_tokens, self.trace_block_size, seed=self.seed + i
                )
            out.append(from_trace(rows, expert_mix(self.mix, seed=self.seed + i)))
        return out

    def config(self) -> SimConfig:
        return SimConfig(
            self.pools,
            heartbeat_seconds=self.heartbeat_seconds,
            trace_block_size=self.trace_block_size,
            seed=self.seed,
            dispatch_seconds=self.dispatch_seconds,
        )


@dataclass
class PolicyResult:
    """One policy's runs over every window, and their pooled score."""

    policy: str
    summary: RunSummary
    records: list[SimRecord] = field(repr=False)
    wall_seconds: float = 0.0
    met: list[bool] = field(default_factory=list, repr=False)  # per record: met its objectives


# A simulator-only reference row: the look-ahead oracle (`lookahead.py`), which reads the replicas'
# exact state; no scheduler can run it. About 50x slower than a heuristic.
LOOKAHEAD = "lookahead"


def _factory(name: str, seed: int, slos: dict, options: PolicyOptions | None) -> Callable[[], PlacementPolicy]:
    """Fresh policies for each run (a cursor or an RNG is per run); fails now on an unknown name."""
    if name == LOOKAHEAD:
        from switchboard.simulation.lookahead import LookaheadPolicy

        base = _factory(PREFIX_LOAD, seed, slos, options)
        return lambda: LookaheadPolicy(base())
    if options is None:
        return policy_factory(name, seed, slos)
    make_policy(name, seed, slos=slos, options=options)
    return lambda: make_policy(name, seed, slos=slos, options=options)


def evaluate(
    setup: EvalSetup,
    policies: Sequence[str],
    windows: Sequence[Sequence[SimRequest]] | None = None,
    options: PolicyOptions | None = None,
    seeds: Sequence[int] | None = None,
) -> list[PolicyResult]:
    """Run every window (default: `setup.windows()`) under every policy; one pooled summary per policy.

    `options` configure the policies as the scheduler's settings do (e.g. `policy_file` for `learned`).
    `seeds`: run the windows once per seed (each its own expert draws, system-prompt assignment and
    cluster timing: `setup` with that seed; `windows` must then be None), pooled. Every policy's
    records come in the same order (seed, window, arrival), so two policies' records pair up.
    """
    import time

    if seeds is not None and windows is not None:
        raise ValueError("give windows or seeds, not both")
    runs = (
        [(setup, list(windows if windows is not None else setup.windows()))]
        if seeds is None
        else [(s, s.windows()) for s in (replace(setup, seed=seed) for seed in seeds)]
    )
    slos = {p.expert: p.slo for p in setup.pools}
    out: list[PolicyResult] = []
    for name in policies:
        results: list[SimResult] = []
        started = time.perf_counter()
        for run_setup, run_windows in runs:
            make = _factory(name, run_setup.seed, slos, options)
            config = run_setup.config()
            for requests in run_windows:
                results.append(Simulation(config, make()).run(requests))
        wall = time.perf_counter() - started
        out.append(PolicyResult(
            name,
            pooled_summary(results),
            [r for res in results for r in res.records],
            wall,
            [good(res, r) for res in results for r in res.records],
        ))
    return out


def pooled_summary(results: Sequence[SimResult]) -> RunSummary:
    """One summary over several runs: their records together, replica-seconds and spans summed,
    imbalance the worst run's."""
    if len(results) == 1:
        return summarize(results[0])
    merged = SimResult(
        records=[r for res in results for r in res.records],
        replicas={},
        lifetimes={},
        end_time=0.0,
        slos=results[0].slos,
    )
    base = summarize(merged)
    parts = [summarize(res) for res in results]
    span = sum(p.span_seconds for p in parts)
    good = base.slo_attainment * base.requests
    return replace(
        base,
        goodput_rps=good / span if span > 0 else math.nan,
        imbalance=max(p.imbalance for p in parts),
        replica_seconds=sum(p.replica_seconds for p in parts),
        span_seconds=span,
    )
