"""The discrete-event cluster simulator: the scheduler's own registry and placement over simulated replicas.

What is real here and what is simulated:
- Placement is the scheduler's code: a `ReplicaRegistry` on the simulated clock, `Placer.place`
  with any policy of `switchboard.scheduler.policies` (or any object with their `rank`), reading
  the cluster snapshot the registry builds, exactly as `Scheduler.Place` does.
- What the registry knows arrives as in the real system: each replica registers after its
  start-up delay, reports its load every heartbeat (running, waiting, KV blocks) with the KV
  events its block pool journaled since the last report (`KvEventJournal.drain`), and each
  finished request is `complete`d; a replica that stops reporting expires after the expiry.
- Each replica is a `SimReplica`: the engine's replica scheduler, KV-cache manager and block pool,
  timed by the replica's fitted cost model.
- The gateway's part is modelled: a request placed on a dead replica (the registry has not expired
  it yet) is re-placed at once on another one, excluding it; when a replica dies, its requests that
  had no token yet are re-placed the same way, and those already streaming are dropped.
- The router's part: each request's expert is fixed before (by the trace or a mix).

Events: arrivals, replica wake-ups (the end of a step or of a planned decode stretch), heartbeats,
and cluster events (a replica added, failed or drained at a given time). Wake-ups carry the
replica's version, so one superseded by a later change is skipped.

Allocation (optional, `Simulation(..., allocation=AllocationController)`): every control period
the controller reads one `PoolObservation` per pool (arrivals since the last tick, the registry's
last reported loads, SLO misses) and sets each pool's replica count. A new replica takes work only
after its pool's `startup_seconds`; a removed one drains (no new placements, nothing en route to it,
its work finishes) before it stops. Replica-seconds count from creation (start-up included) to the
stop. Without a controller nothing of this runs and every result is as before.
"""

from __future__ import annotations

import gc
import heapq
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import hash_seed
from switchboard.replica.kv_events import KvEventBatch
from switchboard.replica.request import Request
from switchboard.scheduler.allocation import AllocationController, PoolObservation
from switchboard.scheduler.placement import Placer, UnknownExperts, placement_request
from switchboard.scheduler.policies import PlacementPolicy
from switchboard.scheduler.prefix_index import KvEventIn, KvEventsIn
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRegistry
from switchboard.scheduler.slo import judge
from switchboard.simulation.replica import ReplicaSpec, SimRecord, SimReplica
from switchboard.simulation.workload import HashChains, SimRequest

# Event kinds, in the order they run at the same instant (cluster changes, then heartbeats,
# then replica steps, then requests finishing, then requests reaching their replica, then arrivals).
_CLUSTER, _HEARTBEAT, _WAKE, _COMPLETE, _DELIVER, _ARRIVAL = 0, 1, 2, 3, 4, 5

_NO_IDS: frozenset[str] = frozenset()

# The payload of an allocation tick: queued with heartbeats' kind, so like them it keeps no run alive.
_ALLOCATE = "<allocate>"

# At most this many KV-event hashes per heartbeat, as the generator's registrar sends.
MAX_REPORT_HASHES = 4096


@dataclass(frozen=True)
class PoolSpec:
    """One expert's pool: how many replicas, what each is, and its objectives."""

    expert: str
    replicas: int
    cost: CostModel
    spec: ReplicaSpec = field(default_factory=ReplicaSpec)
    slo: ExpertSLO | None = None
    step_overhead_ms: float = 0.0
    startup_seconds: float = 0.0
    # Names the model (its prefix hashes are seeded with it); default: the expert's name.
    model_identity: str = ""

    @property
    def hash_seed(self) -> int:
        """The prefix-hash chain seed of this pool's replicas."""
        return hash_seed(self.model_identity or f"sim:{self.expert}")


@dataclass(frozen=True)
class ClusterEvent:
    """A change to the cluster at a simulated time: `add` a replica to a pool, `fail` or `drain` one."""

    at: float
    kind: str  # "add", "fail" or "drain"
    expert: str = ""  # for "add"
    replica_id: str = ""  # for "fail" and "drain"

    def __post_init__(self) -> None:
        if self.kind not in ("add", "fail", "drain"):
            raise ValueError(f"unknown cluster event {self.kind!r}: use add, fail or drain")
        if self.kind == "add" and not self.expert:
            raise ValueError("an add event needs the expert of the new replica")
        if self.kind != "add" and not self.replica_id:
            raise ValueError(f"a {self.kind} event needs a replica_id")


@dataclass(frozen=True)
class SimConfig:
    """The simulated cluster and the scheduler's settings."""

    pools: tuple[PoolSpec, ...]
    heartbeat_seconds: float = 1.0
    expiry_seconds: float = 5.0
    trace_block_size: int = 64
    events: tuple[ClusterEvent, ...] = ()
    seed: int = 0
    # Seconds from a request's arrival at the gateway until its replica has it (the gateway,
    # router and scheduler hops and the stream back, which the replica's cost model does not
    # see); calibrated against the real stack (bench/README.md).
    dispatch_seconds: float = 0.0
    # When given, each request's dispatch time is drawn (seeded) from these instead: an empirical
    # distribution, e.g. real TTFT minus simulated TTFT per request of a calibration run, since
    # the hops slow down when the processes share CPUs with busy generators.
    dispatch_samples: tuple[float, ...] = ()
    fast_forward: bool = True

    def pool(self, expert: str) -> PoolSpec:
        for pool in self.pools:
            if pool.expert == expert:
                return pool
        raise KeyError(expert)


@dataclass
class SimResult:
    """Everything one run produced."""

    records: list[SimRecord]
    replicas: dict[str, SimReplica]
    # replica id -> (started, stopped) in simulated seconds, for replica-seconds.
    lifetimes: dict[str, tuple[float, float]]
    end_time: float
    slos: dict[str, ExpertSLO | None]


class Simulation:
    """One run of a workload on a simulated cluster under one placement policy."""

    def __init__(
        self, config: SimConfig, policy: PlacementPolicy, allocation: AllocationController | None = None
    ) -> None:
        if not config.pools:
            raise ValueError("the simulated cluster needs at least one pool")
        self.config = config
        self.now = 0.0
        self.registry = ReplicaRegistry(config.expiry_seconds, clock=lambda: self.now)
        self.placer = Placer(self.registry, policy, {p.expert for p in config.pools})
        self.replicas: dict[str, SimReplica] = {}
        self.dead: set[str] = set()
        self.draining: set[str] = set()
        self.lifetimes: dict[str, list[float]] = {}
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._arrivals: list[tuple[float, int, int, SimRequest, int]] = []  # in event order (see `run`)
        self._seq = 0
        self._rng = random.Random(config.seed)
        self._dispatch_rng = random.Random(config.seed + 1)
        self._chains = {
            p.expert: HashChains(p.spec.block_size, p.hash_seed, config.trace_block_size) for p in config.pools
        }
        # Expert -> (its pool, the (block size, seed) key of its hash chains), as `config.pool`
        # finds them: looked up once here rather than per arrival (the seed is a blake2b digest).
        self._pools: dict[str, tuple[PoolSpec, tuple[int, int]]] = {}
        for p in config.pools:
            self._pools.setdefault(p.expert, (p, (p.spec.block_size, p.hash_seed)))
        self._counts: dict[str, int] = {}
        self.records: list[SimRecord] = []
        self._acked: dict[str, int] = {}
        self._pending = 0  # events in the heap other than heartbeats
        self._alloc = allocation
        # Allocation only: per expert, arrivals' tokens and count, SLO misses and ends since the
        # last tick; requests placed but not yet delivered per replica (a drained one waits for them).
        self._arrived_tokens: dict[str, int] = {}
        self._arrived: dict[str, int] = {}
        self._misses: dict[str, int] = {}
        self._ended: dict[str, int] = {}
        self._en_route: dict[str, int] = {}
        self._cancelled: set[str] = set()  # removed while starting: they never register
        # (time, {expert: replicas}) after every tick, for plots and tests.
        self.allocation_log: list[tuple[float, dict[str, int]]] = []
        # The request `Placer.place` is placing now: a policy that looks ahead in the simulator
        # (`switchboard.simulation.lookahead`) reads it; the scheduler's policies never do.
        self.placing: Request | None = None
        bind = getattr(policy, "bind", None)
        if bind is not None:  # a simulator-only policy (the look-ahead) reads the run it places for
            bind(self)

    # ----------------------------------------------------------------- setup

    def _push(self, at: float, kind: int, payload: object, version: int = 0) -> None:
        self._seq += 1
        if kind != _HEARTBEAT:
            self._pending += 1
        heapq.heappush(self._heap, (at, kind, self._seq, payload, version))

    def _new_replica(self, pool: PoolSpec, at: float, startup: float | None = None) -> None:
        n = self._counts.get(pool.expert, 0)
        self._counts[pool.expert] = n + 1
        rid = f"{pool.expert}-{n}"
        replica = SimReplica(
            rid, pool.expert, pool.cost, pool.spec, pool.hash_seed, pool.step_overhead_ms, self.config.fast_forward
        )
        startup = pool.startup_seconds if startup is None else startup
        replica.busy_until = at + startup
        self.replicas[rid] = replica
        self.lifetimes[rid] = [at, at]
        # It registers once started, then reports every heartbeat (at a random phase, as real
        # replicas started at different times do).
        self._push(at + startup, _CLUSTER, ("register", rid))

    def _info(self, replica: SimReplica) -> ReplicaInfo:
        spec = replica.spec
        return ReplicaInfo(
            replica_id=replica.replica_id,
            expert=replica.expert,
            address=f"sim:{replica.replica_id}",
            device="sim",
            model_name=replica.expert,
            max_model_len=spec.max_model_len,
            kv_block_size=spec.block_size,
            kv_hash_seed=replica.hash_seed,
            cost_model=replica.cost,
        )

    # ----------------------------------------------------------------- run

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        """Simulate every request to its end; returns the records and the replicas."""
        if self._alloc is None:
            for pool in self.config.pools:
                for _ in range(pool.replicas):
                    self._new_replica(pool, 0.0)
        else:
            # The run starts warm: the controller's initial counts, serving at once.
            initial = self._alloc.initial()
            for pool in self.config.pools:
                for _ in range(initial.get(pool.expert, 0)):
                    self._new_replica(pool, 0.0, startup=0.0)
            self._push(self._alloc.config.period_seconds, _HEARTBEAT, _ALLOCATE)
        for event in self.config.events:
            self._push(event.at, _CLUSTER, event)
        # Every arrival at once, as the entries a push each would make, but kept out of the heap:
        # sorted in one list that `_loop` merges with the heap. The events run in the same order
        # (no two entries compare equal), and the heap holds only the few pending wake-ups,
        # heartbeats and completions instead of every future arrival, so each push and pop
        # sifts through a handful of levels rather than ~15.
        seq = self._seq
        self._arrivals = sorted((req.arrival, _ARRIVAL, seq + i, req, 0) for i, req in enumerate(requests, 1))
        self._seq = seq + len(requests)
        self._pending += len(requests)
        # The run allocates millions of short-lived objects and keeps every record: the cyclic
        # collector's passes over that growing heap cost about 5% of the run, and the simulator's
        # objects form no cycles that need it, so it is paused for the loop (and restored after).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._loop()
        finally:
            if collecting:
                gc.enable()
        return self._finish()

    def _loop(self) -> None:
        """Run events in time order until none is left (or only heartbeats, with no work left)."""
        heap = self._heap
        arrivals = self._arrivals
        n_arrivals = len(arrivals)
        next_arrival = 0
        heappop = heapq.heappop
        while True:
            # The next event: the first arrival left or the heap's first, whichever sorts first.
            if next_arrival < n_arrivals and (not heap or arrivals[next_arrival] < heap[0]):
                entry = arrivals[next_arrival]
                next_arrival += 1
                self.now = entry[0]
                self._pending -= 1
                self._arrive(entry[3])
                continue
            if not heap:
                break
            at, kind, _seq, payload, version = heappop(heap)
            self.now = at
            if kind == _HEARTBEAT:
                # Heartbeats go on forever: stop once nothing else is left and no replica has work.
                if self._pending == 0 and not self._busy():
                    break
                self._heartbeat(payload)  # type: ignore[arg-type]
                continue
            self._pending -= 1
            if kind == _WAKE:
                replica: SimReplica = payload  # type: ignore[assignment]
                if version == replica.version and replica.replica_id not in self.dead:
                    self._wake(replica)
            elif kind == _DELIVER:
                self._deliver(payload, wake_now=True)  # type: ignore[arg-type]
            elif kind == _COMPLETE:
                self._complete(payload)  # type: ignore[arg-type]
            else:
                self._cluster_event(payload)

    def _finish(self) -> SimResult:
        """The result, once the events are done: what was still running counts as dropped."""
        end = self.now
        for rid, span in self.lifetimes.items():
            if rid not in self.dead:
                span[1] = max(span[1], end)
        for record in self.records:
            if not record.outcome:
                record.outcome, record.reason = "dropped", "the simulation ended first"
        return SimResult(
            self.records,
            self.replicas,
            {rid: (span[0], span[1]) for rid, span in self.lifetimes.items()},
            end,
            {p.expert: p.slo for p in self.config.pools},
        )

    def en_route(self, replica_id: str) -> list[tuple[float, Request]]:
        """The requests placed on `replica_id` that have not reached it yet, with the times they
        will, in delivery order (what a look-ahead must add to a fork of that replica)."""
        entries = [e for e in self._heap if e[1] == _DELIVER and e[3].state.replica_id == replica_id]  # type: ignore[union-attr]
        entries.sort(key=lambda e: (e[0], e[2]))
        return [(e[0], e[3]) for e in entries]  # type: ignore[misc]

    def _busy(self) -> bool:
        """Whether a live replica still holds work."""
        return any(r.has_work() for rid, r in self.replicas.items() if rid not in self.dead)

    # ----------------------------------------------------------------- events

    def _arrive(self, sim: SimRequest) -> None:
        found = self._pools.get(sim.expert)
        record = SimRecord(sim.index, str(sim.index), sim.expert, sim.arrival, sim.prompt_tokens, sim.output_tokens)
        self.records.append(record)
        if found is None:
            record.outcome, record.reason = "rejected", f"expert {sim.expert!r} is not in the cluster"
            return
        if self._alloc is not None:
            expert = sim.expert
            self._arrived[expert] = self._arrived.get(expert, 0) + 1
            self._arrived_tokens[expert] = self._arrived_tokens.get(expert, 0) + sim.prompt_tokens + sim.output_tokens
        pool, chain_key = found
        chain, shared = self._chains[sim.expert].chain(sim)
        req = Request(
            request_id=record.request_id,
            arrival=sim.index,
            prompt_len=sim.prompt_tokens,
            token_ids=[0] * sim.prompt_tokens,
            max_tokens=sim.output_tokens,
            state=record,
            hash_chain=chain,
        )
        # The query's hashes: only the shared blocks can match a cache; hashing the unique rest
        # (as the scheduler would from token ids) only costs time, so it is given as known.
        prompt_blocks = sim.prompt_tokens // pool.spec.block_size
        record.query_hashes = {chain_key: chain[: min(shared, prompt_blocks)]}
        self._place(req, _NO_IDS, True)  # wake_now

    def _place(self, req: Request, exclude: frozenset[str], wake_now: bool = False) -> None:
        """Place a request (re-placing it while its primary is dead) and deliver it; `wake_now`: as
        for `_deliver`."""
        record: SimRecord = req.state
        self.placing = req
        while True:
            placement = placement_request(  # `PlacementRequest(...)`, built faster
                record.request_id,
                (record.expert,),
                record.prompt_tokens,  # prompt_tokens
                record.output_tokens,  # max_tokens
                exclude,  # exclude_replica_ids
                record.prompt_tokens + record.output_tokens,  # min_model_len
                record.query_hashes,  # block_hashes
            )
            try:
                result = self.placer.place(placement)
            except UnknownExperts as exc:
                record.outcome, record.reason = "rejected", str(exc)
                if self._alloc is not None:
                    self._ended_request(record)
                return
            placements = result.placements  # `result.primary`, without the property call
            if not placements:
                record.outcome, record.reason = "rejected", result.reasons()
                if self._alloc is not None:
                    self._ended_request(record)
                return
            rid = placements[0].replica.replica_id
            if rid in self.dead:
                # The gateway's connection fails at once: it re-places, excluding that replica.
                exclude = exclude | {rid}
                continue
            break
        record.replica_id = rid
        record.placements += 1
        samples = self.config.dispatch_samples
        delay = self._dispatch_rng.choice(samples) if samples else self.config.dispatch_seconds
        if delay > 0:
            if self._alloc is not None:
                self._en_route[rid] = self._en_route.get(rid, 0) + 1
            self._push(self.now + delay, _DELIVER, req)
        else:
            self._deliver(req, wake_now)

    def _deliver(self, req: Request, wake_now: bool = False) -> None:
        """The request reaches its replica (which may have died on the way: then it is re-placed).

        `wake_now`: the caller is an event handler with nothing left to do after this call, so a
        wake-up due now that would be the very next event may run at once instead of through the
        heap (every request arriving at an idle replica saves a push and a pop).
        """
        record: SimRecord = req.state
        rid = record.replica_id
        if self._alloc is not None and self._en_route.get(rid):
            self._en_route[rid] -= 1
        if rid in self.dead:
            self._place(req, frozenset({rid}), wake_now)
            return
        replica = self.replicas[rid]
        now = self.now
        wake = replica.add(req, now)
        if wake_now and wake == now:
            heap = self._heap
            # Next iff nothing in the heap sorts before (now, _WAKE, a fresh sequence).
            if not heap or heap[0][0] > now or (heap[0][0] == now and heap[0][1] > _WAKE):
                self._wake(replica)
                return
        # `_push(wake, _WAKE, replica, replica.version)`, inlined here and in `_wake` (every
        # request passes both).
        self._seq += 1
        self._pending += 1
        heapq.heappush(self._heap, (wake, _WAKE, self._seq, replica, replica.version))

    def _wake(self, replica: SimReplica) -> None:
        """Run a replica's wake-up: always the last thing its event handler does (from `_loop`, or
        from `_deliver` with `wake_now`), which the Complete shortcut below relies on."""
        now = self.now
        nxt = replica.wake(now)
        # A step is applied when it starts; its requests finish (and the gateway says Complete)
        # when it ends.
        finished = replica.finished
        due: list[SimRecord] = []  # Complete events due now (the end of a decode stretch)
        if finished:
            for record in finished:
                if record.finished_at == now:
                    due.append(record)
                else:
                    self._push(record.finished_at, _COMPLETE, record)
            finished.clear()
        if nxt is not None:
            self._seq += 1
            self._pending += 1
            heapq.heappush(self._heap, (nxt, _WAKE, self._seq, replica, replica.version))
        elif replica.replica_id in self.draining and not self._en_route.get(replica.replica_id):
            self._stop(replica)
        if due:
            # Complete events due now would be the very next events when nothing in the heap sorts
            # before (now, _COMPLETE, a fresh sequence): then they run at once, in order, instead
            # of through the heap (most requests end with a stretch; this saves a push and a pop).
            heap = self._heap
            if not heap or heap[0][0] > now or (heap[0][0] == now and heap[0][1] > _COMPLETE):
                for record in due:
                    self._complete(record)
            else:
                for record in due:
                    self._push(now, _COMPLETE, record)

    def _complete(self, record: SimRecord) -> None:
        """The step that produced a request's last token ended: it succeeded, unless its replica
        failed during that step."""
        rid = record.replica_id
        if rid in self.dead and self.lifetimes[rid][1] < self.now and rid not in self.draining:
            record.outcome, record.reason = "dropped", f"replica {rid} failed while streaming"
            record.finished_at = None
        else:
            record.outcome = "ok"
        self.registry.complete(record.request_id)
        if self._alloc is not None:
            self._ended_request(record)

    def _heartbeat(self, rid: str) -> None:
        if rid is _ALLOCATE:
            self._allocate()
            return
        replica = self.replicas[rid]
        if rid in self.dead:
            return
        if replica.sync(self.now):
            self._push(replica.busy_until, _WAKE, replica, replica.version)
        pool = replica.pool
        load = LoadSnapshot(replica.num_running, replica.num_waiting, pool.num_used, pool.num_blocks)
        self.registry.report_load(rid, load, draining=rid in self.draining)
        self.registry.expire()  # the scheduler's sweep
        batch = pool.events.drain(self._acked.get(rid, 0), MAX_REPORT_HASHES)
        if batch.events:
            ack = self.registry.apply_kv_events(rid, _events_in(batch))
            if ack is not None:
                if ack.resync_needed:
                    snap = pool.events.snapshot(MAX_REPORT_HASHES)
                    ack = self.registry.apply_kv_events(rid, _events_in(snap)) or ack
                self._acked[rid] = ack.acked_sequence
        self._push(self.now + self.config.heartbeat_seconds, _HEARTBEAT, rid)

    def _cluster_event(self, payload: object) -> None:
        if isinstance(payload, tuple):  # ("register", rid): a replica finished starting
            rid = payload[1]
            if rid in self._cancelled:
                return
            replica = self.replicas[rid]
            self.registry.register(self._info(replica), LoadSnapshot(0, 0, 0, replica.pool.num_blocks))
            snap = replica.pool.events.snapshot(MAX_REPORT_HASHES)
            ack = self.registry.apply_kv_events(rid, _events_in(snap))
            self._acked[rid] = ack.acked_sequence if ack else 0
            phase = self._rng.random() * self.config.heartbeat_seconds
            self._push(self.now + phase, _HEARTBEAT, rid)
            return
        event: ClusterEvent = payload  # type: ignore[assignment]
        if event.kind == "add":
            self._new_replica(self.config.pool(event.expert), self.now)
            return
        replica = self.replicas.get(event.replica_id)
        if replica is None or event.replica_id in self.dead:
            return
        if event.kind == "drain":
            self.draining.add(event.replica_id)
            # The generator reports draining at once on SIGTERM, then finishes its work.
            known = self.registry.get(event.replica_id)
            if known is not None:
                self.registry.report_load(event.replica_id, known.load, draining=True)
            if replica.sync(self.now):
                self._push(replica.busy_until, _WAKE, replica, replica.version)
            if not replica.has_work():
                self._stop(replica)
            return
        self._fail(replica)

    def _fail(self, replica: SimReplica) -> None:
        """The replica dies: its not-yet-streaming requests are re-placed, the others dropped."""
        rid = replica.replica_id
        replica.sync(self.now)
        self.dead.add(rid)
        self.lifetimes[rid][1] = self.now
        for req in replica.drop_all():
            record: SimRecord = req.state
            if record.first_token_at is None:
                fresh = Request(
                    request_id=req.request_id,
                    arrival=req.arrival,
                    prompt_len=req.prompt_len,
                    token_ids=[0] * req.prompt_len,
                    max_tokens=req.max_tokens,
                    state=record,
                )
                fresh.hash_chain = req.hash_chain
                self._place(fresh, frozenset({rid}))
            else:
                record.outcome, record.reason = "dropped", f"replica {rid} failed while streaming"
                record.finished_at = None
                self.registry.complete(record.request_id)
                if self._alloc is not None:
                    self._ended_request(record)
        # The registry keeps it until it expires (no more heartbeats): placements on it meanwhile
        # fail over at once (see `_place`).

    # ----------------------------------------------------------------- allocation

    def _ended_request(self, record: SimRecord) -> None:
        """Count a request that ended (met or missed its objectives) for the next observation."""
        expert = record.expert
        self._ended[expert] = self._ended.get(expert, 0) + 1
        ok = record.outcome == "ok" and record.ttft is not None and record.e2e is not None
        if ok:
            slo = self._pools[expert][0].slo
            ok = judge(slo, True, record.ttft, record.e2e, record.generated).good
        if not ok:
            self._misses[expert] = self._misses.get(expert, 0) + 1

    def pool_members(self, expert: str) -> list[SimReplica]:
        """The pool's current replicas: live (ready or starting) and not draining."""
        return [
            r for rid, r in self.replicas.items()
            if r.expert == expert and rid not in self.dead and rid not in self.draining
        ]

    def observe(self) -> list[PoolObservation]:
        """Every pool's observation since the last tick (what an autoscaler would scrape)."""
        assert self._alloc is not None
        period = self._alloc.config.period_seconds
        out = []
        for pool in self.config.pools:
            expert = pool.expert
            members = self.pool_members(expert)
            waiting = running = 0
            kv: list[float] = []
            ready = 0
            for r in members:
                known = self.registry.get(r.replica_id)
                if known is None:
                    continue
                ready += 1
                waiting += known.load.waiting
                running += known.load.running
                kv.append(known.load.kv_utilization)
            out.append(PoolObservation(
                expert=expert,
                tokens_per_second=self._arrived_tokens.get(expert, 0) / period,
                requests_per_second=self._arrived.get(expert, 0) / period,
                queue_depth=waiting,
                running=running,
                kv_utilization=sum(kv) / len(kv) if kv else 0.0,
                slo_misses=self._misses.get(expert, 0),
                finished=self._ended.get(expert, 0),
                replicas=len(members),
                ready=ready,
            ))
        return out

    def _allocate(self) -> None:
        """One control tick: observe, let the controller decide, add or drain replicas."""
        controller = self._alloc
        assert controller is not None
        observations = self.observe()
        self._arrived_tokens.clear()
        self._arrived.clear()
        self._misses.clear()
        self._ended.clear()
        applied = controller.step(observations, self.now)
        for pool in self.config.pools:
            members = self.pool_members(pool.expert)
            change = applied.get(pool.expert, len(members)) - len(members)
            for _ in range(change):
                self._new_replica(pool, self.now)
            for replica in self._victims(members, -change):
                self._remove(replica)
        self.allocation_log.append((self.now, {p.expert: len(self.pool_members(p.expert)) for p in self.config.pools}))
        self._push(self.now + controller.config.period_seconds, _HEARTBEAT, _ALLOCATE)

    def _victims(self, members: list[SimReplica], count: int) -> list[SimReplica]:
        """Which replicas a scale-down removes: starting ones first (newest first), then the least busy."""
        if count <= 0:
            return []

        def key(r: SimReplica) -> tuple[int, int, int]:
            known = self.registry.get(r.replica_id)
            index = int(r.replica_id.rsplit("-", 1)[1])
            if known is None:
                return (0, 0, -index)
            return (1, r.num_running + r.num_waiting + known.inflight, -index)

        return sorted(members, key=key)[:count]

    def _remove(self, replica: SimReplica) -> None:
        """Scale-down of one replica: a starting one is cancelled, a ready one drains first."""
        rid = replica.replica_id
        if self.registry.get(rid) is None:
            self._cancelled.add(rid)
            self.dead.add(rid)
            self.lifetimes[rid][1] = self.now
            return
        self.draining.add(rid)
        known = self.registry.get(rid)
        if known is not None:
            self.registry.report_load(rid, known.load, draining=True)
        if replica.sync(self.now):
            self._push(replica.busy_until, _WAKE, replica, replica.version)
        if not replica.has_work() and not self._en_route.get(rid):
            self._stop(replica)

    def _stop(self, replica: SimReplica) -> None:
        """A drained replica with no work left deregisters and stops."""
        rid = replica.replica_id
        self.dead.add(rid)
        self.lifetimes[rid][1] = self.now
        self.registry.deregister(rid)


def _events_in(batch: KvEventBatch) -> KvEventsIn:
    """A replica's journal batch as the scheduler's input type (what the protobuf round trip gives)."""
    return KvEventsIn(
        tuple(KvEventIn(e.sequence, e.stored, e.evicted, e.cleared) for e in batch.events), reset=batch.reset
    )


def policy_factory(
    name: str, seed: int = 0, slos: Mapping[str, ExpertSLO | None] | None = None
) -> Callable[[], PlacementPolicy]:
    """A factory of fresh policies (each run needs its own state: cursors, RNG), given the
    experts' objectives as the scheduler's app gives them."""
    from switchboard.scheduler.policies import make_policy

    make_policy(name, seed, slos=slos)  # fail early on an unknown name
    return lambda: make_policy(name, seed, slos=slos)
