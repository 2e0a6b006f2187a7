"""One simulated replica: the engine's own scheduler, KV-cache manager and block pool, timed by a cost model.

`SimReplica` runs `switchboard.replica.Scheduler` exactly as the generator's engine does
(`schedule()` -> a step -> `update()`), with the step's duration predicted by the replica's fitted
`CostModel` instead of measured on a model. Sampled tokens are placeholders: the simulator needs
how many tokens a request produces (fixed by its trace row), not which.

Fast-forward. Most of a replica's steps are decode-only steps of an unchanged batch: every running
request computes one token and nobody is admitted or finishes. Running them one by one through
`schedule()` would cap the simulator far below the speed training needs, so after each real step
`SimReplica` checks whether the next steps are such a stretch (every running request is decoding,
none waits that could be admitted, the batch fits the token budget, nobody reaches its last token,
and the blocks the stretch needs are free), and then plans the whole stretch at once: step i of it
takes `a + b*i` ms (the decode context grows by the batch size every step), so its k steps end at
a closed-form time. A stretch runs up to the step where the first of its requests samples its last
token; those finish when the stretch ends, with the reason `update()` gives ("length"). The
stretch is applied when it ends or, cut short, when a request arrives (or a heartbeat reads the
replica): then exactly the steps that started before that instant are applied (the one in flight
completes first, as on the engine), which leaves the replica in the state the one-by-one loop
would reach. A test checks both paths give the same per-request times.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

from switchboard.replica.block_pool import BlockPool
from switchboard.replica.cost_model import CostModel
from switchboard.replica.kv_events import KvEventJournal
from switchboard.replica.outputs import model_runner_output
from switchboard.replica.request import Request, RequestStatus
from switchboard.replica.scheduler import Scheduler

# The placeholder token every simulated sample produces (its value never matters: the trace fixes
# how many tokens a request generates, and its generated blocks get unique hashes up front).
SAMPLED_TOKEN = 0


@dataclass(frozen=True)
class ReplicaSpec:
    """The engine settings of a simulated replica (the generator's GENERATOR_* settings)."""

    num_blocks: int = 4096
    block_size: int = 16
    max_num_seqs: int = 64
    max_tokens_per_step: int = 512
    prefix_caching: bool = True
    max_model_len: int = 0  # 0: no limit

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(eq=False)
class SimRecord:
    """What happened to one request: filled in as the simulation runs (times in simulated seconds)."""

    index: int
    request_id: str
    expert: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    replica_id: str = ""
    placements: int = 0  # times placed (more than 1: re-placed after a failure)
    first_token_at: float | None = None
    finished_at: float | None = None
    generated: int = 0
    cached_prompt_tokens: int = 0
    outcome: str = ""  # "" while running; "ok", "rejected" or "dropped" at the end
    reason: str = ""
    # The prompt's shared hash chain by (block size, seed), handed to placement as known hashes.
    query_hashes: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)

    @property
    def ttft(self) -> float | None:
        """Time to first token (None: never got one)."""
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def e2e(self) -> float | None:
        """Arrival to last token (None: did not finish)."""
        return None if self.finished_at is None else self.finished_at - self.arrival

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None with fewer than two)."""
        if self.finished_at is None or self.first_token_at is None or self.generated < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.generated - 1)


@dataclass(slots=True)
class _Stretch:
    """A planned run of identical decode-only steps, not yet applied."""

    start: float  # simulated seconds
    steps: int
    a_ms: float  # duration of its first step
    b_ms: float  # growth per step
    # `elapsed(steps)` and `start + elapsed(steps)`, the whole stretch's (worked out once when
    # it is planned: asked then, when it is applied, and for the busy time).
    span: float
    end: float

    def elapsed(self, steps: int) -> float:
        """Seconds from the start until `steps` of its steps have finished."""
        return (steps * self.a_ms + self.b_ms * steps * (steps - 1) / 2) / 1000.0

    def started_before(self, t: float) -> int:
        """How many of its steps start strictly before time `t`."""
        dt_ms = (t - self.start) * 1000.0
        if dt_ms <= 0:
            return 0
        a, b = self.a_ms, self.b_ms
        # Steps 0..j-1 started before t iff elapsed(j - 1) < dt: solve the quadratic, then fix rounding.
        if b > 1e-12:
            disc = (a - b / 2) ** 2 + 2 * b * dt_ms
            j = int((-(a - b / 2) + math.sqrt(disc)) / b) + 1
        else:
            j = int(dt_ms / a) + 1 if a > 0 else self.steps
        j = max(0, min(j, self.steps))
        while j > 0 and self.elapsed(j - 1) * 1000.0 >= dt_ms:
            j -= 1
        while j < self.steps and self.elapsed(j) * 1000.0 < dt_ms:
            j += 1
        return j


@dataclass
class ReplicaStats:
    """Counters of one simulated replica."""

    steps: int = 0
    busy_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    requests: int = 0


@dataclass(eq=False)
class SimReplica:
    """One replica of an expert: the real replica scheduler advanced in simulated time."""

    replica_id: str
    expert: str
    cost: CostModel
    spec: ReplicaSpec
    hash_seed: int
    # Added to every step's predicted time: what the engine spends per step outside the model
    # (scheduling, sampling, delivery), which the step profile does not time. Calibrated.
    step_overhead_ms: float = 0.0
    # Off: every step goes through `schedule()` one by one (slow; the reference the tests compare with).
    fast_forward: bool = True
    busy_until: float = 0.0
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    _stretch: _Stretch | None = None
    # Bumped whenever the replica's next wake-up moves, so the cluster can drop stale wake-ups.
    version: int = 0

    def __post_init__(self) -> None:
        spec = self.spec
        self.pool = BlockPool(spec.num_blocks)
        self.scheduler = Scheduler(
            self.pool,
            block_size=spec.block_size,
            max_num_seqs=spec.max_num_seqs,
            max_tokens_per_step=spec.max_tokens_per_step,
            enable_prefix_caching=spec.prefix_caching,
            hash_seed=self.hash_seed,
            max_model_len=spec.max_model_len or None,
            step_inputs=False,  # nothing here reads the entries' block ids or token ids
        )
        self.finished: list[SimRecord] = []  # filled by steps; the cluster collects and clears it

    # ----------------------------------------------------------------- queries

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_work(self) -> bool:
        """Whether anything waits or runs (including a planned stretch)."""
        return self.scheduler.has_work()

    def requests(self) -> list[Request]:
        """Every request it holds, running first."""
        return [*self.scheduler.running, *self.scheduler.waiting]

    # ----------------------------------------------------------------- driving

    def add(self, req: Request, now: float) -> float:
        """Queue a request arriving at `now`; returns when the replica next needs `wake`."""
        if self._stretch is not None:  # `sync` has nothing to do otherwise (most arrivals)
            self.sync(now)
        self.scheduler.waiting.append(req)  # `scheduler.add(req)`, inlined
        self.stats.requests += 1
        self.version += 1
        busy = self.busy_until
        return now if now > busy else busy  # `max(busy, now)`, without the call

    def sync(self, now: float) -> bool:
        """Apply a planned stretch up to `now`: the steps that started before it (and so finish).

        Returns whether a stretch was cut: the replica then needs a new wake-up at `busy_until`.
        """
        stretch = self._stretch
        if stretch is None:
            return False
        done = stretch.started_before(now)
        self._stretch = None
        self.version += 1
        end = stretch.start + stretch.elapsed(done) if done < stretch.steps else stretch.end
        if done:
            self._apply_decodes(done, end, stretch)
        self.busy_until = end
        return True

    def wake(self, now: float) -> float | None:
        """Run what is due at `now` (a finished stretch, then one real step, then maybe plan a
        stretch); returns the next wake-up time, or None when the replica is idle."""
        stretch = self._stretch
        if stretch is not None:
            self._stretch = None
            end = stretch.end
            self._apply_decodes(stretch.steps, end, stretch)
            self.busy_until = end
            if end > now:  # `now = max(now, end)`
                now = end
        sched = self.scheduler
        if not (sched.waiting or sched.running):  # `has_work()`
            return None
        busy = self.busy_until
        start = busy if busy > now else now  # `max(now, busy)`
        end = self._step(start)
        if end is None:
            return None
        self.busy_until = end
        self._plan_stretch(end)
        stretch = self._stretch
        if stretch is not None:
            return stretch.end
        return end

    def next_wake(self) -> float | None:
        """When the simulation will next wake it: its planned stretch's end, else its step's; None
        when idle."""
        stretch = self._stretch
        if stretch is not None:
            return stretch.end
        return self.busy_until if self.has_work() else None

    def fork(self) -> SimReplica:
        """An independent copy to run ahead (`switchboard.simulation.lookahead`): its requests and
        their records are copies, so nothing it does reaches this replica or the run's results.

        The block pool's KV-event journal is not copied: the copy journals into a fresh one that
        nobody drains (the journal mirrors the whole cached set, and a look ahead never reports).
        """
        memo = {id(self.pool.events): KvEventJournal(max_hashes=1 << 30)}
        return copy.deepcopy(self, memo)

    def drop_all(self) -> list[Request]:
        """Take every request out (the replica failed); returns them, their blocks freed."""
        self._stretch = None
        self.version += 1
        out = self.requests()
        for req in out:
            self.scheduler.finish(req, "aborted")
        return out

    # ----------------------------------------------------------------- internals

    def _step(self, start: float) -> float | None:
        """One real engine step starting at `start`; returns its end (None: nothing to run)."""
        sched = self.scheduler
        plan = sched.schedule()
        scheduled = plan.scheduled
        if not scheduled:
            return None
        # `StepComposition.of(plan)` and `CostModel.predict` in one pass that also collects the
        # sampling requests (the same sums, so the same float time): this runs once per real step.
        prefill = decodes = context = 0
        sampling: list[Request] = []
        for s in scheduled:
            n = s.num_new_tokens
            if n == 1:
                decodes += 1
                context += s.num_computed_tokens
            else:
                prefill += n
            if s.sample:
                sampling.append(s.request)
        duration = (self.cost.step_ms(prefill, decodes, context) + self.step_overhead_ms) / 1000.0
        end = start + duration
        stats = self.stats
        stats.steps += 1
        stats.busy_seconds += duration
        stats.prefill_tokens += prefill
        stats.decode_tokens += decodes
        for req in sampling:
            record: SimRecord = req.state
            if record.first_token_at is None:
                record.first_token_at = end
                record.cached_prompt_tokens = req.cached_prompt_tokens or 0
        ids = (sampling[0].request_id,) if len(sampling) == 1 else tuple([r.request_id for r in sampling])
        runner = model_runner_output(ids, (SAMPLED_TOKEN,) * len(sampling))
        for out in sched.update(plan, runner):
            req = out.request
            record = req.state
            record.generated = len(req.token_ids) - req.prompt_len
            if out.finish_reason is not None:
                record.finished_at = end
                self.finished.append(record)
        return end

    def _plan_stretch(self, start: float) -> None:
        """Plan the decode-only steps that follow, when they are a stretch (module docstring)."""
        if not self.fast_forward:
            return
        sched = self.scheduler
        running = sched.running
        batch = len(running)
        if batch == 0 or batch > sched.max_tokens_per_step:
            return
        if sched.waiting and batch < sched.max_num_seqs:
            return  # the next step may admit a request
        max_len = sched.max_model_len
        steps = 1 << 30
        context = 0
        for req in running:
            n_tokens = len(req.token_ids)
            if n_tokens - req.num_computed != 1:
                return  # a prefill chunk is pending
            left = (req.max_tokens or 1 << 30) - (n_tokens - req.prompt_len)
            if max_len is not None and max_len - n_tokens < left:
                left = max_len - n_tokens
            if left < steps:
                steps = left
            context += req.num_computed
        if steps < 2:
            return
        if batch == 1:
            # `_fit_blocks` for a batch of one, inlined (the usual batch): its blocks for `steps`
            # more tokens, when the pool has them.
            bs = sched.block_size
            need = (context + steps + bs - 1) // bs - len(running[0].block_table)
            if need > self.pool.num_free:
                steps = self._fit_blocks(steps)
        else:
            steps = self._fit_blocks(steps)
        if steps < 2:
            return
        fit = self.cost
        a = (
            fit.base_ms
            + fit.decode_seq_ms * batch
            + fit.context_token_ms * context
            + self.step_overhead_ms
        )
        # `_Stretch.planned(...)`, inlined: `span` is `elapsed(steps)`, the same expression.
        b = fit.context_token_ms * batch
        span = (steps * a + b * steps * (steps - 1) / 2) / 1000.0
        self._stretch = _Stretch(start, steps, a, b, span, start + span)
        self.version += 1

    def _blocks_needed(self, steps: int) -> int:
        # `KVCacheManager.new_blocks_needed` summed over the batch, inlined (asked after every step).
        bs = self.scheduler.block_size
        total = 0
        for req in self.scheduler.running:
            need = (req.num_computed + steps + bs - 1) // bs - len(req.block_table)
            if need > 0:
                total += need
        return total

    def _fit_blocks(self, steps: int) -> int:
        """The most steps (<= `steps`) whose new blocks the pool can hand out without preempting."""
        free = self.pool.num_free
        if self._blocks_needed(steps) <= free:
            return steps  # the usual case: no search
        lo, hi = 0, steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._blocks_needed(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _apply_decodes(self, steps: int, end: float, stretch: _Stretch) -> None:
        """Apply `steps` decode steps of the planned batch: as many tokens per request, and their blocks.

        Blocks are handed out in the order the one-by-one steps would take them (step by step, and
        within a step in the batch's order, oldest first), so every request gets the very block ids
        it would have, and later frees and evictions go the same way.
        """
        sched = self.scheduler
        kv = sched.kv
        bs = kv.block_size
        running = sched.running
        if len(running) == 1:
            # The usual batch at moderate load, all of this method for one request: its blocks go
            # to it in step order (no interleaving), then its tokens, the stats, maybe its finish.
            req = running[0]
            # Step i computes token position computed + i; it needs a block when that position >= have.
            first = len(req.block_table) * bs - req.num_computed
            if first < steps:
                req.block_table.extend(self.pool.allocate_many(len(range(first if first > 0 else 0, steps, bs))))
            tokens = req.token_ids
            tokens.extend([SAMPLED_TOKEN] * steps)
            req.num_computed += steps
            kv.cache_full_blocks(req)
            record: SimRecord = req.state
            n_tokens = len(tokens)
            record.generated = n_tokens - req.prompt_len
            stats = self.stats
            stats.steps += steps
            stats.busy_seconds += stretch.span if steps == stretch.steps else stretch.elapsed(steps)
            stats.decode_tokens += steps
            if steps < stretch.steps:
                return
            left = (req.max_tokens or 1 << 30) - (n_tokens - req.prompt_len)
            max_len = sched.max_model_len
            if max_len is not None and max_len - n_tokens < left:
                left = max_len - n_tokens
            if left <= 0:
                sched.finish(req, "length")
                record.finished_at = end
                self.finished.append(record)
            return
        else:
            batch_order = sorted(running, key=_by_arrival)
            # (step, rank in the batch, request) for every block the stretch needs.
            needs: list[tuple[int, int, Request]] = []
            for rank, req in enumerate(batch_order):
                first = len(req.block_table) * bs - req.num_computed  # as above
                if first < steps:
                    needs.extend(zip(range(first if first > 0 else 0, steps, bs), repeat(rank), repeat(req)))
            if needs:
                # Plain tuple order is (step, rank): each pair is unique, so requests are never compared.
                needs.sort()
                for (_i, _rank, req), block in zip(needs, self.pool.allocate_many(len(needs)), strict=True):
                    req.block_table.append(block)
        sampled = [SAMPLED_TOKEN] * steps
        cache_full_blocks = kv.cache_full_blocks
        for req in batch_order:
            # The pending token and steps - 1 sampled ones are computed; steps tokens are sampled.
            req.token_ids.extend(sampled)
            req.num_computed += steps  # `sched.after_step(req, steps)`, inlined
            cache_full_blocks(req)
            req.state.generated = len(req.token_ids) - req.prompt_len
        batch = len(sched.running)
        stats = self.stats
        stats.steps += steps
        stats.busy_seconds += stretch.span if steps == stretch.steps else stretch.elapsed(steps)
        stats.decode_tokens += steps * batch
        if steps < stretch.steps:
            return
        # The full stretch ends with the step where its first requests sample their last token;
        # they finish in sampling order (the batch's), as `update()` finishes them.
        max_len = sched.max_model_len
        for req in batch_order:
            n_tokens = len(req.token_ids)
            left = (req.max_tokens or 1 << 30) - (n_tokens - req.prompt_len)
            if max_len is not None and max_len - n_tokens < left:
                left = max_len - n_tokens
            if left <= 0:
                sched.finish(req, "length")
                req.state.finished_at = end
                self.finished.append(req.state)


# The batch's order within a step (oldest first), as a C-level sort key.
_by_arrival = attrgetter("arrival")


def is_running(req: Request) -> bool:
    """Whether a request is in a replica's running batch."""
    return req.status is RequestStatus.RUNNING
