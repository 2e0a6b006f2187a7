"""Allocation in the simulator: multi-pool workloads, episodes, scores, the comparison and the training.

Workload: each pool replays its own real trace (by default the Azure 2023 conversation trace for
one pool and the code trace for the other), so demand varies in time and differently per pool.
Windows: the same trace seconds of every pool's trace; held out = the last `HELD_OUT_FRACTION` of
the shortest trace.

Score of a run: SLO attainment over every request (rejected, dropped or late = miss),
replica-seconds (creation to stop, start-up and draining included), and attainment per
replica-second (attainment / mean replicas, i.e. attainment x seconds / replica-seconds).
Training reward of an episode: `attainment - cost_per_replica * mean replicas`.

Training (`train_allocation`): cross-entropy-method search over the weights of a small torch MLP
(`torch_model`), with every candidate scored on the same episodes (common random numbers); the
best mean on validation windows is kept and written as the versioned file of `allocation.py`.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from switchboard.bench.transform import WorkloadShape, shape
from switchboard.bench.workload import TraceRequest
from switchboard.scheduler.allocation import (
    FEATURE_NAMES,
    OUTPUTS,
    AllocationConfig,
    AllocationController,
    AllocationNetwork,
    LearnedAllocator,
    make_allocator,
    write_allocation_file,
)
from switchboard.scheduler.policies import make_policy
from switchboard.simulation.cluster import PoolSpec, SimConfig, SimResult, Simulation
from switchboard.simulation.metrics import good
from switchboard.simulation.parallel import fork_map
from switchboard.simulation.train import spread
from switchboard.simulation.workload import SimRequest, assign_shared_prefixes, from_trace

HELD_OUT_FRACTION = 0.3


@dataclass(frozen=True)
class AllocSetup:
    """Pools (each with its own trace), the allocation settings and the workload shaping."""

    pools: tuple[PoolSpec, ...]
    traces: dict[str, tuple[TraceRequest, ...]]  # expert -> its trace rows
    allocation: AllocationConfig
    placement: str = "prefix-load"
    speedup: float = 1.0
    fit_context: int | None = None
    max_output_tokens: int | None = None
    prefix_groups: int = 16
    prefix_tokens: int = 128
    trace_block_size: int = 64
    dispatch_seconds: float = 0.0
    cost_per_replica: float = 0.02
    initial_counts: dict[str, int] | None = None  # each pool's replicas at the start; None: the budget split equally

    @property
    def span(self) -> float:
        """Seconds every pool's trace covers."""
        return min(rows[-1].arrival_s for rows in self.traces.values())

    def requests(self, start: float, seconds: float, seed: int) -> list[SimRequest]:
        """Every pool's requests of one window, merged in arrival order and numbered."""
        merged: list[SimRequest] = []
        for k, pool in enumerate(self.pools):
            spec = WorkloadShape(window_start_s=start, window_duration_s=seconds, speedup=self.speedup,
                                 fit_context=self.fit_context, max_output_tokens=self.max_output_tokens)
            rows, _ = shape(list(self.traces[pool.expert]), spec)
            if self.prefix_groups > 0:
                rows = assign_shared_prefixes(rows, self.prefix_groups, self.prefix_tokens, self.trace_block_size,
                                              seed=seed * 101 + k)
            merged.extend(from_trace(rows, lambda _r, e=pool.expert: e))
        merged.sort(key=lambda r: (r.arrival, r.expert, r.index))
        return [replace(r, index=i) for i, r in enumerate(merged)]

    def config(self, seed: int) -> SimConfig:
        return SimConfig(self.pools, trace_block_size=self.trace_block_size, seed=seed,
                         dispatch_seconds=self.dispatch_seconds)


@dataclass
class RunScore:
    """One run of one allocator on one window."""

    requests: int
    met: int
    replica_seconds: float
    seconds: float  # the window's simulated length (arrival span), for mean replicas

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0

    @property
    def mean_replicas(self) -> float:
        return self.replica_seconds / self.seconds if self.seconds > 0 else math.nan

    @property
    def per_replica_second(self) -> float:
        """SLO attainment per replica-second, scaled to per replica (attainment / mean replicas)."""
        return self.attainment / self.mean_replicas if self.mean_replicas > 0 else math.nan

    def reward(self, cost_per_replica: float) -> float:
        return self.attainment - cost_per_replica * self.mean_replicas


def run_window(setup: AllocSetup, allocator: Any, start: float, seconds: float, seed: int,
               requests: Sequence[SimRequest] | None = None) -> tuple[RunScore, SimResult, Simulation]:
    """Simulate one window under one allocator (a fresh controller); its score, result and simulation."""
    reqs = requests if requests is not None else setup.requests(start, seconds, seed)
    controller = AllocationController(allocator, setup.allocation, initial_counts=setup.initial_counts)
    sim = Simulation(setup.config(seed), make_policy(setup.placement, seed), allocation=controller)
    result = sim.run(reqs)
    met = sum(1 for r in result.records if good(result, r))
    rs = sum(b - a for a, b in result.lifetimes.values())
    return RunScore(len(result.records), met, rs, max(result.end_time, seconds / setup.speedup)), result, sim


def held_out_starts(setup: AllocSetup, count: int, seconds: float) -> list[float]:
    span = setup.span
    return spread(span * (1 - HELD_OUT_FRACTION), span, seconds, count)


def bootstrap_ci(values: Sequence[float], seed: int, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval of per-run values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (math.nan,) * 3
    rng = np.random.default_rng(seed)
    boot = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def variant(setup: AllocSetup, name: str) -> tuple[AllocSetup, str]:
    """`hpa@750` / `keda@8`: the baseline with another target (a tuned baseline); else `name` as is."""
    base, sep, target = name.partition("@")
    if not sep:
        return setup, name
    try:
        value = float(target)
    except ValueError:
        raise ValueError(f"{name!r}: the target after @ must be a number") from None
    if base == "hpa":
        return replace(setup, allocation=replace(setup.allocation, hpa_target_tokens_per_replica=value)), base
    if base == "keda":
        return replace(setup, allocation=replace(setup.allocation, keda_target_queue=value)), base
    raise ValueError(f"{name!r}: only hpa@TOKENS and keda@QUEUE take a target")


def compare(setup: AllocSetup, names: Sequence[str], starts: Sequence[float], seconds: float,
            seeds: Sequence[int], policy_file: str | Path | None = None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every allocator on every (window, seed), same requests; per allocator the pooled numbers and CIs.

    With `learned` among them, each row also carries the paired differences learned - that
    allocator over the same runs (`paired_vs_learned`).
    """
    out: dict[str, Any] = {}
    per_run: dict[str, list[RunScore]] = {}
    for name in names:
        runs: list[RunScore] = []
        started = time.perf_counter()
        run_setup, kind = variant(setup, name)
        for seed in seeds:
            for start in starts:
                allocator = make_allocator(kind, policy_file)
                score, _res, _sim = run_window(run_setup, allocator, start, seconds, seed)
                runs.append(score)
        per_run[name] = runs
        total_req = sum(r.requests for r in runs)
        total_met = sum(r.met for r in runs)
        total_rs = sum(r.replica_seconds for r in runs)
        total_s = sum(r.seconds for r in runs)
        att = total_met / total_req if total_req else math.nan
        mean_rep = total_rs / total_s if total_s else math.nan
        row = {
            "runs": len(runs),
            "requests": total_req,
            "slo_attainment": att,
            "slo_attainment_ci95": list(bootstrap_ci([r.attainment for r in runs], 0)[1:]),
            "replica_seconds": total_rs,
            "mean_replicas": mean_rep,
            "mean_replicas_ci95": list(bootstrap_ci([r.mean_replicas for r in runs], 0)[1:]),
            "attainment_per_replica": att / mean_rep if mean_rep else math.nan,
            "attainment_per_replica_ci95": list(bootstrap_ci([r.per_replica_second for r in runs], 0)[1:]),
            "reward": att - setup.cost_per_replica * mean_rep,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        if name == "learned":
            row["status"] = LearnedAllocator(policy_file).status
        out[name] = row
        progress(f"{name}: SLO {att:.1%}, mean replicas {mean_rep:.2f}, attainment per replica "
                 f"{row['attainment_per_replica']:.4f} {_ci(row['attainment_per_replica_ci95'])}")
    if "learned" in per_run:
        mine = per_run["learned"]
        for name, runs in per_run.items():
            if name == "learned":
                continue
            out[name]["paired_vs_learned"] = {
                "slo_attainment": _paired(mine, runs, lambda r: r.attainment),
                "attainment_per_replica": _paired(mine, runs, lambda r: r.per_replica_second),
                "mean_replicas": _paired(mine, runs, lambda r: r.mean_replicas),
            }
    return out


def _paired(a: Sequence[RunScore], b: Sequence[RunScore], value: Callable[[RunScore], float]) -> dict[str, Any]:
    """Mean of value(a) - value(b) over the same runs, its 95% bootstrap interval, and a's wins."""
    diffs = [value(x) - value(y) for x, y in zip(a, b, strict=True)]
    mean, lo, hi = bootstrap_ci(diffs, 0)
    return {"mean": mean, "ci95": [lo, hi], "wins": sum(d > 0 for d in diffs), "runs": len(diffs)}


def _diff(d: dict[str, Any], scale: float, fmt: str, wins: bool = True) -> str:
    lo, hi = d["ci95"]
    text = f"{scale * d['mean']:+{fmt}} [{scale * lo:+{fmt}}, {scale * hi:+{fmt}}]"
    return text + (f" ({d['wins']}/{d['runs']})" if wins else "")


def render_paired(results: dict[str, Any]) -> str:
    """learned - each allocator, paired over the same runs (empty without `learned`)."""
    rows = [(n, r["paired_vs_learned"]) for n, r in results.items() if "paired_vs_learned" in r]
    if not rows:
        return ""
    lines = ["learned - allocator, paired over the same runs: mean [95% CI] (runs learned is ahead)",
             f"{'allocator':<13}{'SLO att. (pts)':>30}{'att./replica':>34}{'mean replicas':>30}"]
    for name, p in rows:
        a, r, m = p["slo_attainment"], p["attainment_per_replica"], p["mean_replicas"]
        lines.append(f"{name:<13}{_diff(a, 100, '.1f'):>30}{_diff(r, 1, '.4f'):>34}{_diff(m, 1, '.2f', wins=False):>30}")
    return "\n".join(lines)


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def render(results: dict[str, Any]) -> str:
    """A fixed-width table of `compare`'s result."""
    lines = [f"{'allocator':<13}{'SLO att.':>9}{'95% CI':>17}{'replica-s':>11}{'mean repl.':>11}"
             f"{'att./replica':>13}{'95% CI':>19}{'reward':>8}"]
    for name, r in results.items():
        a = r["slo_attainment_ci95"]
        p = r["attainment_per_replica_ci95"]
        lines.append(
            f"{name:<13}{100 * r['slo_attainment']:>8.1f}%{f'[{100 * a[0]:.1f}, {100 * a[1]:.1f}]':>17}"
            f"{r['replica_seconds']:>11.0f}{r['mean_replicas']:>11.2f}{r['attainment_per_replica']:>13.4f}"
            f"{_ci(p):>19}{r['reward']:>8.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training (torch, CEM)


@dataclass(frozen=True)
class AllocTrainConfig:
    setup: AllocSetup
    train_range: tuple[float, float]
    val_range: tuple[float, float]
    out: Path
    seed: int = 0
    episode_seconds: float = 300.0
    episodes_per_candidate: int = 2
    population: int = 12
    elites: int = 3
    iterations: int | None = 10
    minutes: float | None = None
    val_windows: int = 2
    hidden: int = 8
    init_std: float = 0.3
    workers: int = 1  # processes scoring the candidates (fork); 1: in this process


def torch_model(hidden: int) -> Any:
    """The torch MLP (`FEATURE_NAMES` -> hidden, tanh -> `OUTPUTS`), or a linear policy with hidden = 0.

    The normalization is fixed (`_MEAN`, `_STD`).
    """
    from torch import nn

    if hidden == 0:
        return nn.Sequential(nn.Linear(len(FEATURE_NAMES), len(OUTPUTS)))
    return nn.Sequential(nn.Linear(len(FEATURE_NAMES), hidden), nn.Tanh(), nn.Linear(hidden, len(OUTPUTS)))


# A fixed feature normalization (a rough scale of each feature), so the file is self-contained.
_MEAN = np.array([7.0, 1.0, 0.5, 1.0, 0.3, 0.1, 1.5, 0.1, 0.5, 0.0, 7.0])
_STD = np.array([2.0, 1.0, 1.0, 1.0, 0.3, 0.2, 0.7, 0.2, 0.3, 0.5, 1.0])


def to_network(model: Any, training: dict[str, Any] | None = None) -> AllocationNetwork:
    from torch import nn

    layers = tuple(
        (m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy().copy())
        for m in model if isinstance(m, nn.Linear)
    )
    return AllocationNetwork(_MEAN.copy(), _STD.copy(), layers, training or {})


def train_allocation(config: AllocTrainConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-entropy-method search over the MLP's weights; writes allocation.json, checkpoints, curve."""
    import torch
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.manual_seed(config.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    deadline = started + config.minutes * 60 if config.minutes else math.inf
    out = config.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    setup = config.setup
    secs = config.episode_seconds
    lo, hi = config.train_range
    if hi - lo < secs:
        raise ValueError(f"the training range {lo:g}-{hi:g} s is shorter than one {secs:g} s episode")
    model = torch_model(config.hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the mean starts at "hold the current counts"
    mean = parameters_to_vector(model.parameters()).detach().numpy().astype(np.float64)  # zeros: exactly hpa
    std = np.full_like(mean, config.init_std)
    cost = setup.cost_per_replica

    def network(theta: np.ndarray) -> AllocationNetwork:
        vector_to_parameters(torch.as_tensor(theta, dtype=torch.float32), model.parameters())
        return to_network(model)

    def evaluate(net: AllocationNetwork, windows: Sequence[tuple[float, int, list[SimRequest]]]) -> float:
        return float(np.mean(score_all(setup, [net], windows, secs, cost, config.workers)[0]))

    val = [(s, config.seed + 1000 + i, setup.requests(s, secs, config.seed + 1000 + i))
           for i, s in enumerate(spread(*config.val_range, secs, config.val_windows))]
    hpa_val = float(np.mean([run_window(setup, make_allocator("hpa"), s, secs, seed, reqs)[0].reward(cost)
                             for s, seed, reqs in val]))
    best_val = evaluate(network(mean), val)
    best_theta = mean.copy()
    curve: list[dict[str, Any]] = [{"iteration": 0, "val_reward": best_val}]
    progress(f"iteration 0 (= hpa): val reward {best_val:.4f} (hpa {hpa_val:.4f})")
    iteration = 0
    while (config.iterations is None or iteration < config.iterations) and time.perf_counter() < deadline:
        iteration += 1
        episodes = []
        for _ in range(config.episodes_per_candidate):
            start = float(rng.uniform(lo, hi - secs))
            seed = int(rng.integers(1 << 30))
            episodes.append((start, seed, setup.requests(start, secs, seed)))
        thetas = mean + std * rng.standard_normal((config.population, len(mean)))
        thetas[0] = mean  # the current mean competes too
        scores = score_all(setup, [network(t) for t in thetas], episodes, secs, cost, config.workers)
        rewards = scores.mean(axis=1)
        elite = thetas[np.argsort(-rewards)[: config.elites]]
        mean = elite.mean(axis=0)
        std = np.maximum(elite.std(axis=0), 0.02)
        v = evaluate(network(mean), val)
        entry = {"iteration": iteration, "train_mean": float(rewards.mean()), "train_best": float(rewards.max()),
                 "val_reward": v, "std": float(std.mean())}
        curve.append(entry)
        if v > best_val:
            best_val, best_theta = v, mean.copy()
        vector_to_parameters(torch.as_tensor(mean, dtype=torch.float32), model.parameters())
        torch.save({"model": model.state_dict(), "mean": mean, "std": std, "iteration": iteration},
                   out / "checkpoints" / f"iter_{iteration:04d}.pt")
        progress(f"iteration {iteration}: train reward mean {rewards.mean():.4f} best {rewards.max():.4f}, "
                 f"val {v:.4f} (hpa {hpa_val:.4f})")
    metadata = {
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": "cross-entropy method over the MLP weights, common random numbers per iteration",
        "reward": f"SLO attainment (every request) - {cost} x mean replicas (replica-seconds / seconds)",
        "seed": config.seed,
        "train_range_s": list(config.train_range),
        "val_range_s": list(config.val_range),
        "episode_seconds": secs,
        "iterations": iteration,
        "population": config.population,
        "elites": config.elites,
        "episodes_per_candidate": config.episodes_per_candidate,
        "init_std": config.init_std,
        "start": "all-zero weights: exactly the hpa formula",
        "val_best": best_val,
        "val_hpa": hpa_val,
        "budget": setup.allocation.budget,
        "pools": [p.expert for p in setup.pools],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    net = network(best_theta)
    write_allocation_file(out / "allocation.json", net, metadata)
    (out / "train_allocation.json").write_text(json.dumps({**metadata, "curve": curve}, indent=2) + "\n")
    plot_curve(curve, hpa_val, out / "allocation_learning_curve.png")
    return {**metadata, "curve": curve}


def score_all(setup: AllocSetup, nets: Sequence[AllocationNetwork],
              windows: Sequence[tuple[float, int, list[SimRequest]]], seconds: float, cost: float,
              workers: int = 1) -> np.ndarray:
    """[len(nets), len(windows)] rewards; with workers > 1 in forked processes (each run is independent)."""

    def score(task: tuple[AllocationNetwork, int]) -> float:
        net, k = task
        start, seed, reqs = windows[k]
        return run_window(setup, LearnedAllocator(network=net), start, seconds, seed, reqs)[0].reward(cost)

    flat = fork_map(score, [(net, k) for net in nets for k in range(len(windows))], workers)
    return np.asarray(flat, dtype=np.float64).reshape(len(nets), len(windows))


def plot_curve(curve: Sequence[dict[str, Any]], hpa_val: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    it = [c["iteration"] for c in curve]
    ax.plot(it, [c["val_reward"] for c in curve], "o-", label="learned (CEM mean), validation")
    tr = [c for c in curve if "train_mean" in c]
    if tr:
        ax.plot([c["iteration"] for c in tr], [c["train_best"] for c in tr], ".", label="best candidate, training episodes")
    ax.axhline(hpa_val, color="C1", ls="--", label="hpa, validation")
    ax.set_xlabel("CEM iteration")
    ax.set_ylabel("reward (attainment - cost x mean replicas)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

