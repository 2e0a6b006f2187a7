"""The cluster simulator: the replica model's timing, fast-forward, faults, prefixes and scoring."""

from __future__ import annotations

import pytest
from switchboard.bench.workload import TraceRequest
from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import prompt_block_hashes
from switchboard.scheduler.policies import make_policy
from switchboard.simulation.cluster import ClusterEvent, PoolSpec, SimConfig, Simulation
from switchboard.simulation.metrics import summarize
from switchboard.simulation.replica import ReplicaSpec
from switchboard.simulation.workload import HashChains, SimRequest, assign_shared_prefixes, from_trace

COST = CostModel(base_ms=2.0, prefill_token_ms=0.05, decode_seq_ms=0.2, context_token_ms=0.001)


def pool(replicas: int = 2, **spec: int) -> PoolSpec:
    return PoolSpec("a", replicas, COST, ReplicaSpec(**{"num_blocks": 512, "max_model_len": 2048, **spec}),
                    slo=ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05))


def requests(n: int, gap: float = 0.01, prompt: int = 100, output: int = 20) -> list[SimRequest]:
    return [SimRequest(i, i * gap, "a", prompt + 7 * (i % 5), output + 3 * (i % 7)) for i in range(n)]


def run(config: SimConfig, reqs: list[SimRequest], policy: str = "least-loaded"):
    return Simulation(config, make_policy(policy)).run(reqs)


def test_one_request_takes_the_cost_models_time() -> None:
    result = run(SimConfig((pool(1),)), [SimRequest(0, 0.0, "a", 100, 5)])
    (rec,) = result.records
    assert rec.outcome == "ok" and rec.generated == 5
    prefill = COST.step_ms(prefill_tokens=100) / 1000
    assert rec.ttft == pytest.approx(prefill)
    # Four more decode steps, with a context of 100, 101, 102 and 103 tokens.
    decodes = sum(COST.step_ms(decode_seqs=1, decode_context_tokens=100 + i) for i in range(4)) / 1000
    assert rec.e2e == pytest.approx(prefill + decodes)


def test_fast_forward_gives_the_same_times_as_step_by_step() -> None:
    reqs = requests(300, gap=0.004)
    fast = run(SimConfig((pool(3),)), reqs)
    slow = run(SimConfig((pool(3),), fast_forward=False), reqs)
    assert [r.outcome for r in fast.records] == ["ok"] * 300
    for a, b in zip(fast.records, slow.records, strict=True):
        assert a.replica_id == b.replica_id
        assert a.first_token_at == pytest.approx(b.first_token_at, abs=1e-9)
        assert a.finished_at == pytest.approx(b.finished_at, abs=1e-9)
    assert sum(r.stats.steps for r in fast.replicas.values()) == sum(r.stats.steps for r in slow.replicas.values())


def test_preemption_under_kv_pressure_still_finishes_every_request() -> None:
    # 40 blocks of 16 tokens cannot hold several 300-token sequences at once.
    result = run(SimConfig((pool(1, num_blocks=40),)), requests(30, gap=0.001, prompt=250, output=60))
    assert all(r.outcome == "ok" for r in result.records)
    assert result.replicas["a-0"].scheduler.num_preemptions > 0
    assert all(r.generated == r.output_tokens for r in result.records)


def test_a_failed_replica_loses_its_streams_and_its_queued_work_is_re_placed() -> None:
    config = SimConfig((pool(2),), events=(ClusterEvent(0.5, "fail", replica_id="a-0"),), expiry_seconds=2.0)
    result = run(config, requests(400, gap=0.002, prompt=200, output=80), policy="round-robin")
    moved = [r for r in result.records if r.placements > 1]
    dropped = [r for r in result.records if r.outcome == "dropped"]
    assert moved and all(r.outcome == "ok" and r.replica_id == "a-1" for r in moved)
    assert dropped and all("a-0 failed" in r.reason for r in dropped)
    # Nothing is placed on the dead replica once it failed (the gateway's retry moves it at once).
    assert all(r.replica_id == "a-1" for r in result.records if r.arrival > 0.5)
    assert result.lifetimes["a-0"][1] == pytest.approx(0.5)


def test_a_drained_replica_finishes_its_work_and_takes_no_more() -> None:
    config = SimConfig((pool(2),), events=(ClusterEvent(0.3, "drain", replica_id="a-0"),))
    result = run(config, requests(200, gap=0.005), policy="round-robin")
    assert all(r.outcome == "ok" for r in result.records)
    late = [r for r in result.records if r.arrival > 0.3]
    assert late and all(r.replica_id == "a-1" for r in late)
    assert "a-0" not in result.replicas or result.lifetimes["a-0"][1] < result.end_time


def test_a_replica_added_later_serves_only_after_its_start_up() -> None:
    p = PoolSpec("a", 1, COST, ReplicaSpec(num_blocks=512), startup_seconds=0.2)
    config = SimConfig((p,), events=(ClusterEvent(0.5, "add", expert="a"),))
    result = run(config, requests(300, gap=0.004), policy="round-robin")
    on_new = [r for r in result.records if r.replica_id == "a-1"]
    assert on_new and min(r.arrival for r in on_new) >= 0.7 - 1e-9
    # Nothing arrived before the first replica started: those requests were rejected, and say why.
    early = [r for r in result.records if r.arrival < 0.2]
    assert early and all(r.outcome == "rejected" and "no healthy replica" in r.reason for r in early)


def test_rejections_count_as_misses() -> None:
    reqs = [SimRequest(0, 0.0, "a", 100, 5), SimRequest(1, 0.0, "b", 100, 5), SimRequest(2, 0.0, "a", 3000, 5)]
    result = run(SimConfig((pool(1),)), reqs)
    outcomes = [(r.outcome, r.reason) for r in result.records]
    assert outcomes[0] == ("ok", "")
    assert outcomes[1][0] == "rejected" and "not in the cluster" in outcomes[1][1]
    assert outcomes[2][0] == "rejected" and "accept at most 2048 tokens" in outcomes[2][1]
    summary = summarize(result)
    assert summary.slo_attainment == pytest.approx(1 / 3)
    assert (summary.completed, summary.rejected) == (1, 2)


def test_shared_prefixes_hit_the_cache_and_hash_as_the_scheduler_does() -> None:
    rows = [TraceRequest(i, i * 0.05, 300, 10) for i in range(60)]
    rows = assign_shared_prefixes(rows, groups=2, prefix_tokens=256, trace_block_size=64)
    reqs = from_trace(rows, lambda _row: "a")
    assert all(r.shared_ids == 4 for r in reqs)  # 256 tokens = 4 trace blocks, shared in each group
    result = run(SimConfig((pool(1),)), reqs)
    assert summarize(result).prefix_hit_rate > 0.5
    # The simulator's shared hashes are the real chain of the synthetic tokens.
    chains = HashChains(16, seed=7, trace_block_size=64)
    ids = reqs[0].hash_ids[:4]
    tokens = [(ids[p // 64] % (1 << 40)) * 64 + p % 64 for p in range(256)]
    assert chains.shared_hashes(ids, 300) == prompt_block_hashes(tokens, 16, 7)


def test_unique_content_gets_unique_hashes() -> None:
    chains = HashChains(16, seed=1, trace_block_size=64)
    a, shared_a = chains.chain(SimRequest(0, 0.0, "a", 100, 40))
    b, shared_b = chains.chain(SimRequest(1, 0.0, "a", 100, 40))
    assert (shared_a, shared_b) == (0, 0)
    assert len(a) == len(b) == 140 // 16 and not set(a) & set(b)


def test_prefix_load_beats_round_robin_on_cache_hits_without_a_hot_spot() -> None:
    # 40 system prompts of 20 blocks: more than one replica's 256 blocks hold, fewer than four do.
    rows = [TraceRequest(i, i * 0.01, 400, 20) for i in range(600)]
    rows = assign_shared_prefixes(rows, groups=40, prefix_tokens=320, trace_block_size=64, zipf=0.5, seed=3)
    reqs = from_trace(rows, lambda _row: "a")
    config = SimConfig((pool(4, num_blocks=256),))
    aware = summarize(run(config, reqs, "prefix-load"))
    blind = summarize(run(config, reqs, "round-robin"))
    assert aware.prefix_hit_rate > blind.prefix_hit_rate
    assert aware.imbalance < 1.5


def test_cluster_events_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown cluster event"):
        ClusterEvent(1.0, "explode", replica_id="a-0")
    with pytest.raises(ValueError, match="needs the expert"):
        ClusterEvent(1.0, "add")
    with pytest.raises(ValueError, match="needs a replica_id"):
        ClusterEvent(1.0, "fail")
