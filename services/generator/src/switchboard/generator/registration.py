"""Registration with the scheduler: Register at start, ReportLoad heartbeats, Deregister on drain.

The replica keeps serving whatever happens to the scheduler: a scheduler that is down is retried
with exponential backoff, and a scheduler that answers `known=false` (it restarted, or expired
this replica) gets a fresh Register at once. Only the drain stops the loop, and it stops the loop
before deregistering, so a late heartbeat cannot re-register a replica that is going away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
from switchboard.common.channels import open_channel
from switchboard.common.logging import get_logger
from switchboard.generator.engine import EngineLoad
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)

INITIAL_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 5.0
RPC_TIMEOUT_SECONDS = 2.0


def load_to_proto(load: EngineLoad) -> scheduler_pb2.ReplicaLoad:
    """The wire form of an engine load snapshot."""
    return scheduler_pb2.ReplicaLoad(
        running=load.running,
        waiting=load.waiting,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        tokens_per_second=load.tokens_per_second,
        cached_block_hashes=load.cached_block_hashes,
    )


class Registrar:
    """Keeps one replica registered with the scheduler at `scheduler_addr`.

    `announce` returns the RegisterRequest (identity and model facts, without load); `load`
    returns the engine's current load. Counters (`registrations`, `heartbeats`, `failures`) are public so
    tests and logs can follow what happened.
    """

    def __init__(
        self,
        scheduler_addr: str,
        announce: Callable[[], scheduler_pb2.RegisterRequest],
        load: Callable[[], EngineLoad],
        heartbeat_seconds: float = 1.0,
    ) -> None:
        self.scheduler_addr = scheduler_addr
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

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        if self._stub is None:
            self._channel = open_channel(self.scheduler_addr)
            self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        return self._stub

    def start(self) -> None:
        """Start the register/heartbeat loop as a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="scheduler-registration")

    async def _register(self) -> None:
        request = scheduler_pb2.RegisterRequest()
        request.CopyFrom(self._announce())
        request.load.CopyFrom(load_to_proto(self._load()))
        reply = await self._scheduler().Register(request, timeout=RPC_TIMEOUT_SECONDS)
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
            replica_id=self._announce().replica_id, load=load_to_proto(self._load()), draining=draining
        )
        reply = await self._scheduler().ReportLoad(request, timeout=RPC_TIMEOUT_SECONDS)
        self.heartbeats += 1
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
                await asyncio.sleep(self.heartbeat_seconds)
            except grpc.aio.AioRpcError as exc:
                self.failures += 1
                if not self._outage_logged:
                    # One line per outage, not one per retry.
                    log.warning(
                        "scheduler unreachable; still serving, retrying with backoff",
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
