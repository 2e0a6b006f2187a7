"""Train the learned placement policy in the cluster simulator (`switchboard scheduler train`, issue 17).

The agent is `LearnedPlacementPolicy`'s network: for each arriving request it scores every
candidate replica (the same `FeatureExtractor` features the scheduler computes) and picks the
primary from a softmax over the scores. Training, in torch, on episodes (trace windows of
`episode_seconds`, a few hundred requests) drawn from the training part of the trace:

1. **Behaviour cloning** (warm start): the teacher (prefix-load, the best heuristic) places
   `bc_episodes` episodes; the network learns to put the teacher's choice first (cross-entropy of
   the softmax over candidates).
2. **Policy gradient** (REINFORCE with a per-request baseline): each episode is run with sampled
   choices, and each request scores a reward when it ends:

       r = 1[met every objective of its expert] - ttft_weight * min(TTFT / TTFT objective, 4)

   a rejected or dropped request (no first token) scores 0 - ttft_weight * 4: every request counts,
   so shedding never pays. The baseline of a request is its reward in the same episode under the
   teacher (common random numbers: same requests, same cluster), so `r - b` is what the choices
   changed. A decision is credited with the discounted `r - b` of its own request and the next
   `horizon` requests of its expert (`gamma`), since a placement also delays the requests that
   queue behind it. Loss: -advantage x log pi(choice) - entropy bonus + `bc_weight` x
   cross-entropy to the teacher's choice (a leash that keeps a short run near a sensible policy).

Every `eval_every` iterations the greedy network is scored on validation windows (after the
training range, before the held-out part); the best one is written as the policy file
(`policy.json`), with checkpoints (`checkpoints/*.pt`), the learning curve (`learning_curve.png`)
and `train.json` (the curve's numbers) under `out`. Deterministic for a seed with `--episodes`
(torch on one thread); `--minutes` stops at a wall-clock budget instead.
"""

from __future__ import annotations

import datetime
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from switchboard.scheduler.learned_policy import (
    FEATURE_NAMES,
    FEATURE_SCHEMA,
    FeatureExtractor,
    PolicyNetwork,
    order_by_scores,
    write_policy_file,
)
from switchboard.scheduler.policies import PlacementQuery, PolicyOptions, PrefixLoadPolicy
from switchboard.scheduler.registry import ReplicaView
from switchboard.simulation.cluster import SimResult, Simulation
from switchboard.simulation.evaluate import EvalSetup
from switchboard.simulation.lookahead import lookahead_costs, rank_by_costs
from switchboard.simulation.metrics import good
from switchboard.simulation.parallel import fork_map

TEACHER = "prefix-load"  # the best heuristic: the cloning teacher, the policy-gradient baseline, the bar
LOOKAHEAD = "lookahead"  # the simulator's look-ahead (`lookahead.py`): the distillation teacher
TEACHERS = (TEACHER, LOOKAHEAD)
# A request without a first token scores this many TTFT objectives of delay (and no attainment).
TTFT_CAP = 4.0


@dataclass(frozen=True)
class TrainConfig:
    """What one training run does (times in trace seconds)."""

    setup: EvalSetup  # cluster, trace, workload shaping; its windows are replaced per episode
    train_range: tuple[float, float]
    val_range: tuple[float, float]
    eval_range: tuple[float, float]
    out: Path
    seed: int = 0
    episode_seconds: float = 60.0
    bc_episodes: int = 8
    bc_epochs: int = 30
    episodes: int | None = 100  # policy-gradient episodes (None: until `minutes` runs out)
    minutes: float | None = None
    val_windows: int = 2
    eval_windows: int = 3
    eval_every: int = 10
    hidden: int = 32
    lr: float = 3e-3
    bc_lr: float = 1e-2
    gamma: float = 0.8
    horizon: int = 16
    ttft_weight: float = 0.25
    entropy: float = 0.01
    bc_weight: float = 0.1
    bc_smoothing: float = 0.0  # label smoothing of the cloning targets (keeps the softmax exploring)
    temperature: float = 1.0
    options: PolicyOptions = field(default_factory=PolicyOptions)
    # "lookahead": clone the look-ahead instead of prefix-load, then `dagger_rounds` rounds of
    # `dagger_episodes` episodes placed by the network and labelled by the look-ahead (DAgger).
    teacher: str = TEACHER
    dagger_rounds: int = 0
    dagger_episodes: int = 4
    target_temperature: float = 0.05  # seconds: look-ahead costs -> soft targets softmax(-cost / this)
    workers: int = 1  # processes for the labelled episodes (fork)


# ----------------------------------------------------------------------------- the network (torch)


def torch_model(hidden: int, mean: np.ndarray, std: np.ndarray) -> Any:
    """The torch twin of `PolicyNetwork`: normalization, Linear-ReLU-Linear-ReLU-Linear(1)."""
    import torch
    from torch import nn

    class Scorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n = len(FEATURE_NAMES)
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std).squeeze(-1)

    return Scorer()


def to_network(model: Any, training: dict[str, Any] | None = None) -> PolicyNetwork:
    """The numpy `PolicyNetwork` with the torch model's weights (what the policy file stores)."""
    from torch import nn

    layers = tuple(
        (m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy().copy())
        for m in model.net
        if isinstance(m, nn.Linear)
    )
    return PolicyNetwork(
        model.mean.double().numpy().copy(), model.std.double().numpy().copy(), layers, training or {}
    )


def from_network(network: PolicyNetwork) -> Any:
    """A torch model with a `PolicyNetwork`'s weights (the same forward, in float32)."""
    import torch

    hidden = network.layers[0][0].shape[1]
    model = torch_model(hidden, network.mean, network.std)
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m, (w, b) in zip(linears, network.layers, strict=True):
            m.weight.copy_(torch.as_tensor(w.T))
            m.bias.copy_(torch.as_tensor(b))
    return model


# ----------------------------------------------------------------------------- the agent in the simulator


@dataclass
class Decision:
    """One placement the agent (or the teacher) made: the candidates' features and the choices."""

    request_id: str
    expert: str
    features: np.ndarray  # [n, F]
    chosen: int  # the primary's index among the candidates
    teacher: int  # the teacher's choice
    costs: np.ndarray | None = None  # [n] the look-ahead teacher's cost of each candidate (seconds)


class Agent:
    """A placement policy for `Simulation` that records every decision.

    mode "teacher": places as the teacher does; "sample": draws the primary from the softmax over
    the network's scores; "greedy": the highest score (what the scheduler does). The teacher is
    prefix-load, or with `lookahead` the simulator's look-ahead (`lookahead.lookahead_costs`, lowest
    cost first, ties in prefix-load's order), whose per-candidate costs are recorded with every
    decision; `bind(sim)` (the `Simulation` calls it) gives it the simulation to look into.
    `record=False`: no decisions kept and no teacher consulted (a greedy validation run).
    """

    name = "learned-train"

    def __init__(self, extractor: FeatureExtractor, teacher: PrefixLoadPolicy, mode: str,
                 network: PolicyNetwork | None = None, rng: np.random.Generator | None = None,
                 temperature: float = 1.0, lookahead: bool = False, record: bool = True) -> None:
        self.extractor = extractor
        self.teacher = teacher
        self.mode = mode
        self.network = network
        self.rng = rng or np.random.default_rng(0)
        self.temperature = temperature
        self.lookahead = lookahead
        self.record = record
        self.sim: Simulation | None = None
        self.decisions: dict[str, Decision] = {}

    def bind(self, sim: Simulation) -> None:
        self.sim = sim

    def _taught(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> tuple[list[ReplicaView], np.ndarray | None]:
        """The teacher's ranking, and its costs when it is the look-ahead."""
        heuristic = self.teacher.rank(query, candidates)
        if not self.lookahead:
            return heuristic, None
        if self.sim is None:
            raise RuntimeError("a look-ahead agent needs bind(sim) before the run")
        costs = lookahead_costs(self.sim, candidates)
        return rank_by_costs(heuristic, candidates, costs), costs

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        if len(candidates) < 2:
            return list(candidates)
        features = self.extractor.features(query, candidates)
        if not self.record and self.network is not None and self.mode != "teacher":
            return order_by_scores(candidates, self.network.scores(features))
        taught, costs = self._taught(query, candidates)
        teacher = candidates.index(taught[0])
        if self.mode == "teacher" or self.network is None:
            if self.record:
                self.decisions[query.request_id] = Decision(query.request_id, query.expert, features, teacher, teacher, costs)
            return taught
        scores = self.network.scores(features)
        ordered = order_by_scores(candidates, scores)
        if self.mode == "sample":
            z = scores / self.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            chosen = int(self.rng.choice(len(candidates), p=p))
            first = candidates[chosen]
            ordered = [first, *(v for v in ordered if v is not first)]
        else:
            chosen = candidates.index(ordered[0])
        self.decisions[query.request_id] = Decision(query.request_id, query.expert, features, chosen, teacher, costs)
        return ordered


def request_rewards(result: SimResult, ttft_weight: float) -> dict[str, float]:
    """request id -> reward (see the module docstring); every request of the run has one."""
    out = {}
    for record in result.records:
        slo = result.slos.get(record.expert)
        goal = slo.ttft_seconds if slo is not None and slo.ttft_seconds else 1.0
        ttft = record.ttft if record.outcome == "ok" else None
        delay = TTFT_CAP if ttft is None else min(ttft / goal, TTFT_CAP)
        out[record.request_id] = float(good(result, record)) - ttft_weight * delay
    return out


def advantages(result: SimResult, rewards: dict[str, float], baseline: dict[str, float],
               gamma: float, horizon: int) -> dict[str, float]:
    """request id -> the discounted `r - b` of it and the next `horizon` requests of its expert."""
    by_expert: dict[str, list[str]] = {}
    for record in sorted(result.records, key=lambda r: (r.arrival, r.index)):
        by_expert.setdefault(record.expert, []).append(record.request_id)
    out: dict[str, float] = {}
    for ids in by_expert.values():
        delta = [rewards[i] - baseline.get(i, 0.0) for i in ids]
        for k, rid in enumerate(ids):
            acc, discount = 0.0, 1.0
            for d in delta[k : k + horizon + 1]:
                acc += discount * d
                discount *= gamma
            out[rid] = acc
    return out


# ----------------------------------------------------------------------------- episodes


def episode_setup(setup: EvalSetup, start: float, seconds: float, seed: int) -> EvalSetup:
    return replace(setup, window_starts=(start,), window_seconds=seconds, seed=seed)


def run_episode(setup: EvalSetup, policy: Any) -> SimResult:
    return Simulation(setup.config(), policy).run(setup.windows()[0])


def spread(lo: float, hi: float, seconds: float, count: int) -> list[float]:
    """`count` window starts evenly over [lo, hi - seconds]."""
    room = hi - lo - seconds
    if room < 0:
        raise ValueError(f"a {seconds:g} s window does not fit the range {lo:g}-{hi:g} s")
    if count == 1:
        return [lo]
    return [lo + room * i / (count - 1) for i in range(count)]


def score(results: Sequence[SimResult], ttft_weight: float) -> dict[str, float]:
    """Mean reward, SLO attainment, mean and p99 TTFT (s, completed requests) over runs."""
    rewards: list[float] = []
    ttfts: list[float] = []
    met = total = 0
    for res in results:
        rewards.extend(request_rewards(res, ttft_weight).values())
        for rec in res.records:
            total += 1
            met += good(res, rec)
            if rec.outcome == "ok" and rec.ttft is not None:
                ttfts.append(rec.ttft)
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * (len(ttfts) - 1) + 0.5))] if ttfts else math.nan
    return {
        "reward": float(np.mean(rewards)) if rewards else math.nan,
        "slo_attainment": met / total if total else math.nan,
        "ttft_mean": float(np.mean(ttfts)) if ttfts else math.nan,
        "ttft_p99": p99,
        "requests": total,
    }


# ----------------------------------------------------------------------------- training


def _batch(decisions: Sequence[Decision]) -> tuple[Any, Any, Any, Any]:
    """Padded [B, n, F] features, [B, n] mask, chosen and teacher indices as tensors."""
    import torch

    width = max(d.features.shape[0] for d in decisions)
    x = np.zeros((len(decisions), width, len(FEATURE_NAMES)), dtype=np.float32)
    mask = np.zeros((len(decisions), width), dtype=bool)
    for i, d in enumerate(decisions):
        n = d.features.shape[0]
        x[i, :n] = d.features
        mask[i, :n] = True
    chosen = torch.tensor([d.chosen for d in decisions])
    teacher = torch.tensor([d.teacher for d in decisions])
    return torch.from_numpy(x), torch.from_numpy(mask), chosen, teacher


def _log_probs(model: Any, x: Any, mask: Any) -> Any:
    import torch

    scores = model(x)
    scores = scores.masked_fill(~mask, -1e9)
    return torch.log_softmax(scores, dim=-1)


def _targets(decisions: Sequence[Decision], width: int, temperature: float, smoothing: float) -> Any:
    """[B, width] what cloning fits: the teacher's choice (one-hot), or with look-ahead costs a
    softmax of -cost / temperature (a near tie stays a near tie); `smoothing` of the mass spread
    evenly over the real candidates."""
    import torch

    out = np.zeros((len(decisions), width), dtype=np.float32)
    for i, d in enumerate(decisions):
        n = d.features.shape[0]
        if d.costs is None:
            out[i, d.teacher] = 1.0
        else:
            z = -(d.costs - d.costs.min()) / temperature
            p = np.exp(z - z.max())
            out[i, :n] = p / p.sum()
        if smoothing > 0:
            out[i, :n] = (1 - smoothing) * out[i, :n] + smoothing / n
    return torch.from_numpy(out)


def _cross_entropy(log_probs: Any, targets: Any, mask: Any) -> Any:
    return -(targets * log_probs.masked_fill(~mask, 0.0)).sum(-1).mean()


def fit(model: Any, decisions: Sequence[Decision], epochs: int, lr: float, temperature: float,
        smoothing: float) -> list[dict[str, float]]:
    """Cloning: fit the softmax over each decision's candidates to its targets (`_targets`)."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, mask, _chosen, taught = _batch(decisions)
    targets = _targets(decisions, x.shape[1], temperature, smoothing)
    curve = []
    for _epoch in range(epochs):
        perm = torch.randperm(len(decisions))
        for i in range(0, len(decisions), 256):
            idx = perm[i : i + 256]
            loss = _cross_entropy(_log_probs(model, x[idx], mask[idx]), targets[idx], mask[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            lp = _log_probs(model, x, mask)
            agree = float((lp.argmax(-1) == taught).float().mean())
            curve.append({"loss": float(_cross_entropy(lp, targets, mask)), "agreement": agree})
    return curve


def _decisions_of(agent: Agent, setup: EvalSetup) -> list[Decision]:
    run_episode(setup, agent)
    return list(agent.decisions.values())


def train(config: TrainConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole training; returns the summary written to `out/train.json`."""
    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(1)
    started = time.perf_counter()
    deadline = started + config.minutes * 60.0 if config.minutes else math.inf
    out = config.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    np_rng = np.random.default_rng(config.seed)
    slos = {p.expert: p.slo for p in config.setup.pools}
    extractor = FeatureExtractor(slos, config.options)
    teacher = extractor.prefix
    secs = config.episode_seconds
    lo, hi = config.train_range
    if hi - lo < secs:
        raise ValueError(f"the training range {lo:g}-{hi:g} s is shorter than one {secs:g} s episode")

    val_starts = spread(*config.val_range, secs, config.val_windows)
    eval_starts = spread(*config.eval_range, secs, config.eval_windows)

    def draw() -> tuple[float, int]:
        return rng.uniform(lo, hi - secs), rng.randrange(1 << 30)

    if config.teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {config.teacher!r}; choose from {', '.join(TEACHERS)}")
    lookahead = config.teacher == LOOKAHEAD
    if config.target_temperature <= 0:
        raise ValueError("the target temperature must be positive")

    def labelled(mode: str, network: PolicyNetwork | None, count: int) -> list[Decision]:
        """`count` training episodes placed by `mode`, every decision labelled by the teacher."""
        drawn = [draw() for _ in range(count)]
        episodes = [episode_setup(config.setup, start, secs, seed) for start, seed in drawn]
        agents = [Agent(extractor, teacher, mode, network, lookahead=lookahead) for _ in episodes]
        runs = fork_map(lambda k: _decisions_of(agents[k], episodes[k]), range(len(episodes)), config.workers)
        return [d for run in runs for d in run]

    # 1. Behaviour cloning on the teacher's decisions (its own episodes).
    bc = labelled("teacher", None, config.bc_episodes)
    if not bc:
        raise ValueError("behaviour cloning saw no decision with two or more candidates (one replica per expert?)")
    rows = np.concatenate([d.features for d in bc])
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    model = torch_model(config.hidden, mean, std)
    bc_curve = fit(model, bc, config.bc_epochs, config.bc_lr, config.target_temperature, config.bc_smoothing)
    progress(f"behaviour cloning: {len(bc)} decisions from {config.bc_episodes} episodes, "
             f"agreement with {config.teacher} {bc_curve[-1]['agreement']:.1%}")

    # Validation: teacher once, the network at every eval.
    val_setups = [episode_setup(config.setup, s, secs, config.seed + 1000 + i) for i, s in enumerate(val_starts)]
    teacher_val = score([run_episode(s, Agent(extractor, teacher, "teacher")) for s in val_setups], config.ttft_weight)

    def validate() -> dict[str, float]:
        net = to_network(model)
        return score([run_episode(s, Agent(extractor, teacher, "greedy", net, record=False)) for s in val_setups],
                     config.ttft_weight)

    curve: list[dict[str, Any]] = []
    best = {"iteration": 0, **validate()}
    best_net = to_network(model)
    curve.append({"iteration": 0, "phase": "bc", "val": dict(best), "teacher_val": teacher_val})
    progress(f"iteration 0 (after cloning): val reward {best['reward']:.4f} (teacher {teacher_val['reward']:.4f}), "
             f"SLO {best['slo_attainment']:.1%}, TTFT mean {1000 * best['ttft_mean']:.0f} ms")

    # 1b. DAgger (look-ahead teacher): the network places, the look-ahead labels the states the
    # network itself reaches, and the network is refitted on every decision labelled so far.
    data = list(bc)
    for round_ in range(1, config.dagger_rounds + 1):
        if time.perf_counter() >= deadline:
            break
        data.extend(labelled("greedy", to_network(model), config.dagger_episodes))
        fitted = fit(model, data, config.bc_epochs, config.bc_lr, config.target_temperature, config.bc_smoothing)
        val = validate()
        curve.append({"iteration": 0, "phase": "dagger", "round": round_, "decisions": len(data),
                      "agreement": fitted[-1]["agreement"], "val": val})
        if val["reward"] > best["reward"]:
            best = {"iteration": 0, "dagger_round": round_, **val}
            best_net = to_network(model)
        torch.save({"model": model.state_dict(), "round": round_}, out / "checkpoints" / f"dagger_{round_:03d}.pt")
        progress(f"DAgger round {round_}: {len(data)} decisions, agreement {fitted[-1]['agreement']:.1%}, "
                 f"val reward {val['reward']:.4f} (teacher {teacher_val['reward']:.4f}), SLO {val['slo_attainment']:.1%}, "
                 f"TTFT mean {1000 * val['ttft_mean']:.0f} ms, p99 {1000 * val['ttft_p99']:.0f} ms")

    # 2. Policy gradient.
    if config.dagger_rounds:
        model = from_network(best_net)  # fine-tune the best network found so far, not the last
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    baselines: dict[tuple[float, int], dict[str, float]] = {}
    iteration = 0
    while (config.episodes is None or iteration < config.episodes) and time.perf_counter() < deadline:
        iteration += 1
        start, seed = draw()
        episode = episode_setup(config.setup, start, secs, seed)
        key = (start, seed)
        if key not in baselines:
            baselines[key] = request_rewards(run_episode(episode, Agent(extractor, teacher, "teacher")), config.ttft_weight)
        agent = Agent(extractor, teacher, "sample", to_network(model), np_rng, config.temperature)
        result = run_episode(episode, agent)
        rewards = request_rewards(result, config.ttft_weight)
        adv = advantages(result, rewards, baselines[key], config.gamma, config.horizon)
        decisions = list(agent.decisions.values())
        entry: dict[str, Any] = {
            "iteration": iteration,
            "phase": "pg",
            "reward": float(np.mean(list(rewards.values()))),
            "teacher_reward": float(np.mean(list(baselines[key].values()))),
            "requests": len(rewards),
            "decisions": len(decisions),
        }
        if decisions:
            x, mask, chosen, taught = _batch(decisions)
            a = torch.tensor([adv.get(d.request_id, 0.0) for d in decisions], dtype=torch.float32)
            if len(decisions) > 1 and float(a.std()) > 1e-8:
                a = (a - a.mean()) / a.std()
            lp = torch.log_softmax((model(x) / config.temperature).masked_fill(~mask, -1e9), dim=-1)
            picked = lp.gather(1, chosen[:, None]).squeeze(1)
            probs = lp.exp()
            entropy = -(probs * lp.masked_fill(~mask, 0.0)).sum(-1).mean()
            leash = torch.nn.functional.nll_loss(lp, taught)
            loss = -(a * picked).mean() - config.entropy * entropy + config.bc_weight * leash
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            entry["loss"] = loss.item()
            entry["entropy"] = entropy.item()
        if iteration % config.eval_every == 0:
            val = validate()
            entry["val"] = val
            if val["reward"] > best["reward"]:
                best = {"iteration": iteration, **val}
                best_net = to_network(model)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": iteration},
                       out / "checkpoints" / f"iter_{iteration:05d}.pt")
            progress(f"iteration {iteration}: val reward {val['reward']:.4f} (teacher {teacher_val['reward']:.4f}), "
                     f"SLO {val['slo_attainment']:.1%}, TTFT mean {1000 * val['ttft_mean']:.0f} ms, "
                     f"p99 {1000 * val['ttft_p99']:.0f} ms")
        curve.append(entry)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": iteration},
               out / "checkpoints" / "last.pt")

    # 3. The held-out windows: the best network, greedy, against the teacher.
    eval_setups = [episode_setup(config.setup, s, secs, config.seed + 2000 + i) for i, s in enumerate(eval_starts)]
    held_out = {
        "learned": score([run_episode(s, Agent(extractor, teacher, "greedy", best_net)) for s in eval_setups], config.ttft_weight),
        TEACHER: score([run_episode(s, Agent(extractor, teacher, "teacher")) for s in eval_setups], config.ttft_weight),
    }
    if lookahead:
        held_out[LOOKAHEAD] = score(
            [run_episode(s, Agent(extractor, teacher, "teacher", lookahead=True, record=False)) for s in eval_setups],
            config.ttft_weight,
        )
    cloned = "the simulator's look-ahead (DAgger)" if lookahead else "prefix-load"
    metadata = {
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": f"behaviour cloning of {cloned}, then REINFORCE with prefix-load's per-request rewards as baseline",
        "schema": FEATURE_SCHEMA,
        "seed": config.seed,
        "teacher": config.teacher,
        "dagger": {"rounds": config.dagger_rounds, "episodes_per_round": config.dagger_episodes,
                   "target_temperature_s": config.target_temperature, "decisions": len(data)},
        "train_range_s": list(config.train_range),
        "val_range_s": list(config.val_range),
        "eval_range_s": list(config.eval_range),
        "episode_seconds": secs,
        "bc_episodes": config.bc_episodes,
        "pg_episodes": iteration,
        "best_iteration": best["iteration"],
        "best_dagger_round": best.get("dagger_round", 0),
        "val_best": {k: v for k, v in best.items() if k not in ("iteration", "dagger_round")},
        "val_teacher": teacher_val,
        "held_out": held_out,
        "reward": {"ttft_weight": config.ttft_weight, "ttft_cap": TTFT_CAP, "gamma": config.gamma, "horizon": config.horizon},
        "hyperparameters": {"hidden": config.hidden, "lr": config.lr, "bc_lr": config.bc_lr, "bc_epochs": config.bc_epochs,
                            "temperature": config.temperature, "entropy": config.entropy, "bc_weight": config.bc_weight,
                            "bc_smoothing": config.bc_smoothing, "val_windows": config.val_windows,
                            "eval_windows": config.eval_windows},
        "pools": [{"expert": p.expert, "replicas": p.replicas} for p in config.setup.pools],
        "speedup": config.setup.speedup,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_policy_file(out / "policy.json", best_net, metadata)
    summary = {**metadata, "bc_curve": bc_curve, "curve": curve}
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curve(curve, teacher_val, out / "learning_curve.png")
    return summary


def _val_label(entry: dict[str, Any]) -> str:
    if entry.get("phase") == "bc":
        return "bc"
    if entry.get("phase") == "dagger":
        return f"d{entry['round']}"
    return str(entry["iteration"])


def plot_curve(curve: Sequence[dict[str, Any]], teacher_val: dict[str, float], path: Path) -> Path:
    """Training reward per episode (against the teacher's on the same episode) and validation reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    pg = [c for c in curve if c.get("phase") == "pg"]
    if pg:
        it = [c["iteration"] for c in pg]
        delta = [c["reward"] - c["teacher_reward"] for c in pg]
        ax1.plot(it, delta, ".", alpha=0.4, label="episode")
        k = max(1, len(delta) // 10)
        smooth = np.convolve(delta, np.ones(k) / k, mode="valid")
        ax1.plot(it[k - 1 :], smooth, label=f"mean of {k}")
    ax1.axhline(0.0, color="grey", lw=0.8)
    ax1.set_xlabel("policy-gradient episode")
    ax1.set_ylabel(f"mean reward minus {TEACHER}'s (same episode)")
    ax1.set_title("training episodes (sampled choices)")
    if pg:
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no policy-gradient episodes", ha="center", va="center", transform=ax1.transAxes)
    val = [c for c in curve if "val" in c]
    ax2.plot(range(len(val)), [c["val"]["reward"] for c in val], "o-", label="learned (greedy)")
    ax2.axhline(teacher_val["reward"], color="C1", ls="--", label=TEACHER)
    ax2.set_xticks(range(len(val)), [_val_label(c) for c in val], rotation=90, fontsize=7)
    ax2.set_xlabel("after cloning (bc), DAgger round (dN), policy-gradient episode (N)")
    ax2.set_ylabel("mean reward per request")
    ax2.set_title("validation windows")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
