"""The router's side of the scheduler: one `Place` call per request, and a watch on pool loads.

`SchedulerPlacer` implements the core's `Placer` over `Scheduler.Place` (the ordered experts in
one call, with the prompt's token ids under the first expert's tokenizer; the scheduler reserves
only the primary). `ClusterWatcher` reads `GetCluster` every
poll period, sums it into one `PoolLoad` per expert and hands it to the core, which steps the load
bias and uses it for eligibility.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn

import grpc
from switchboard.common.errors import error_details
from switchboard.common.logging import get_logger
from switchboard.router.core import (
    Candidate,
    PlacementRequest,
    PlacementResult,
    PlacementUnavailable,
    SchedulerUnreachable,
)
from switchboard.router.load_bias import PoolLoad
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)

# Scheduler answers that mean "nothing to offer now", not "the scheduler is broken".
_NO_REPLICA_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}


def _answered(error: grpc.aio.AioRpcError) -> bool:
    """Whether the scheduler itself answered: its errors carry rich details (ErrorInfo/RetryInfo); a
    transport failure (scheduler down) is a bare UNAVAILABLE and must not read as "no replica"."""
    details = error_details(error)
    return details["reason"] is not None or details["retry_after"] is not None


def _raise_for(error: grpc.aio.AioRpcError) -> NoReturn:
    """The core's exception for a failed Place."""
    if _answered(error) and error.code() in _NO_REPLICA_CODES:
        raise PlacementUnavailable(error.details() or "no replica") from None
    raise SchedulerUnreachable(f"{error.code().name}: {error.details()}") from None


def _candidate(expert: str, replica: scheduler_pb2.Replica) -> Candidate:
    return Candidate(expert=expert, replica_id=replica.replica_id, address=replica.address, revision=replica.revision)


class SchedulerPlacer:
    """`Placer` over the scheduler's Place RPC."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, timeout_seconds: float) -> None:
        self._stub = stub
        self._timeout = timeout_seconds
        self.calls = 0  # Place calls made (one per routed request)

    async def place(self, request: PlacementRequest) -> PlacementResult:
        """One Place call for every candidate expert of the request."""
        self.calls += 1
        message = scheduler_pb2.PlaceRequest(
            request_id=request.request_id,
            experts=list(request.experts),
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            min_model_len=request.min_model_len,
            exclude_replica_ids=list(request.exclude_replica_ids),
            max_alternates=request.max_alternates,
            prompt_token_ids=request.prompt_token_ids,
            tokenizer_fingerprint=request.tokenizer_fingerprint,
            priority=request.priority,  # type: ignore[arg-type]
        )
        timeout = self._timeout
        if request.timeout_seconds is not None:
            timeout = max(0.01, min(timeout, request.timeout_seconds))
        started = time.monotonic()
        try:
            reply = await self._stub.Place(message, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if _answered(error) or error.code() != grpc.StatusCode.UNAVAILABLE:
                _raise_for(error)
            # Not answered: the call never reached a scheduler. After a scheduler restart the channel
            # can still be backing off from the refused connections while the new scheduler already
            # serves, and a plain call fails at once; so try once more, waiting for the channel to
            # connect within what is left of the same deadline. A scheduler that is down still ends
            # in SchedulerUnreachable, within the deadline.
            remaining = max(0.01, timeout - (time.monotonic() - started))
            try:
                reply = await self._stub.Place(message, timeout=remaining, wait_for_ready=True)
            except grpc.aio.AioRpcError as again:
                _raise_for(again)
        candidates = {
            p.expert: [_candidate(p.expert, p.replica)] + [_candidate(p.expert, alt) for alt in p.alternates]
            for p in reply.placements
        }
        return PlacementResult(candidates, {u.expert: u.reason for u in reply.unavailable})


def pools_from_cluster(experts: Iterable[str], replicas: Iterable[scheduler_pb2.Replica]) -> dict[str, PoolLoad]:
    """One PoolLoad per expert from GetCluster's replicas (ready ones only)."""
    sums: dict[str, dict[str, float]] = {
        name: {"ready": 0, "running": 0, "waiting": 0, "inflight": 0, "kv": 0.0, "len": 0} for name in experts
    }
    for replica in replicas:
        acc = sums.get(replica.expert)
        if acc is None or replica.state != scheduler_pb2.REPLICA_STATE_READY:
            continue
        load = replica.load
        acc["ready"] += 1
        acc["running"] += load.running
        acc["waiting"] += load.waiting
        acc["inflight"] += replica.inflight
        acc["kv"] += load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
        acc["len"] = max(acc["len"], replica.max_model_len)
    return {
        name: PoolLoad(
            expert=name,
            ready_replicas=int(acc["ready"]),
            running=int(acc["running"]),
            waiting=int(acc["waiting"]),
            inflight=int(acc["inflight"]),
            kv_utilization=acc["kv"] / acc["ready"] if acc["ready"] else 0.0,
            max_model_len=int(acc["len"]),
        )
        for name, acc in sums.items()
    }


class ClusterWatcher:
    """Polls GetCluster and feeds the pools to `on_pools` until cancelled."""

    def __init__(
        self,
        stub: scheduler_pb2_grpc.SchedulerStub,
        experts: Iterable[str],
        on_pools: Callable[[Mapping[str, PoolLoad]], object],
        poll_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self._stub = stub
        self._experts = tuple(experts)
        self._on_pools = on_pools
        self._poll = poll_seconds
        self._timeout = timeout_seconds
        self._failing = False
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Look at the cluster now instead of at the next period (a placement showed the view stale)."""
        self._wake.set()

    async def poll_once(self) -> bool:
        """One look at the cluster; False when the scheduler did not answer."""
        try:
            cluster = await self._stub.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if not self._failing:
                log.warning("cannot read pool loads", code=error.code().name, error=error.details())
            self._failing = True
            return False
        if self._failing:
            log.info("pool loads readable again")
        self._failing = False
        self._on_pools(pools_from_cluster(self._experts, cluster.replicas))
        return True

    async def run(self) -> None:
        """Poll every period until cancelled."""
        while True:
            self._wake.clear()
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
