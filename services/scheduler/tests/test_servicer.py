"""The Scheduler RPCs over a real channel to an in-process server: every success and failure case."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


def register_request(
    replica_id: str, expert: str = "bard-small", port: int = 50061, **load: int
) -> scheduler_pb2.RegisterRequest:
    return scheduler_pb2.RegisterRequest(
        replica_id=replica_id,
        expert=expert,
        address=f"127.0.0.1:{port}",
        device="cpu",
        model_name=expert,
        max_model_len=512,
        load=scheduler_pb2.ReplicaLoad(**load),
    )


async def expect_error(call, code: grpc.StatusCode) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return error_details(info.value)


async def test_register_returns_intervals_and_shows_in_cluster(
    stub: scheduler_pb2_grpc.SchedulerStub,
) -> None:
    reply = await stub.Register(register_request("a", running=2, kv_blocks_total=100))
    assert reply.heartbeat_interval_seconds == pytest.approx(1.0)
    assert reply.expiry_seconds == pytest.approx(5.0)
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert [r.replica_id for r in cluster.replicas] == ["a"]
    replica = cluster.replicas[0]
    assert replica.expert == "bard-small" and replica.address == "127.0.0.1:50061"
    assert replica.state == scheduler_pb2.REPLICA_STATE_READY
    assert replica.load.running == 2 and replica.load.kv_blocks_total == 100
    assert replica.max_model_len == 512 and replica.device == "cpu"


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("replica_id", {"replica_id": ""}),
        ("expert", {"expert": ""}),
        ("expert", {"expert": "no-such-expert"}),
        ("address", {"address": ""}),
        ("address", {"address": "localhost"}),
        ("address", {"address": "localhost:0"}),
        ("address", {"address": "localhost:99999"}),
        ("address", {"address": "::1:50061"}),
        ("address", {"address": "host name:50061"}),
    ],
)
async def test_register_rejects_bad_fields(
    stub: scheduler_pb2_grpc.SchedulerStub, field: str, changes: dict
) -> None:
    request = register_request("a")
    for key, value in changes.items():
        setattr(request, key, value)
    details = await expect_error(stub.Register(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == field
    assert field in details["message"]


async def test_register_accepts_bracketed_ipv6(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    request = register_request("a")
    request.address = "[::1]:50061"
    await stub.Register(request)


async def test_report_load_known_unknown_and_draining(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    unknown = await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="ghost"))
    assert unknown.known is False
    await stub.Register(register_request("a"))
    load = scheduler_pb2.ReplicaLoad(
        running=3, waiting=4, kv_blocks_used=5, kv_blocks_total=10, tokens_per_second=12.5
    )
    reply = await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="a", load=load))
    assert reply.known is True
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].load == load
    await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="a", load=load, draining=True))
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].state == scheduler_pb2.REPLICA_STATE_DRAINING
    # A draining replica takes no new requests.
    await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="bard-small")), grpc.StatusCode.UNAVAILABLE
    )
    details = await expect_error(
        stub.ReportLoad(scheduler_pb2.ReportLoadRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "replica_id"


async def test_place_picks_least_loaded_with_alternates(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("busy", port=50061, running=4, waiting=2))
    await stub.Register(register_request("idle", port=50062))
    await stub.Register(register_request("some", port=50063, running=1))
    await stub.Register(register_request("milton", expert="milton-small", port=50064))
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(request_id="r1", expert="bard-small", max_alternates=5)
    )
    assert reply.replica.replica_id == "idle"
    assert reply.replica.address == "127.0.0.1:50062"
    assert [r.replica_id for r in reply.alternates] == ["some", "busy"]
    assert reply.replica.inflight == 1
    # Exclusions and the alternates cap.
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="r2", expert="bard-small", exclude_replica_ids=["idle"], max_alternates=0
        )
    )
    assert reply.replica.replica_id == "some" and len(reply.alternates) == 0


async def test_place_failures(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "expert"
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="nope")), grpc.StatusCode.NOT_FOUND
    )
    assert "nope" in details["message"]
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="bard-small")), grpc.StatusCode.UNAVAILABLE
    )
    assert "bard-small" in details["message"]
    assert details["retry_after"] == pytest.approx(1.0)
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="bard-small", max_alternates=1000)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["field_violations"][0][0] == "max_alternates"
    await stub.Register(register_request("a"))
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="bard-small", exclude_replica_ids=["a"])),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert "already tried" in details["message"]


async def test_complete_releases_inflight(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a", port=50061))
    await stub.Register(register_request("b", port=50062))
    first = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r1", expert="bard-small"))
    second = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r2", expert="bard-small"))
    # The in-flight count spreads two back-to-back requests over both idle replicas.
    assert {first.replica.replica_id, second.replica.replica_id} == {"a", "b"}
    await stub.Complete(
        scheduler_pb2.SchedulerCompleteRequest(
            request_id="r1",
            replica_id=first.replica.replica_id,
            success=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4),
        )
    )
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    inflight = {r.replica_id: r.inflight for r in cluster.replicas}
    assert inflight == {first.replica.replica_id: 0, second.replica.replica_id: 1}
    # Completing an unknown request is accepted (idempotent); a missing request_id is not.
    await stub.Complete(scheduler_pb2.SchedulerCompleteRequest(request_id="never-placed"))
    details = await expect_error(
        stub.Complete(scheduler_pb2.SchedulerCompleteRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "request_id"


async def test_deregister(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a"))
    await stub.Deregister(scheduler_pb2.DeregisterRequest(replica_id="a"))
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert list(cluster.replicas) == []
    # Idempotent for an unknown replica (a drain after a scheduler restart), but the id is required.
    await stub.Deregister(scheduler_pb2.DeregisterRequest(replica_id="a"))
    details = await expect_error(
        stub.Deregister(scheduler_pb2.DeregisterRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "replica_id"
    reply = await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="a"))
    assert reply.known is False


async def test_silent_replica_expires(scheduler_factory) -> None:
    async with scheduler_factory(heartbeat_seconds=0.1, expiry_seconds=0.6) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            before = (
                REGISTRY.get_sample_value("switchboard_scheduler_expirations_total", {"expert": "bard-small"})
                or 0.0
            )
            await stub.Register(register_request("silent", port=50061))
            await stub.Register(register_request("alive", port=50062))
            # Poll (bounded) while heartbeating only "alive", until the sweep drops "silent".
            remaining = ["silent", "alive"]
            for _ in range(100):
                await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="alive"))
                cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
                remaining = [r.replica_id for r in cluster.replicas]
                if remaining == ["alive"]:
                    break
                await asyncio.sleep(0.05)
            assert remaining == ["alive"]
            after = REGISTRY.get_sample_value(
                "switchboard_scheduler_expirations_total", {"expert": "bard-small"}
            )
            assert after == before + 1
            assert (
                await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="silent"))
            ).known is False
            reply = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r", expert="bard-small"))
            assert reply.replica.replica_id == "alive"
        finally:
            await channel.close()


async def test_health_reports_serving(scheduler) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.Scheduler"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
