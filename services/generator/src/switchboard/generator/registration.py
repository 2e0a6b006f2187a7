"""Registration with the scheduler: Register at start, ReportLoad heartbeats, Deregister on drain.

The replica keeps serving whatever happens to the scheduler: a scheduler that is down is retried
with exponential backoff, and a scheduler that answers `known=false` (it restarted, or expired
this replica) gets a fresh Register at once. Only the drain stops the loop, and it stops the loop
before deregistering, so a late heartbeat cannot re-register a replica that is going away.

Each Register and heartbeat carries the engine's KV events (prefix-cache blocks stored and
evicted, `switchboard.replica.KvEventJournal`): a Register sends a reset snapshot; a heartbeat
sends the events after the sequence the scheduler last acknowledged, or a fresh snapshot when the
scheduler answered `kv_resync_needed` (or the journal lost events to its bound). A report carries
at most `MAX_KV_HASHES_PER_REPORT` hashes; with more pending, the next heartbeat follows at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
from switchboard.common.channels import open_channel
from switchboard.common.logging import get_logger
from switchboard.common.tls import TlsIdentity
from switchboard.generator.engine import EngineLoad
from switchboard.replica import KvEventBatch, KvEventJournal
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)

INITIAL_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 5.0
RPC_TIMEOUT_SECONDS = 2.0
# The scheduler's bound (switchboard.scheduler.prefix_index.MAX_KV_HASHES_PER_REPORT).
MAX_KV_HASHES_PER_REPORT = 4096


def load_to_proto(load: EngineLoad, outcomes: tuple[int, int] = (0, 0)) -> scheduler_pb2.ReplicaLoad:
    """The wire form of an engine load snapshot, with the replica's (ended, failed) request counts."""
    return scheduler_pb2.ReplicaLoad(
        running=load.running,
        waiting=load.waiting,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        tokens_per_second=load.tokens_per_second,
        requests_ended=outcomes[0],
        requests_failed=outcomes[1],
    )


def kv_events_to_proto(batch: KvEventBatch, reset: bool) -> scheduler_pb2.KvEvents:
    """The wire form of a batch of KV events."""
    return scheduler_pb2.KvEvents(
        events=[
            scheduler_pb2.KvEvent(
                sequence=e.sequence,
                stored_block_hashes=e.stored,
                evicted_block_hashes=e.evicted,
                cleared=e.cleared,
            )
            for e in batch.events
        ],
        reset=reset,
    )


class Registrar:
    """Keeps one replica registered with the scheduler at `scheduler_addr`.

    `announce` returns the RegisterRequest (identity and model facts, without load); `load`
    returns the engine's current load; `kv_events` is the engine's KV event journal (None: report
    no prefix cache). Counters (`registrations`, `heartbeats`, `failures`, `kv_resets`) and
    `kv_acked_sequence` are public so tests and logs can follow what happened.
    """

    def __init__(
        self,
        scheduler_addr: str,
        announce: Callable[[], scheduler_pb2.RegisterRequest],
        load: Callable[[], EngineLoad],
        heartbeat_seconds: float = 1.0,
        kv_events: KvEventJournal | None = None,
        tls: TlsIdentity | None = None,
        outcomes: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.scheduler_addr = scheduler_addr
        self._outcomes = outcomes
        self._tls = tls
        self._announce = announce
        self._load = load
        self.heartbeat_seconds = heartbeat_seconds
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self.failures = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_pb2_grpc.SchedulerStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage_logged = False
        self._kv = kv_events
        self.kv_acked_sequence = 0
        self.kv_resets = 0
        self._kv_resync = True  # the next report sends a snapshot
        self._kv_reset_from: int | None = None  # first sequence of a snapshot not yet acknowledged
        self._kv_backlog = False  # the last report left events behind (the bound)
        self._kv_sent_last = 0  # the last sequence of the last report
        self._kv_hurry = False  # events are pending and the scheduler took the last ones: report now

    def _kv_batch(self) -> scheduler_pb2.KvEvents | None:
        """The KV events for the next report (None without a journal)."""
        journal = self._kv
        if journal is None:
            return None
        if self._kv_resync:
            batch = journal.snapshot(MAX_KV_HASHES_PER_REPORT)
            self._kv_resync = False
        elif self._kv_reset_from is not None:
            # The snapshot's reset was not acknowledged (the report failed): send it again.
            batch = journal.drain(self._kv_reset_from - 1, MAX_KV_HASHES_PER_REPORT)
        else:
            batch = journal.drain(self.kv_acked_sequence, MAX_KV_HASHES_PER_REPORT)
        if batch.reset:
            self._kv_reset_from = batch.events[0].sequence
            self.kv_resets += 1
        last = batch.last_sequence
        self._kv_backlog = last is not None and journal.last_sequence > last
        self._kv_sent_last = last or 0
        return kv_events_to_proto(batch, reset=self._kv_reset_from is not None)

    def _kv_answer(self, acked_sequence: int, resync_needed: bool) -> None:
        """Take in the scheduler's acknowledgement of our KV events."""
        if self._kv is None:
            return
        # Only a scheduler that folded everything sent gets the backlog at once (never a busy loop).
        self._kv_hurry = self._kv_backlog and not resync_needed and acked_sequence >= self._kv_sent_last
        if resync_needed:
            self._kv_resync = True
            self._kv_reset_from = None
            return
        self.kv_acked_sequence = acked_sequence
        if self._kv_reset_from is not None and acked_sequence >= self._kv_reset_from:
            self._kv_reset_from = None

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        if self._stub is None:
            self._channel = open_channel(self.scheduler_addr, self._tls, peer_role="scheduler")
            self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        return self._stub

    def _load_proto(self) -> scheduler_pb2.ReplicaLoad:
        return load_to_proto(self._load(), self._outcomes() if self._outcomes is not None else (0, 0))

    def start(self) -> None:
        """Start the register/heartbeat loop as a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="scheduler-registration")

    async def _register(self) -> None:
        request = scheduler_pb2.RegisterRequest()
        request.CopyFrom(self._announce())
        request.load.CopyFrom(self._load_proto())
        self._kv_resync = True  # a (re-)registration always starts the scheduler's index over
        self._kv_reset_from = None
        kv = self._kv_batch()
        if kv is not None:
            request.kv_events.CopyFrom(kv)
        reply = await self._scheduler().Register(request, timeout=RPC_TIMEOUT_SECONDS)
        self._kv_answer(reply.kv_acked_sequence, reply.kv_resync_needed)
        if reply.heartbeat_interval_seconds > 0:
            self.heartbeat_seconds = reply.heartbeat_interval_seconds
        self.registrations += 1
        self.registered.set()
        log.info(
            "registered with scheduler",
            scheduler=self.scheduler_addr,
            replica_id=request.replica_id,
            expert=request.expert,
            address=request.address,
            heartbeat_seconds=self.heartbeat_seconds,
            expiry_seconds=reply.expiry_seconds,
        )

    async def _heartbeat(self, draining: bool = False) -> bool:
        """One ReportLoad; returns whether the scheduler still knows this replica."""
        request = scheduler_pb2.ReportLoadRequest(
            replica_id=self._announce().replica_id, load=self._load_proto(), draining=draining
        )
        kv = self._kv_batch()
        if kv is not None:
            request.kv_events.CopyFrom(kv)
        reply = await self._scheduler().ReportLoad(request, timeout=RPC_TIMEOUT_SECONDS)
        self.heartbeats += 1
        if reply.known:
            self._kv_answer(reply.kv_acked_sequence, reply.kv_resync_needed)
        return reply.known

    async def run(self) -> None:
        """Register, then heartbeat every interval; re-register when forgotten; back off while the scheduler is down."""
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                elif not await self._heartbeat():
                    log.warning(
                        "scheduler does not know this replica; registering again",
                        scheduler=self.scheduler_addr,
                    )
                    self.registered.clear()
                    continue
                if self._outage_logged:
                    log.info("scheduler reachable again", scheduler=self.scheduler_addr)
                self._outage_logged = False
                backoff = INITIAL_BACKOFF_SECONDS
                if self._kv_hurry:
                    self._kv_hurry = False
                    await asyncio.sleep(0)  # more KV events pending: report them now
                    continue
                await asyncio.sleep(self.heartbeat_seconds)
            except grpc.aio.AioRpcError as exc:
                self.failures += 1
                if not self._outage_logged:
                    # One line per outage, not one per retry. A refusal is not an outage: say so.
                    refused = exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
                    log.warning(
                        "scheduler refused the registration; retrying with backoff"
                        if refused
                        else "scheduler unreachable; still serving, retrying with backoff",
                        scheduler=self.scheduler_addr,
                        code=exc.code().name,
                        error=exc.details(),
                    )
                    self._outage_logged = True
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    # Our registration is refused (e.g. undeclared expert); keep trying slowly so a
                    # fixed experts config is picked up, but do not hammer the scheduler.
                    backoff = MAX_BACKOFF_SECONDS
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def drain(self) -> None:
        """Stop heartbeating, tell the scheduler we are draining, then deregister (best effort)."""
        await self.stop_loop()
        if self._stub is None or not self.registered.is_set():
            await self.close()
            return
        replica_id = self._announce().replica_id
        try:
            await self._heartbeat(draining=True)
            await self._scheduler().Deregister(
                scheduler_pb2.DeregisterRequest(replica_id=replica_id), timeout=RPC_TIMEOUT_SECONDS
            )
            log.info("deregistered from scheduler", scheduler=self.scheduler_addr, replica_id=replica_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("deregister failed; the scheduler will expire this replica", error=exc.details())
        finally:
            self.registered.clear()
            await self.close()

    async def stop_loop(self) -> None:
        """Cancel the background loop (no RPCs)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        """Stop the loop and close the channel."""
        await self.stop_loop()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
