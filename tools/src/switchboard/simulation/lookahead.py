"""Replica-local look-ahead: what placing a request on each candidate would cost, read off the simulator.

The teacher of the learned placement policy (issue 17, `train.py`'s `lookahead` method). For each
candidate replica it forks that replica (`SimReplica.fork`: its exact batch, queue, KV blocks and
prefix cache, which no scheduler sees) and runs the fork forward with the engine's own scheduler
and cost model, with the request added where it would arrive (now plus the dispatch delay) and no
other arrival:

    cost = the request's own TTFT there
         + (harm) how much later the requests already there, still without a first token, get theirs

The second term prices the queue the request joins from the other side: a long prompt placed in
front of three waiting ones delays all three. It is exact for the state at the decision and blind to
what arrives after, so it is a myopic oracle, not the optimum: `switchboard scheduler eval` scores
it as a reference row (`--policies lookahead`: what placement could gain with perfect knowledge of
the replicas' state), and training distils it into the network, whose features are only what the
scheduler knows.

Privileged by construction: the running scheduler has heartbeats, not the replicas' memory, so
`LookaheadPolicy` exists only in the simulator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from switchboard.replica.request import Request
from switchboard.scheduler.policies import PlacementPolicy, PlacementQuery
from switchboard.scheduler.registry import ReplicaView
from switchboard.simulation.cluster import Simulation
from switchboard.simulation.replica import SimRecord, SimReplica

# A fork runs until the requests it watches have a first token; this bounds the wake-ups (a
# request that can never be scheduled there would otherwise never give one).
MAX_WAKES = 20_000
# A request that gets no first token within MAX_WAKES counts this late (seconds).
NEVER = 3600.0


def _run_fork(replica: SimReplica, arrivals: Sequence[tuple[float, Request]], watched: Sequence[SimRecord]) -> None:
    """Run a fork as the simulation would run its replica: its wake-ups and the given arrivals in
    time order (at the same instant a wake-up first, as the event heap orders them), until every
    watched record has a first token."""
    pending = list(arrivals)
    wake = replica.next_wake()
    wakes = 0
    while wakes < MAX_WAKES and any(r.first_token_at is None for r in watched):
        if pending and (wake is None or pending[0][0] < wake):
            at, request = pending.pop(0)
            wake = replica.add(request, at)
        elif wake is not None:
            wake = replica.wake(wake)
            wakes += 1
        else:
            break


def _waiting_records(replica: SimReplica) -> list[SimRecord]:
    return [q.state for q in replica.requests() if q.state.first_token_at is None]


def _copy(request: Request) -> Request:
    """A fresh copy of a request not yet on any replica (its record copied too)."""
    record: SimRecord = request.state
    return Request(
        request_id=request.request_id,
        arrival=request.arrival,
        prompt_len=request.prompt_len,
        token_ids=list(request.token_ids),
        max_tokens=request.max_tokens,
        state=SimRecord(record.index, record.request_id, record.expert, record.arrival, record.prompt_tokens,
                        record.output_tokens),
        hash_chain=list(request.hash_chain),
    )


def placement_cost(replica: SimReplica, request: Request, at: float, harm: bool = True,
                   en_route: Sequence[tuple[float, Request]] = ()) -> float:
    """Seconds: the request's TTFT if it reaches `replica` at `at`, plus (harm) the first-token
    delay it adds to the requests there or `en_route` to it without one (module docstring)."""
    with_it = replica.fork()
    coming = [(t, _copy(r)) for t, r in en_route]
    others = _waiting_records(with_it) + [r.state for _t, r in coming]
    arriving = _copy(request)
    record: SimRecord = arriving.state
    arrivals = sorted([*coming, (at, arriving)], key=lambda e: e[0])  # stable: en route first at a tie
    _run_fork(with_it, arrivals, [*others, record])
    cost = _at(record) - record.arrival
    if harm and others:
        without = replica.fork()
        coming = [(t, _copy(r)) for t, r in en_route]
        before = _waiting_records(without) + [r.state for _t, r in coming]
        _run_fork(without, coming, before)
        for a, b in zip(others, before, strict=True):
            cost += _at(a) - _at(b)
    return cost


def _at(record: SimRecord) -> float:
    return record.first_token_at if record.first_token_at is not None else record.arrival + NEVER


def lookahead_costs(sim: Simulation, candidates: Sequence[ReplicaView], harm: bool = True) -> np.ndarray:
    """The cost (seconds) of placing `sim.placing` on each candidate, in the candidates' order."""
    request = sim.placing
    if request is None:
        raise RuntimeError("lookahead_costs needs the request the simulation is placing (sim.placing)")
    config = sim.config
    delay = float(np.mean(config.dispatch_samples)) if config.dispatch_samples else config.dispatch_seconds
    at = sim.now + delay
    return np.array([
        placement_cost(sim.replicas[v.replica_id], request, at, harm, sim.en_route(v.replica_id)) for v in candidates
    ])


def rank_by_costs(ranked: Sequence[ReplicaView], candidates: Sequence[ReplicaView],
                  costs: np.ndarray) -> list[ReplicaView]:
    """`candidates` by `costs` (in the candidates' order), lowest first; ties in the order of `ranked`."""
    order = {v.replica_id: i for i, v in enumerate(ranked)}
    by_id = {v.replica_id: float(c) for v, c in zip(candidates, costs, strict=True)}
    return sorted(candidates, key=lambda v: (by_id[v.replica_id], order[v.replica_id]))


class LookaheadPolicy:
    """Ranks by `lookahead_costs`, lowest first (ties in the order of `base`); simulator only.

    The `Simulation` it places for calls `bind(sim)`: it reads that simulation's replicas.
    """

    name = "lookahead"

    def __init__(self, base: PlacementPolicy, harm: bool = True) -> None:
        self.base = base
        self.harm = harm
        self.sim: Simulation | None = None

    def bind(self, sim: Simulation) -> None:
        self.sim = sim

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        ranked = self.base.rank(query, candidates)
        if len(candidates) < 2:
            return ranked
        if self.sim is None:
            raise RuntimeError("LookaheadPolicy.bind(sim) was not called")
        return rank_by_costs(ranked, candidates, lookahead_costs(self.sim, candidates, self.harm))
