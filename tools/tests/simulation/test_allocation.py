"""Allocation across expert pools: the pure rules, the simulator's scaling, the learned allocator's file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from switchboard.cli.main import main
from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.allocation import (
    ALLOCATION_FORMAT,
    FEATURE_NAMES,
    AllocationConfig,
    AllocationController,
    AllocationNetwork,
    CooldownState,
    HpaAllocator,
    KedaAllocator,
    LearnedAllocator,
    PoolBounds,
    PoolObservation,
    ProportionalAllocator,
    StaticAllocator,
    constrain,
    hpa_desired,
    keda_desired,
    load_allocation_file,
    write_allocation_file,
)
from switchboard.scheduler.policies import make_policy
from switchboard.simulation.cluster import PoolSpec, SimConfig, Simulation
from switchboard.simulation.replica import ReplicaSpec
from switchboard.simulation.workload import SimRequest

COST = CostModel(base_ms=2.0, prefill_token_ms=0.05, decode_seq_ms=0.2, context_token_ms=0.001)


def config(budget: int = 10, lo: int = 1, hi: int = 8, cooldown: float = 60.0, **kw: float) -> AllocationConfig:
    return AllocationConfig(budget, {"a": PoolBounds(lo, hi), "b": PoolBounds(lo, hi)},
                            scale_down_cooldown_seconds=cooldown, **kw)


def obs(expert: str, replicas: int, tokens: float = 0.0, queue: int = 0, running: int = 0) -> PoolObservation:
    return PoolObservation(expert, tokens, tokens / 100, queue, running, 0.0, 0, 0, replicas, replicas)


# ----------------------------------------------------------------------------- pure rules


def test_bounds_clip_every_allocator() -> None:
    cfg = config(budget=20, lo=2, hi=5)
    got = constrain({"a": 0, "b": 50}, {"a": 3, "b": 3}, cfg, CooldownState(), now=1000.0)
    assert got == {"a": 2, "b": 5}


def test_budget_is_never_exceeded_and_nobody_shrinks_to_make_room() -> None:
    cfg = config(budget=10, hi=10)
    got = constrain({"a": 9, "b": 9}, {"a": 4, "b": 4}, cfg, CooldownState(), now=0.0)
    assert sum(got.values()) == 10 and got["a"] >= 4 and got["b"] >= 4
    # The room goes by how much more each asked for.
    # a asked for 6 more, b for 1 more, 2 fit: largest remainder of 2 x (6/7, 1/7) gives both to a.
    assert constrain({"a": 10, "b": 5}, {"a": 4, "b": 4}, cfg, CooldownState(), now=0.0) == {"a": 6, "b": 4}


def test_scale_down_waits_for_the_cool_down_and_scale_up_does_not() -> None:
    cfg = config(cooldown=60.0)
    cd = CooldownState()
    assert constrain({"a": 6, "b": 2}, {"a": 2, "b": 2}, cfg, cd, now=0.0) == {"a": 6, "b": 2}
    assert constrain({"a": 3, "b": 2}, {"a": 6, "b": 2}, cfg, cd, now=30.0) == {"a": 6, "b": 2}  # held
    assert constrain({"a": 3, "b": 2}, {"a": 6, "b": 2}, cfg, cd, now=60.0) == {"a": 3, "b": 2}
    assert constrain({"a": 7, "b": 2}, {"a": 3, "b": 2}, cfg, cd, now=61.0) == {"a": 7, "b": 2}  # up at once


def test_hpa_formula_and_its_tolerance() -> None:
    assert hpa_desired(4, 1050.0, 1000.0) == 4  # 5% over: within the 10% tolerance
    assert hpa_desired(4, 950.0, 1000.0) == 4
    assert hpa_desired(4, 1150.0, 1000.0) == 5  # ceil(4 * 1.15)
    assert hpa_desired(4, 500.0, 1000.0) == 2
    assert hpa_desired(3, 1101.0, 1000.0) == 4  # just past the tolerance: ceil(3.303)
    cfg = config(hpa_target_tokens_per_replica=1000.0)
    assert HpaAllocator().desired([obs("a", 2, tokens=3000.0), obs("b", 2, tokens=2100.0)], cfg) == {"a": 3, "b": 2}


def test_keda_formula() -> None:
    assert keda_desired(0, 4.0) == 0 and keda_desired(1, 4.0) == 1 and keda_desired(9, 4.0) == 3
    cfg = config(keda_target_queue=4.0)
    assert KedaAllocator().desired([obs("a", 1, queue=5, running=4), obs("b", 3)], cfg) == {"a": 3, "b": 0}


def test_static_and_proportional_split_the_budget() -> None:
    cfg = config(budget=9, hi=8)
    assert StaticAllocator().desired([], cfg) == {"a": 5, "b": 4}
    got = ProportionalAllocator().desired([obs("a", 4, tokens=3000.0), obs("b", 4, tokens=1000.0)], cfg)
    assert got == {"a": 6, "b": 3}  # minimums first (1 each), then 7 by 3:1 (5.25, 1.75)
    assert sum(ProportionalAllocator().desired([obs("a", 4), obs("b", 4)], cfg).values()) == 9


def test_config_refuses_minimums_over_the_budget() -> None:
    with pytest.raises(ValueError, match="exceed the budget"):
        AllocationConfig(3, {"a": PoolBounds(2, 4), "b": PoolBounds(2, 4)})


# ----------------------------------------------------------------------------- in the simulator


def pools(startup: float) -> tuple[PoolSpec, ...]:
    slo = ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05)
    spec = ReplicaSpec(num_blocks=512, max_model_len=2048)
    return tuple(PoolSpec(e, 0, COST, spec, slo, startup_seconds=startup) for e in ("a", "b"))


class Scripted:
    """Asks for fixed counts from a given tick on."""

    name = "scripted"

    def __init__(self, plan: dict[int, dict[str, int]]) -> None:
        self.plan, self.tick = plan, 0

    def desired(self, observations, cfg):
        self.tick += 1
        return self.plan.get(self.tick, {o.expert: o.replicas for o in observations})


def simulate(plan, reqs, startup=0.5, cooldown=0.0, budget=6, policy="least-loaded"):
    cfg = AllocationConfig(budget, {"a": PoolBounds(1, 5), "b": PoolBounds(1, 5)}, period_seconds=1.0,
                           scale_down_cooldown_seconds=cooldown)
    sim = Simulation(SimConfig(pools(startup)), make_policy(policy), allocation=AllocationController(Scripted(plan), cfg))
    return sim, sim.run(reqs)


def test_a_scaled_up_replica_takes_work_only_after_its_start_up() -> None:
    reqs = [SimRequest(i, i * 0.01, "a", 100, 20) for i in range(400)]
    sim, result = simulate({1: {"a": 5, "b": 1}}, reqs, startup=0.5)
    new = {"a-3", "a-4"}
    assert new <= set(result.replicas)
    for rid in new:
        assert result.lifetimes[rid][0] == pytest.approx(1.0)
        served = [r for r in result.records if r.replica_id == rid]
        assert served and min(r.arrival for r in served) >= 1.5 - 1e-9
    assert sim.allocation_log[0] == (1.0, {"a": 5, "b": 1})


def test_scale_down_drains_before_it_removes() -> None:
    # Long requests keep every replica busy when the scale-down comes at t = 1.
    reqs = [SimRequest(i, i * 0.02, "a", 200, 400) for i in range(60)]
    _sim, result = simulate({1: {"a": 1, "b": 3}}, reqs, budget=6)
    assert all(r.outcome == "ok" for r in result.records)  # nothing dropped or re-placed
    assert all(r.placements == 1 for r in result.records)
    removed = [rid for rid in ("a-0", "a-1", "a-2") if result.lifetimes[rid][1] < result.end_time]
    assert len(removed) == 2
    for rid in removed:
        # It stopped only after its last request finished, and took none after the drain.
        mine = [r for r in result.records if r.replica_id == rid]
        assert mine and result.lifetimes[rid][1] >= max(r.finished_at for r in mine) - 1e-9
        assert result.lifetimes[rid][1] > 1.0
        assert all(r.arrival <= 1.0 for r in mine)


def test_replica_seconds_count_start_up_and_stop_at_the_drain() -> None:
    reqs = [SimRequest(i, i * 0.05, "a", 50, 5) for i in range(80)]
    sim, result = simulate({1: {"a": 4, "b": 1}, 2: {"a": 2, "b": 1}}, reqs, startup=0.3)
    total = sum(b - a for a, b in result.lifetimes.values())
    assert 0 < total <= 6 * result.end_time
    assert len(sim.pool_members("a")) == 2


def test_a_controller_that_holds_the_counts_changes_nothing() -> None:
    # The same cluster (3 + 3 replicas, serving at once) with and without control ticks that never act.
    reqs = [SimRequest(i, i * 0.004, "ab"[i % 2], 100 + i % 50, 20) for i in range(400)]
    plain = Simulation(SimConfig(tuple(replace_replicas(p, 3) for p in pools(0.0))), make_policy("prefix-load")).run(reqs)
    sim, held = simulate({}, reqs, budget=6, policy="prefix-load")
    assert sim.allocation_log  # it ticked
    assert [(r.replica_id, r.first_token_at, r.finished_at, r.outcome) for r in plain.records] == [
        (r.replica_id, r.first_token_at, r.finished_at, r.outcome) for r in held.records
    ]


def replace_replicas(pool: PoolSpec, n: int) -> PoolSpec:
    from dataclasses import replace

    return replace(pool, replicas=n)


# ----------------------------------------------------------------------------- learned allocator's file


def network(seed: int = 0) -> AllocationNetwork:
    rng = np.random.default_rng(seed)
    n = len(FEATURE_NAMES)
    return AllocationNetwork(np.zeros(n), np.ones(n), ((rng.normal(size=(n, 4)), np.zeros(4)), (rng.normal(size=(4, 2)), np.zeros(2))))


def test_policy_file_round_trip(tmp_path: Path) -> None:
    path = write_allocation_file(tmp_path / "a.json", network(), {"seed": 3})
    raw = json.loads(path.read_text())
    assert raw["format"] == ALLOCATION_FORMAT and raw["features"] == list(FEATURE_NAMES)
    back = load_allocation_file(path)
    x = np.random.default_rng(1).normal(size=(3, len(FEATURE_NAMES)))
    np.testing.assert_allclose(back.outputs(x), network().outputs(x))
    learned = LearnedAllocator(path)
    assert learned.status == "learned"
    got = learned.desired([obs("a", 2, tokens=500.0), obs("b", 3)], config())
    assert set(got) == {"a", "b"} and got["a"] >= 1 and got["b"] >= 0  # b is idle: the bounds lift it


def zero_network() -> AllocationNetwork:
    n = len(FEATURE_NAMES)
    return AllocationNetwork(np.zeros(n), np.ones(n), ((np.zeros((n, 4)), np.zeros(4)), (np.zeros((4, 2)), np.zeros(2))))


def bias_network(y: float, d: float = 0.0) -> AllocationNetwork:
    n = len(FEATURE_NAMES)
    return AllocationNetwork(np.zeros(n), np.ones(n), ((np.zeros((n, 2)), np.array([y, d])),))


def test_all_zero_weights_are_exactly_the_hpa_formula() -> None:
    # The training starts here: every case of the formula (idle, within the tolerance, up, down, no replica).
    cfg = config(hpa_target_tokens_per_replica=1000.0)
    cases = [obs("a", 1, 0.0), obs("a", 2, 2100.0), obs("a", 2, 1900.0), obs("a", 3, 7400.0), obs("a", 6, 900.0),
             obs("a", 0, 2500.0), obs("b", 4, 4000.0)]
    learned = LearnedAllocator(network=zero_network())
    for o in cases:
        assert learned.desired([o], cfg) == HpaAllocator().desired([o], cfg), o


def test_the_output_scales_the_hpa_recommendation() -> None:
    cfg = config(hpa_target_tokens_per_replica=1000.0)
    # 3000 tokens/s: HPA wants 3; exp(log 2) asks for 6, exp(-log 2) for 2 (1.5, rounded up).
    assert LearnedAllocator(network=bias_network(np.log(2.0))).desired([obs("a", 2, 3000.0)], cfg) == {"a": 6}
    assert LearnedAllocator(network=bias_network(-np.log(2.0))).desired([obs("a", 2, 3000.0)], cfg) == {"a": 2}
    # Clipped to x4 whatever the network says.
    assert LearnedAllocator(network=bias_network(50.0)).desired([obs("a", 2, 1000.0)], cfg) == {"a": 4}


def test_the_step_moves_part_of_the_way_and_at_least_one_replica() -> None:
    cfg = config(hpa_target_tokens_per_replica=1000.0)
    up, down = obs("a", 2, 8000.0), obs("a", 8, 1000.0)  # HPA: 8 and 1
    hold = LearnedAllocator(network=bias_network(0.0, -1.0))  # a = 0: a fixed split, whatever the demand
    assert hold.desired([up], cfg) == {"a": 2} and hold.desired([down], cfg) == {"a": 8}
    half = LearnedAllocator(network=bias_network(0.0, -0.5))  # half-way, rounded toward the recommendation
    assert half.desired([up], cfg) == {"a": 5} and half.desired([down], cfg) == {"a": 4}
    crawl = LearnedAllocator(network=bias_network(0.0, -0.99))  # a = 0.01: still one replica per period
    assert crawl.desired([up], cfg) == {"a": 3} and crawl.desired([down], cfg) == {"a": 7}
    # Past -1 or +0 the step saturates: -5 holds, +3 goes all the way.
    assert LearnedAllocator(network=bias_network(0.0, -5.0)).desired([up], cfg) == {"a": 2}
    assert LearnedAllocator(network=bias_network(0.0, 3.0)).desired([up], cfg) == {"a": 8}


def test_the_demand_trend_compares_with_the_previous_period() -> None:
    from switchboard.scheduler.allocation import features

    cfg = config()
    col = FEATURE_NAMES.index("demand_trend")
    assert features(obs("a", 2, 999.0), cfg)[col] == 0.0  # no previous period
    assert features(obs("a", 2, 1999.0), cfg, previous_tokens_per_second=999.0)[col] == pytest.approx(np.log(2.0))
    assert features(obs("a", 2, 0.0), cfg, previous_tokens_per_second=1e9)[col] == -3.0  # clipped
    # The allocator remembers each pool's tokens/s between calls: a network that reads only the trend.
    n = len(FEATURE_NAMES)
    w = np.zeros((n, 2))
    w[col, 0] = 1.0
    learned = LearnedAllocator(network=AllocationNetwork(np.zeros(n), np.ones(n), ((w, np.zeros(2)),)))
    assert learned.desired([obs("a", 2, 1999.0)], config(hpa_target_tokens_per_replica=1000.0)) == {"a": 2}
    # Demand doubled since: HPA would ask for 4, the trend doubles it again.
    assert learned.desired([obs("a", 2, 3999.0)], config(hpa_target_tokens_per_replica=1000.0)) == {"a": 8}


def test_a_file_of_the_first_schema_falls_back_and_names_both_versions(tmp_path) -> None:
    old = ["tokens_per_second", "tokens_per_replica_over_target", "queue_per_replica",
           "inflight_per_replica_over_target", "kv_utilization", "miss_rate", "replicas", "starting_fraction",
           "budget_share"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"format": ALLOCATION_FORMAT, "version": 1, "schema": "allocation-v1", "features": old}))
    learned = LearnedAllocator(path)
    assert learned.status == "fallback to hpa (schema)"
    with pytest.raises(Exception, match="version 1 / schema 'allocation-v1'; this reads version 2 / allocation-v2"):
        load_allocation_file(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "missing"), ("{", "corrupt"), ('{"format": "x"}', "corrupt"),
     (json.dumps({"format": ALLOCATION_FORMAT, "version": 1, "features": ["other"]}), "schema")],
)
def test_a_missing_corrupt_or_other_schema_file_falls_back_to_hpa_and_says_so(tmp_path, caplog, content, reason) -> None:
    path = tmp_path / "alloc.json"
    if content is not None:
        path.write_text(content)
    with caplog.at_level(logging.WARNING):
        learned = LearnedAllocator(path)
    assert learned.network is None and learned.status == f"fallback to hpa ({reason})"
    assert "falls back to hpa" in caplog.text
    observations = [obs("a", 2, tokens=3000.0), obs("b", 2, tokens=2100.0)]
    assert learned.desired(observations, config()) == HpaAllocator().desired(observations, config())


# ----------------------------------------------------------------------------- CLI: a tiny training, then eval


@pytest.fixture
def traces(tmp_path: Path) -> dict[str, Path]:
    import json as _json

    cost = {"fit": {"base_ms": 2.0, "prefill_token_ms": 0.05, "decode_seq_ms": 0.2, "context_token_ms": 0.001},
            "block_size": 16, "kv_blocks_total": 256, "max_num_seqs": 32, "max_tokens_per_step": 256,
            "max_model_len": 1024}
    (tmp_path / "cost.json").write_text(_json.dumps(cost))
    out = {"cost": tmp_path / "cost.json"}
    for name, gap in (("a", 40), ("b", 90)):
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(300):
                # Demand that rises and falls: bursts every 4 s of trace.
                t = i * gap if (i // 20) % 2 else i * gap // 3
                f.write(_json.dumps({"timestamp": t, "input_length": 150 + i % 100, "output_length": 8 + i % 10}) + "\n")
        out[name] = path
    return out


def cli_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["--pool", f"a={files['a']},b={files['b']}", "--cost-profile", str(files["cost"]), "--budget", "4",
            "--period", "0.5", "--cooldown", "1", "--startup-seconds", "0.5", "--hpa-target", "5000",
            "--ttft-slo", "0.2", "--tpot-slo", "0.05", "--step-overhead-ms", "0", "--dispatch-ms", "0", *extra]


def test_a_tiny_training_writes_a_loadable_file_that_eval_uses(traces, tmp_path, capsys) -> None:
    out = tmp_path / "train"
    assert main(["scheduler", "alloc-train", *cli_args(traces), "--episode-seconds", "2", "--population", "3",
                 "--elites", "1", "--iterations", "2", "--episodes-per-candidate", "1", "--val-windows", "1",
                 "--train-window", "0:6", "--val-window", "6:9",
                 "--seed", "4", "--out", str(out)]) == 0
    assert "best validation reward" in capsys.readouterr().out
    net = load_allocation_file(out / "allocation.json")
    assert net.training["seed"] == 4 and net.training["iterations"] == 2
    assert (out / "allocation_learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "checkpoints").glob("iter_*.pt"))) == 2
    ev = tmp_path / "ev"
    assert main(["scheduler", "alloc-eval", *cli_args(traces), "--policy-file", str(out / "allocation.json"),
                 "--windows", "1", "--window-seconds", "2", "--seeds", "0,1", "--out", str(ev)]) == 0
    results = json.loads((ev / "results.json").read_text())["allocators"]
    assert set(results) == {"static", "proportional", "hpa", "keda", "learned"}
    assert results["learned"]["status"] == "learned" and results["learned"]["runs"] == 2
    for row in results.values():
        assert row["requests"] > 0 and row["replica_seconds"] > 0
    # Paired over the same runs: learned - each other allocator, with its interval and wins.
    paired = results["static"]["paired_vs_learned"]["attainment_per_replica"]
    assert paired["runs"] == 2 and paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
    assert "paired over the same runs" in capsys.readouterr().out
    # A tuned baseline runs under its own name; a target on another allocator is refused.
    assert main(["scheduler", "alloc-eval", *cli_args(traces), "--allocators", "hpa,hpa@2500,keda@1",
                 "--windows", "1", "--window-seconds", "2", "--out", str(ev)]) == 0
    tuned = json.loads((ev / "results.json").read_text())["allocators"]
    assert set(tuned) == {"hpa", "hpa@2500", "keda@1"} and tuned["hpa@2500"]["mean_replicas"] >= tuned["hpa"]["mean_replicas"]
    assert main(["scheduler", "alloc-eval", *cli_args(traces), "--allocators", "static@3",
                 "--windows", "1", "--window-seconds", "2", "--out", str(ev)]) == 2
    assert "only hpa@TOKENS and keda@QUEUE take a target" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["scheduler", "alloc-eval", *cli_args(traces), "--allocators", "learned", "--policy-file", str(bad),
                 "--windows", "1", "--window-seconds", "2", "--out", str(ev)]) == 2
    assert "not JSON" in capsys.readouterr().err
