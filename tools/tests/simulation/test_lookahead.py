"""The simulator's look-ahead: exact for the state it forks, and it never disturbs the run it looks into."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.policies import PlacementQuery, make_policy
from switchboard.scheduler.registry import ReplicaView
from switchboard.simulation.cluster import PoolSpec, SimConfig, Simulation
from switchboard.simulation.lookahead import LookaheadPolicy, lookahead_costs, placement_cost
from switchboard.simulation.replica import ReplicaSpec
from switchboard.simulation.workload import SimRequest

COST = CostModel(base_ms=2.0, prefill_token_ms=0.05, decode_seq_ms=0.2, context_token_ms=0.001)
DISPATCH = 0.003


def config(replicas: int = 3) -> SimConfig:
    pool = PoolSpec("a", replicas, COST, ReplicaSpec(num_blocks=512, max_model_len=2048, max_tokens_per_step=256),
                    slo=ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05))
    return SimConfig((pool,), dispatch_seconds=DISPATCH)


def busy_requests(n: int = 120) -> list[SimRequest]:
    # Bursts of long prompts close together (queues build, prefills share steps with decodes),
    # with lulls between them.
    return [SimRequest(i, i * 0.004 + (i // 6) * 0.06, "a", 150 + 97 * (i % 7), 5 + 3 * (i % 5)) for i in range(n)]


class Probe:
    """Ranks as prefix-load does, and records every candidate's look-ahead cost on the way."""

    name = "probe"

    def __init__(self, harm: bool) -> None:
        self.base = make_policy("prefix-load")
        self.harm = harm
        self.sim: Simulation | None = None
        self.costs: dict[str, dict[str, float]] = {}

    def bind(self, sim: Simulation) -> None:
        self.sim = sim

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        assert self.sim is not None
        costs = lookahead_costs(self.sim, candidates, self.harm)
        self.costs[query.request_id] = {v.replica_id: float(c) for v, c in zip(candidates, costs, strict=True)}
        return self.base.rank(query, candidates)


def run(policy, reqs: list[SimRequest]):
    return Simulation(config(), policy).run(reqs)


def test_looking_ahead_changes_nothing_in_the_run() -> None:
    reqs = busy_requests()
    plain = run(make_policy("prefix-load"), reqs)
    probe = Probe(harm=True)
    probed = run(probe, reqs)
    assert len(probe.costs) == len(reqs)
    for a, b in zip(plain.records, probed.records, strict=True):
        assert (a.replica_id, a.first_token_at, a.finished_at, a.cached_prompt_tokens) == (
            b.replica_id, b.first_token_at, b.finished_at, b.cached_prompt_tokens)


def test_the_look_ahead_is_the_real_ttft_when_nothing_arrives_before_the_first_token() -> None:
    reqs = busy_requests()
    probe = Probe(harm=False)
    result = run(probe, reqs)
    records = sorted(result.records, key=lambda r: r.arrival)
    exact = 0
    for i, rec in enumerate(records):
        later = [r for r in records[i + 1 :] if r.replica_id == rec.replica_id and r.arrival + DISPATCH < rec.first_token_at]
        predicted = probe.costs[rec.request_id][rec.replica_id]
        real = rec.first_token_at - rec.arrival
        if not later:  # (a later arrival changes the batches the fork ran without it)
            assert predicted == pytest.approx(real, abs=1e-9)
            exact += 1
    assert exact > 20  # the comparison above really ran


def test_harm_adds_the_delay_to_the_requests_already_queued() -> None:
    reqs = busy_requests()
    own, harmed = Probe(harm=False), Probe(harm=True)
    run(own, reqs)
    run(harmed, reqs)
    gaps = [harmed.costs[rid][r] - own.costs[rid][r] for rid in own.costs for r in own.costs[rid]]
    assert min(gaps) >= -1e-9
    assert sum(g > 1e-6 for g in gaps) > 10


def test_the_look_ahead_policy_places_on_the_cheapest_candidate() -> None:
    reqs = busy_requests()
    policy = LookaheadPolicy(make_policy("prefix-load"))
    chosen: dict[str, tuple[str, float, float]] = {}
    original = policy.rank

    def spy(query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        assert policy.sim is not None
        ranked = original(query, candidates)
        request = policy.sim.placing
        at = policy.sim.now + DISPATCH
        sim = policy.sim
        costs = [placement_cost(sim.replicas[v.replica_id], request, at, en_route=sim.en_route(v.replica_id))
                 for v in candidates]
        chosen[query.request_id] = (ranked[0].replica_id, costs[candidates.index(ranked[0])], min(costs))
        return ranked

    policy.rank = spy  # type: ignore[method-assign]
    result = run(policy, reqs)
    assert all(r.outcome == "ok" for r in result.records)
    assert all(cost == pytest.approx(best, abs=1e-12) for _rid, cost, best in chosen.values())
    assert len({rid for rid, _c, _b in chosen.values()}) == 3


def test_the_look_ahead_needs_its_simulation() -> None:
    sim = Simulation(config(), make_policy("prefix-load"))
    with pytest.raises(RuntimeError, match=r"sim\.placing"):
        lookahead_costs(sim, [])
    sim.run(busy_requests(5))
    views = list(sim.registry.snapshot().replicas.values())
    unbound = LookaheadPolicy(make_policy("prefix-load"))  # outside a Simulation, which binds it
    with pytest.raises(RuntimeError, match="bind"):
        unbound.rank(PlacementQuery("r", "a", prompt_tokens=100, max_tokens=8), views)


def test_a_fork_is_independent_of_its_replica() -> None:
    probe = Probe(harm=True)
    reqs = busy_requests(40)
    result = run(probe, reqs)
    replica = next(iter(result.replicas.values()))
    fork = replica.fork()
    assert fork is not replica and fork.pool is not replica.pool and fork.pool.events is not replica.pool.events
    assert fork.scheduler is not replica.scheduler
    assert np.isclose(fork.busy_until, replica.busy_until)
