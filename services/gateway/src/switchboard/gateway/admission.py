"""Admission control in front of the gateway's request path: a bounded number of requests run, a bounded number wait.

Under overload the gateway must decide *who* waits, *who* runs next and *who* is turned away, so that one tenant's
flood cannot take the gateway from the others and higher priority classes keep their latency. The rules:

* At most `max_inflight` requests run at once; up to `max_queued` more wait for a slot.
* When a slot frees, the waiter to admit is chosen by **strict priority bands** (HIGH, then NORMAL, then LOW); within
  a band by **deficit round robin on tokens** between tenants (every tenant with waiting work earns `quantum_tokens`
  of deficit per round and its head request runs once the deficit covers the request's expected tokens); within one
  tenant by **earliest deadline first**. Sharing tokens rather than requests means a tenant sending many small
  requests and one sending a few huge ones get the same token throughput, and no tenant can starve another of its
  band: each active tenant is visited once per round.
* Strict bands alone would let LOW wait forever while HIGH keeps the gateway full, so waiting requests **age**: after
  each `max_wait_seconds` spent queued a request is promoted one band (LOW -> NORMAL -> HIGH), where it competes by
  DRR like any other request of that band. A LOW request therefore waits at most about `2 * max_wait_seconds` plus
  one HIGH-band round, unless its deadline or shedding ends the wait first. `max_wait_seconds=None` disables aging
  (strict bands; then only deadlines and shedding bound a LOW request's wait).
* A full queue **sheds**: if a queued request of a strictly lower band exists, the one in the lowest band with the
  latest deadline (it has the most slack to retry) is evicted with `AdmissionRejected("SHED_FOR_HIGHER_PRIORITY")`
  and the newcomer takes its place; otherwise the newcomer is refused with `AdmissionRejected("GATEWAY_OVERLOADED")`.
  Both carry a retry-after estimated from recent service times.
* A waiter whose deadline passes while queued gets `AdmissionTimeout`; a waiter whose task is cancelled is removed;
  a slot granted to a waiter cancelled in the same instant is handed on. Releasing a ticket is idempotent.

Everything runs on one event loop without locks: every state change happens synchronously between awaits. Times are
read from the injectable `clock` (`time.monotonic` by default), so deadlines are absolute times on that clock.
No state is kept for a tenant with nothing queued: memory is bounded by `max_queued`.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram
from switchboard.gateway.principal import Priority

# ErrorInfo reasons of the refusals (the gateway answers RESOURCE_EXHAUSTED/UNAVAILABLE with them).
GATEWAY_OVERLOADED = "GATEWAY_OVERLOADED"
SHED_FOR_HIGHER_PRIORITY = "SHED_FOR_HIGHER_PRIORITY"
# Reason label of the rejected counter for waiters whose deadline passed in the queue.
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"

# Retry-after bounds: below 0.1 s clients would hammer the gateway, above 30 s they would give up needlessly.
MIN_RETRY_AFTER_SECONDS = 0.1
MAX_RETRY_AFTER_SECONDS = 30.0
# Service time assumed before any request has finished (the first retry-after estimates need a value).
INITIAL_SERVICE_SECONDS = 1.0
# Weight of the latest duration in the service-time EWMA: about the last ten requests dominate.
SERVICE_TIME_ALPHA = 0.2

QUEUED = Gauge(
    "switchboard_gateway_admission_queued",
    "Requests waiting for an admission slot, by the priority band they wait in (after aging).",
    ["priority"],
)
INFLIGHT = Gauge("switchboard_gateway_admission_inflight", "Requests holding an admission slot.")
WAIT_SECONDS = Histogram(
    "switchboard_gateway_admission_wait_seconds",
    "Time from arrival to admission, by the request's own priority.",
    ["priority"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REJECTED = Counter(
    "switchboard_gateway_admission_rejected_total",
    "Requests refused, evicted or timed out before admission, by their own priority and reason.",
    ["priority", "reason"],
)


def _label(priority: Priority) -> str:
    return priority.name.lower()


class AdmissionRejected(Exception):
    """The request was refused (queue full) or evicted (shed for a higher priority); retry after the delay."""

    def __init__(self, reason: str, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class AdmissionTimeout(TimeoutError):
    """The request's deadline passed before a slot freed (the gateway answers DEADLINE_EXCEEDED)."""

    def __init__(self, message: str, waited_seconds: float) -> None:
        super().__init__(message)
        self.message = message
        self.waited_seconds = waited_seconds


class _State(enum.Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@dataclass(eq=False)  # identity equality and hashing: waiters live in sets
class _Waiter:
    tenant: str
    priority: Priority
    cost: int
    deadline: float
    seq: int  # arrival order: breaks every tie deterministically
    arrived_at: float
    future: asyncio.Future[Ticket]
    band: int  # the band it waits in: its priority, raised by aging
    promote_at: float = math.inf
    state: _State = _State.QUEUED
    timer: asyncio.TimerHandle | None = None


class _WaiterHeap:
    """A min-heap of waiters by a key, with O(1) removal of any member.

    Removal only forgets the member; its stale entry is skipped when it reaches the top, and the heap is rebuilt when
    stale entries outnumber live ones, so memory stays proportional to the live members.
    """

    def __init__(self, key: Callable[[_Waiter], tuple[float, ...]]) -> None:
        self._key = key
        self._heap: list[tuple[tuple[float, ...], _Waiter]] = []
        self._live: set[_Waiter] = set()

    def __len__(self) -> int:
        return len(self._live)

    def push(self, waiter: _Waiter) -> None:
        self._live.add(waiter)
        heapq.heappush(self._heap, (self._key(waiter), waiter))  # keys end with the unique seq: waiters never compare

    def discard(self, waiter: _Waiter) -> None:
        self._live.discard(waiter)
        if len(self._heap) > 2 * len(self._live) + 16:
            self._heap = [(self._key(member), member) for member in self._live]
            heapq.heapify(self._heap)

    def peek(self) -> _Waiter | None:
        while self._heap and self._heap[0][1] not in self._live:
            heapq.heappop(self._heap)
        return self._heap[0][1] if self._heap else None


def _by_deadline(waiter: _Waiter) -> tuple[float, ...]:
    return (waiter.deadline, waiter.seq)


def _shed_order(waiter: _Waiter) -> tuple[float, ...]:
    # Latest deadline first (most slack to retry), then the most recent arrival (it has waited least).
    return (-waiter.deadline, -waiter.seq)


def _by_promotion(waiter: _Waiter) -> tuple[float, ...]:
    return (waiter.promote_at, waiter.seq)


@dataclass
class _TenantQueue:
    """One tenant's waiters in one band, earliest deadline first, and its DRR deficit in tokens."""

    waiters: _WaiterHeap = field(default_factory=lambda: _WaiterHeap(_by_deadline))
    deficit: int = 0


@dataclass
class _Band:
    """One priority band: its tenants in round-robin order (the first one has the turn) and its shedding order."""

    rotation: dict[str, _TenantQueue] = field(default_factory=dict)
    turn_started: bool = False  # whether the first tenant already got its quantum for the current turn
    shed: _WaiterHeap = field(default_factory=lambda: _WaiterHeap(_shed_order))

    def end_turn(self) -> None:
        """Move the tenant that has the turn to the back of the round."""
        tenant, queue = next(iter(self.rotation.items()))
        del self.rotation[tenant]
        self.rotation[tenant] = queue
        self.turn_started = False


@dataclass(frozen=True)
class AdmissionSnapshot:
    """Point-in-time view: waiters per band (after aging), slots held, tenants with state (queued work)."""

    inflight: int
    queued: dict[Priority, int]
    tenants: int
    max_inflight: int
    max_queued: int

    @property
    def total_queued(self) -> int:
        return sum(self.queued.values())


class Ticket:
    """A held admission slot; `release()` (idempotent) frees it for the next waiter."""

    def __init__(self, controller: AdmissionController, waiter: _Waiter, admitted_at: float) -> None:
        self._controller = controller
        self.tenant = waiter.tenant
        self.priority = waiter.priority
        self.cost_tokens = waiter.cost
        self.admitted_at = admitted_at
        self.waited_seconds = admitted_at - waiter.arrived_at
        self.released = False

    def release(self) -> None:
        """Free the slot (a second call does nothing, so error paths may release unconditionally)."""
        if not self.released:
            self.released = True
            self._controller._release(self)


class AdmissionController:
    """Bounded concurrency with priority bands, token DRR between tenants, aging, deadlines and shedding."""

    def __init__(
        self,
        max_inflight: int,
        max_queued: int,
        quantum_tokens: int = 512,
        clock: Callable[[], float] = time.monotonic,
        max_wait_seconds: float | None = 10.0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {max_queued}")
        if quantum_tokens < 1:
            raise ValueError(f"quantum_tokens must be at least 1, got {quantum_tokens}")
        if max_wait_seconds is not None and not max_wait_seconds > 0:
            raise ValueError(f"max_wait_seconds must be positive or None, got {max_wait_seconds}")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.quantum_tokens = quantum_tokens
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._bands = [_Band() for _ in Priority]
        self._aging = _WaiterHeap(_by_promotion)
        self._inflight = 0
        self._queued = 0
        self._seq = itertools.count()
        self._service_seconds: float | None = None  # EWMA of slot hold times
        self._publish()

    # -- public API ---------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, tenant: str, priority: Priority, cost_tokens: int, deadline: float) -> AsyncIterator[Ticket]:
        """Hold a slot for the body: `async with controller.admit(...)`; raises like `acquire`."""
        ticket = await self.acquire(tenant, priority, cost_tokens, deadline)
        try:
            yield ticket
        finally:
            ticket.release()

    async def acquire(self, tenant: str, priority: Priority, cost_tokens: int, deadline: float) -> Ticket:
        """Wait for a slot; the caller must `release()` the ticket.

        `cost_tokens` is the request's expected tokens (prompt + max output), its weight in the fair share;
        `deadline` is an absolute time on the controller's clock (`math.inf` for none).
        Raises AdmissionRejected (refused or evicted), AdmissionTimeout (deadline passed first), or CancelledError.
        """
        if cost_tokens < 0:
            raise ValueError(f"cost_tokens must be at least 0, got {cost_tokens}")
        now = self._clock()
        priority = Priority(priority)
        if deadline <= now:
            REJECTED.labels(_label(priority), DEADLINE_EXCEEDED).inc()
            raise AdmissionTimeout("the request's deadline passed before admission", 0.0)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Ticket] = loop.create_future()
        waiter = _Waiter(tenant, priority, cost_tokens, deadline, next(self._seq), now, future, int(priority))
        self._refresh(now)
        if self._inflight < self.max_inflight:  # a free slot implies an empty queue: releases dispatch at once
            self._inflight += 1
            return self._grant(waiter, now)
        self._make_room(priority)
        self._enqueue(waiter, now)
        self._arm_timer(waiter, loop)
        self._publish()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def snapshot(self) -> AdmissionSnapshot:
        """Queued per band (after aging), inflight, and how many tenants have state."""
        self._refresh(self._clock())
        return AdmissionSnapshot(
            inflight=self._inflight,
            queued={Priority(index): len(band.shed) for index, band in enumerate(self._bands)},
            tenants=len({tenant for band in self._bands for tenant in band.rotation}),
            max_inflight=self.max_inflight,
            max_queued=self.max_queued,
        )

    def expire_overdue(self) -> int:
        """Time out every waiter whose deadline has passed on the clock; returns how many.

        Per-waiter timers on the event loop do this by themselves with the default clock; with another clock (a
        test's fake one) call this after moving it. Either way an expired waiter is never admitted.
        """
        now = self._clock()
        self._refresh(now)
        expired = 0
        for band in self._bands:
            for queue in list(band.rotation.values()):
                expired += self._expire_heads(queue, now)
        self._publish()
        return expired

    def retry_after_seconds(self) -> float:
        """How long a refused client should wait: the time for the queue ahead of it to drain, clamped."""
        service = self._service_seconds if self._service_seconds is not None else INITIAL_SERVICE_SECONDS
        estimate = service * (self._queued + 1) / self.max_inflight
        return min(max(estimate, MIN_RETRY_AFTER_SECONDS), MAX_RETRY_AFTER_SECONDS)

    # -- admission and release ---------------------------------------------------------------------------------

    def _grant(self, waiter: _Waiter, now: float) -> Ticket:
        """Give `waiter` a slot already counted in `_inflight`."""
        waiter.state = _State.ADMITTED
        self._disarm_timer(waiter)
        ticket = Ticket(self, waiter, now)
        WAIT_SECONDS.labels(_label(waiter.priority)).observe(ticket.waited_seconds)
        if not waiter.future.done():
            waiter.future.set_result(ticket)
        self._publish()
        return ticket

    def _release(self, ticket: Ticket) -> None:
        now = self._clock()
        self._inflight -= 1
        held = max(now - ticket.admitted_at, 0.0)
        previous = self._service_seconds
        self._service_seconds = held if previous is None else previous + SERVICE_TIME_ALPHA * (held - previous)
        self._dispatch(now)
        self._publish()

    def _dispatch(self, now: float) -> None:
        """Hand free slots to waiters in scheduling order."""
        self._refresh(now)
        while self._inflight < self.max_inflight:
            waiter = self._pick(now)
            if waiter is None:
                return
            self._inflight += 1
            self._grant(waiter, now)

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter's task was cancelled: leave the queue, or hand on a slot it was granted in the same instant."""
        if waiter.state is _State.QUEUED:
            self._unqueue(waiter)
            self._disarm_timer(waiter)
            waiter.state = _State.CANCELLED
            self._publish()
        elif waiter.state is _State.ADMITTED:
            waiter.future.result().release()
        elif waiter.future.done() and not waiter.future.cancelled():
            waiter.future.exception()  # mark the rejection retrieved: nobody will await it now

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _pick(self, now: float) -> _Waiter | None:
        """Next waiter to admit: highest non-empty band, then DRR between its tenants, then earliest deadline."""
        for band in reversed(self._bands):
            waiter = self._pick_in_band(band, now)
            if waiter is not None:
                return waiter
        return None

    def _pick_in_band(self, band: _Band, now: float) -> _Waiter | None:
        """Deficit round robin on tokens, one admission per call; the turn carries over between calls."""
        skipped = 0
        while band.rotation:
            queue = next(iter(band.rotation.values()))
            if self._expire_heads(queue, now):
                continue  # an expired head must not take the slot; the tenant may even have left the round
            head = queue.waiters.peek()
            assert head is not None
            if not band.turn_started:
                queue.deficit += self.quantum_tokens
                band.turn_started = True
            if head.cost <= queue.deficit:
                queue.deficit -= head.cost
                self._unqueue(head)
                return head
            band.end_turn()
            skipped += 1
            if skipped >= len(band.rotation):
                self._fast_forward(band, now)
                skipped = 0
        return None

    def _fast_forward(self, band: _Band, now: float) -> None:
        """Credit the rounds in which nobody could run at once, so huge requests cost no loop per quantum.

        Equivalent to running those idle rounds: every tenant gets the same number of quanta, and one fewer than
        the first tenant needs so the normal turn order still decides who runs.
        """
        for queue in list(band.rotation.values()):
            self._expire_heads(queue, now)
        needs = []
        for queue in band.rotation.values():
            head = queue.waiters.peek()
            assert head is not None
            needs.append(math.ceil((head.cost - queue.deficit) / self.quantum_tokens))
        rounds = min(needs, default=0) - 1
        if rounds > 0:
            for queue in band.rotation.values():
                queue.deficit += rounds * self.quantum_tokens

    def _refresh(self, now: float) -> None:
        """Promote the waiters that have aged past `max_wait_seconds` in their band."""
        if self.max_wait_seconds is None:
            return
        while (waiter := self._aging.peek()) is not None and waiter.promote_at <= now:
            self._unqueue(waiter)
            waiter.band += 1
            # Count from when the promotion was due, not when it was noticed, so aging is exact however rarely
            # the controller looks.
            self._enqueue(waiter, waiter.promote_at)

    # -- queue bookkeeping --------------------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter, band_entered_at: float) -> None:
        band = self._bands[waiter.band]
        queue = band.rotation.get(waiter.tenant)
        if queue is None:  # a tenant joining the round starts at the back, with no deficit
            queue = band.rotation[waiter.tenant] = _TenantQueue()
        queue.waiters.push(waiter)
        band.shed.push(waiter)
        if self.max_wait_seconds is not None and waiter.band < Priority.HIGH:
            waiter.promote_at = band_entered_at + self.max_wait_seconds
            self._aging.push(waiter)
        self._queued += 1

    def _unqueue(self, waiter: _Waiter) -> None:
        """Remove a queued waiter from every structure; a tenant left without waiters loses its state and deficit."""
        band = self._bands[waiter.band]
        queue = band.rotation[waiter.tenant]
        queue.waiters.discard(waiter)
        band.shed.discard(waiter)
        self._aging.discard(waiter)
        self._queued -= 1
        if not queue.waiters:
            if next(iter(band.rotation)) == waiter.tenant:
                band.turn_started = False
            del band.rotation[waiter.tenant]

    def _make_room(self, priority: Priority) -> None:
        """With the queue full, evict the lowest-band latest-deadline waiter below `priority`, or refuse."""
        if self._queued < self.max_queued:
            return
        for band in self._bands[:priority]:
            victim = band.shed.peek()
            if victim is not None:
                self._unqueue(victim)
                self._finish(
                    victim,
                    _State.REJECTED,
                    AdmissionRejected(
                        SHED_FOR_HIGHER_PRIORITY,
                        "the gateway is overloaded and shed this request for a higher-priority one",
                        self.retry_after_seconds(),
                    ),
                    SHED_FOR_HIGHER_PRIORITY,
                )
                return
        REJECTED.labels(_label(priority), GATEWAY_OVERLOADED).inc()
        raise AdmissionRejected(
            GATEWAY_OVERLOADED,
            f"the gateway is overloaded ({self._inflight} requests running, {self._queued} waiting)",
            self.retry_after_seconds(),
        )

    def _expire_heads(self, queue: _TenantQueue, now: float) -> int:
        """Time out the tenant's waiters whose deadline has passed (they are at the front: deadline order)."""
        expired = 0
        while (head := queue.waiters.peek()) is not None and head.deadline <= now:
            self._expire(head, now)
            expired += 1
        return expired

    def _expire(self, waiter: _Waiter, now: float) -> None:
        self._unqueue(waiter)
        error = AdmissionTimeout(
            f"the request's deadline passed after {now - waiter.arrived_at:.3f}s waiting for admission",
            now - waiter.arrived_at,
        )
        self._finish(waiter, _State.TIMED_OUT, error, DEADLINE_EXCEEDED)

    def _finish(self, waiter: _Waiter, state: _State, error: Exception, reason: str) -> None:
        """End an unqueued waiter's wait with `error`."""
        waiter.state = state
        self._disarm_timer(waiter)
        REJECTED.labels(_label(waiter.priority), reason).inc()
        if not waiter.future.done():
            waiter.future.set_exception(error)

    # -- deadline timers ----------------------------------------------------------------------------------------

    def _arm_timer(self, waiter: _Waiter, loop: asyncio.AbstractEventLoop) -> None:
        if math.isfinite(waiter.deadline):
            delay = max(waiter.deadline - self._clock(), 0.0)
            waiter.timer = loop.call_later(delay, self._on_deadline, waiter, loop)

    def _disarm_timer(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None

    def _on_deadline(self, waiter: _Waiter, loop: asyncio.AbstractEventLoop) -> None:
        waiter.timer = None
        if waiter.state is not _State.QUEUED:
            return
        now = self._clock()
        if waiter.deadline <= now:
            self._expire(waiter, now)
            self._publish()
        else:  # the clock is not the loop's (or ran slow): look again when it should have passed
            self._arm_timer(waiter, loop)

    def _publish(self) -> None:
        INFLIGHT.set(self._inflight)
        for index, band in enumerate(self._bands):
            QUEUED.labels(_label(Priority(index))).set(len(band.shed))
