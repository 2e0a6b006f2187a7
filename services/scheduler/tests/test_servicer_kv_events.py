"""KV events over a real channel: Register and ReportLoad fold them into the replica's prefix index."""

from __future__ import annotations

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.prefix_index import MAX_KV_HASHES_PER_REPORT
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc


def register(replica_id: str, kv: scheduler_pb2.KvEvents | None = None) -> scheduler_pb2.RegisterRequest:
    request = scheduler_pb2.RegisterRequest(
        replica_id=replica_id, expert="bard-small", address="127.0.0.1:50061"
    )
    if kv is not None:
        request.kv_events.CopyFrom(kv)
    return request


def report(replica_id: str, kv: scheduler_pb2.KvEvents) -> scheduler_pb2.ReportLoadRequest:
    return scheduler_pb2.ReportLoadRequest(replica_id=replica_id, kv_events=kv)


def event(
    sequence: int, stored: tuple[int, ...] = (), evicted: tuple[int, ...] = ()
) -> scheduler_pb2.KvEvent:
    return scheduler_pb2.KvEvent(sequence=sequence, stored_block_hashes=stored, evicted_block_hashes=evicted)


async def test_register_with_a_snapshot_then_heartbeats_with_deltas_update_the_index(
    scheduler: SchedulerApp, stub: scheduler_pb2_grpc.SchedulerStub
) -> None:
    reply = await stub.Register(
        register("a", scheduler_pb2.KvEvents(events=[event(1, (10, 11))], reset=True))
    )
    assert reply.kv_acked_sequence == 1 and not reply.kv_resync_needed
    registry = scheduler.registry
    assert registry.matched_blocks("a", [10, 11, 12]) == 2

    ack = await stub.ReportLoad(report("a", scheduler_pb2.KvEvents(events=[event(2, (12,), (10,))])))
    assert ack.known and ack.kv_acked_sequence == 2 and not ack.kv_resync_needed
    assert registry.matched_blocks("a", [11]) == 1 and registry.matched_blocks("a", [10, 11]) == 0

    # A gap (event 3 lost): the answer asks for a resync, and a reset recovers.
    gap = await stub.ReportLoad(report("a", scheduler_pb2.KvEvents(events=[event(4, (13,))])))
    assert gap.kv_acked_sequence == 2 and gap.kv_resync_needed
    again = await stub.ReportLoad(report("a", scheduler_pb2.KvEvents(events=[event(5, (20,))], reset=True)))
    assert again.kv_acked_sequence == 5 and not again.kv_resync_needed
    assert registry.matched_blocks("a", [20]) == 1 and registry.matched_blocks("a", [11]) == 0

    # Deregistering drops the index with the replica.
    await stub.Deregister(scheduler_pb2.DeregisterRequest(replica_id="a"))
    assert registry.matched_blocks("a", [20]) == 0


async def test_a_replica_without_a_snapshot_is_asked_for_one(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    reply = await stub.Register(register("b"))
    assert reply.kv_resync_needed and reply.kv_acked_sequence == 0
    ack = await stub.ReportLoad(report("b", scheduler_pb2.KvEvents(events=[event(1, (1,))])))
    assert ack.known and ack.kv_resync_needed
    unknown = await stub.ReportLoad(report("nobody", scheduler_pb2.KvEvents()))
    assert not unknown.known


@pytest.mark.parametrize(
    ("kv", "field"),
    [
        (scheduler_pb2.KvEvents(events=[event(3), event(2)]), "kv_events.events[1].sequence"),
        (scheduler_pb2.KvEvents(events=[event(0)]), "kv_events.events[0].sequence"),
        (scheduler_pb2.KvEvents(reset=True), "kv_events.events"),
        (
            scheduler_pb2.KvEvents(events=[event(1, tuple(range(MAX_KV_HASHES_PER_REPORT + 1)))]),
            "kv_events.events",
        ),
        (scheduler_pb2.KvEvents(events=[event(1, (7,), (7,))]), "kv_events.events[0].evicted_block_hashes"),
    ],
)
async def test_malformed_events_are_invalid_argument_naming_the_field(
    scheduler: SchedulerApp, kv: scheduler_pb2.KvEvents, field: str
) -> None:
    channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for call in (lambda: stub.Register(register("c", kv)), lambda: stub.ReportLoad(report("c", kv))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(info.value)["field_violations"][0][0] == field
    finally:
        await channel.close()
