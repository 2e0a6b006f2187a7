"""The Scheduler RPCs over a real channel to an in-process server: every success and failure case."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.telemetry import SpanAttributes, in_memory_span_exporter
from switchboard.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from .conftest import running_scheduler


def register_request(
    replica_id: str, expert: str = "bard-small", port: int = 50061, max_model_len: int = 512, **load: int
) -> scheduler_pb2.RegisterRequest:
    return scheduler_pb2.RegisterRequest(
        replica_id=replica_id,
        expert=expert,
        address=f"127.0.0.1:{port}",
        device="cpu",
        model_name=expert,
        max_model_len=max_model_len,
        load=scheduler_pb2.ReplicaLoad(**load),
    )


async def inflight(stub: scheduler_pb2_grpc.SchedulerStub) -> dict[str, int]:
    """Replica id -> requests counted in flight on it, as GetCluster reports."""
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    return {r.replica_id: r.inflight for r in cluster.replicas}


def placements_count(expert: str, outcome: str) -> float:
    """The placements counter of one expert and outcome (0 before the first)."""
    return (
        REGISTRY.get_sample_value(
            "switchboard_scheduler_placements_total", {"expert": expert, "outcome": outcome}
        )
        or 0.0
    )


def demand_tokens(expert: str) -> float:
    """The demand tokens placed on one expert (prompt + output budget of its primaries)."""
    return REGISTRY.get_sample_value("switchboard_scheduler_placed_tokens_total", {"expert": expert}) or 0.0


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


async def test_register_refuses_an_id_a_live_replica_holds(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a"))
    twin = register_request("a")
    twin.address = "127.0.0.1:50070"
    details = await expect_error(stub.Register(twin), grpc.StatusCode.ALREADY_EXISTS)
    assert "replica id 'a' is taken by the replica at 127.0.0.1:50061" in details["message"]
    assert "GENERATOR_REPLICA_ID" in details["message"]
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert [r.address for r in cluster.replicas] == ["127.0.0.1:50061"]
    # The holder itself re-registers as before.
    await stub.Register(register_request("a"))


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
        stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"])), grpc.StatusCode.UNAVAILABLE
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
        scheduler_pb2.PlaceRequest(request_id="r1", experts=["bard-small"], max_alternates=5)
    )
    [placement] = reply.placements
    assert placement.expert == "bard-small"
    assert placement.replica.replica_id == "idle"
    assert placement.replica.address == "127.0.0.1:50062"
    assert [r.replica_id for r in placement.alternates] == ["some", "busy"]
    assert placement.replica.inflight == 1
    assert list(reply.unavailable) == []
    # Exclusions and the alternates cap.
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="r2", experts=["bard-small"], exclude_replica_ids=["idle"], max_alternates=0
        )
    )
    assert reply.placements[0].replica.replica_id == "some" and len(reply.placements[0].alternates) == 0


async def test_place_on_several_experts_in_request_order(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("m1", expert="milton-small", port=50061))
    await stub.Register(register_request("m2", expert="milton-small", port=50062, running=1))
    await stub.Register(register_request("b1", expert="bard-small", port=50063))
    placed_before = placements_count("milton-small", "placed")
    candidate_before = placements_count("bard-small", "candidate")
    missing_before = placements_count("scribe-large", "no_replica")
    tokens_before = {e: demand_tokens(e) for e in ("milton-small", "bard-small")}
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="r1",
            experts=["milton-small", "scribe-large", "bard-small"],
            max_alternates=3,
            prompt_tokens=120,
            max_tokens=30,
        )
    )
    # scribe-large has no replica: skipped in placements, listed in unavailable with a reason.
    assert [p.expert for p in reply.placements] == ["milton-small", "bard-small"]
    assert reply.placements[0].replica.replica_id == "m1"
    assert [r.replica_id for r in reply.placements[0].alternates] == ["m2"]
    assert reply.placements[1].replica.replica_id == "b1"
    assert [(u.expert, u.reason) for u in reply.unavailable] == [
        ("scribe-large", "no healthy replica of expert 'scribe-large'")
    ]
    # Only the primary counts the request in flight.
    assert await inflight(stub) == {"b1": 0, "m1": 1, "m2": 0}
    assert placements_count("milton-small", "placed") == placed_before + 1
    assert placements_count("bard-small", "candidate") == candidate_before + 1
    assert placements_count("scribe-large", "no_replica") == missing_before + 1
    # The demand (prompt + output budget) counts on the primary's expert only: the allocation's tokens/s.
    assert demand_tokens("milton-small") == tokens_before["milton-small"] + 150
    assert demand_tokens("bard-small") == tokens_before["bard-small"]


async def test_primary_does_not_depend_on_call_order(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("x1", expert="bard-small", port=50061))
    await stub.Register(register_request("y1", expert="milton-small", port=50062))
    a = await stub.Place(scheduler_pb2.PlaceRequest(request_id="A", experts=["bard-small", "milton-small"]))
    b = await stub.Place(scheduler_pb2.PlaceRequest(request_id="B", experts=["milton-small", "bard-small"]))
    assert a.placements[0].replica.replica_id == "x1"
    assert b.placements[0].replica.replica_id == "y1"
    assert await inflight(stub) == {"x1": 1, "y1": 1}
    # Placing the same request again (a retry elsewhere) moves its reservation.
    await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="A", experts=["bard-small", "milton-small"], exclude_replica_ids=["x1"]
        )
    )
    assert await inflight(stub) == {"x1": 0, "y1": 2}


async def test_deprecated_expert_alias(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a", port=50061))
    await stub.Register(register_request("b", port=50062, running=1))
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(request_id="r1", expert="bard-small", max_alternates=1)
    )
    assert [p.expert for p in reply.placements] == ["bard-small"]
    # Old clients read replica/alternates: the same as placements[0].
    assert reply.replica == reply.placements[0].replica and reply.replica.replica_id == "a"
    assert list(reply.alternates) == list(reply.placements[0].alternates)
    assert [r.replica_id for r in reply.alternates] == ["b"]
    # New clients get them filled too.
    reply = await stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"]))
    assert reply.replica == reply.placements[0].replica
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="bard-small", experts=["bard-small"])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["field_violations"][0][0] == "expert"
    assert "experts" in details["message"]


@pytest.mark.parametrize(
    ("field", "request_fields", "says"),
    [
        ("experts", {}, "required"),
        ("experts", {"experts": []}, "required"),
        ("experts", {"experts": ["bard-small", "milton-small", "bard-small"]}, "'bard-small' more than once"),
        ("experts", {"experts": [f"e{i}" for i in range(65)]}, "at most 64"),
        ("experts", {"experts": ["bard-small", ""]}, "entry 1 is empty"),
        ("max_alternates", {"experts": ["bard-small"], "max_alternates": 1000}, "at most 16"),
        ("request_id", {"experts": ["bard-small"], "request_id": "r" * 300}, "at most 256"),
    ],
)
async def test_place_rejects_bad_requests(
    stub: scheduler_pb2_grpc.SchedulerStub, field: str, request_fields: dict, says: str
) -> None:
    await stub.Register(register_request("a"))
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(**request_fields)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == field
    assert says in details["message"]
    assert await inflight(stub) == {"a": 0}


async def test_place_unknown_expert_is_not_found(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a"))
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(request_id="r", experts=["nope", "never"])),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details["reason"] == "EXPERT_NOT_FOUND"
    assert "'nope'" in details["message"] and "'never'" in details["message"]
    assert "bard-small, milton-small, scribe-large" in details["message"]
    assert await inflight(stub) == {"a": 0}
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(expert="nope")), grpc.StatusCode.NOT_FOUND
    )
    assert "nope" in details["message"]
    # Among declared experts an undeclared one is listed as unavailable and the request is served
    # (a router whose experts config is ahead of the scheduler's keeps working).
    reply = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r", experts=["nope", "bard-small"]))
    assert [p.expert for p in reply.placements] == ["bard-small"]
    assert [u.expert for u in reply.unavailable] == ["nope"] and "not declared" in reply.unavailable[0].reason
    assert await inflight(stub) == {"a": 1}


async def test_place_unavailable_lists_every_reason(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"])), grpc.StatusCode.UNAVAILABLE
    )
    assert details["message"] == "no healthy replica of expert 'bard-small'"
    assert details["retry_after"] == pytest.approx(1.0)
    assert details["reason"] == "NO_HEALTHY_REPLICA"
    await stub.Register(register_request("a"))
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"], exclude_replica_ids=["a"])),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert details["message"] == "no healthy replica of expert 'bard-small' (excluding 1 already tried)"


async def test_min_model_len_skips_short_replicas(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("short", expert="bard-small", port=50061, max_model_len=512))
    await stub.Register(
        register_request("long", expert="bard-small", port=50062, max_model_len=2048, running=9)
    )
    await stub.Register(
        register_request("unknown-len", expert="bard-small", port=50063, max_model_len=0, running=5)
    )
    await stub.Register(register_request("m", expert="milton-small", port=50064, max_model_len=512))
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="r1", experts=["milton-small", "bard-small"], min_model_len=900, max_alternates=5
        )
    )
    # The short replicas are skipped even though they are idler; 0 means "not reported": kept.
    assert [p.expert for p in reply.placements] == ["bard-small"]
    assert reply.placements[0].replica.replica_id == "unknown-len"
    assert [r.replica_id for r in reply.placements[0].alternates] == ["long"]
    assert [(u.expert, u.reason) for u in reply.unavailable] == [
        ("milton-small", "replicas of 'milton-small' accept at most 512 tokens, the request needs 900")
    ]
    assert (await inflight(stub))["unknown-len"] == 1
    too_short_before = placements_count("milton-small", "too_short")
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(experts=["scribe-large", "milton-small"], min_model_len=900)),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert details["message"] == (
        "no healthy replica of expert 'scribe-large'; "
        "replicas of 'milton-small' accept at most 512 tokens, the request needs 900"
    )
    assert placements_count("milton-small", "too_short") == too_short_before + 1
    # Exactly as long as needed fits.
    reply = await stub.Place(scheduler_pb2.PlaceRequest(experts=["milton-small"], min_model_len=512))
    assert reply.placements[0].replica.replica_id == "m"


async def test_place_skips_replicas_whose_queue_is_full(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    """max_waiting is announced and shown; a replica reporting that many waiting gets nothing, and when
    every replica is full Place answers UNAVAILABLE with RetryInfo saying whose queue is full."""
    full = register_request("full", port=50061, waiting=3)
    full.max_waiting = 3
    await stub.Register(full)
    other = register_request("other", port=50062, running=9, waiting=2)
    other.max_waiting = 3
    await stub.Register(other)
    cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert {r.replica_id: r.max_waiting for r in cluster.replicas} == {"full": 3, "other": 3}
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(request_id="q1", experts=["bard-small"], max_alternates=4)
    )
    assert reply.placements[0].replica.replica_id == "other" and not reply.placements[0].alternates
    await stub.ReportLoad(
        scheduler_pb2.ReportLoadRequest(replica_id="other", load=scheduler_pb2.ReplicaLoad(waiting=3))
    )
    before = placements_count("bard-small", "queue_full")
    details = await expect_error(
        stub.Place(scheduler_pb2.PlaceRequest(request_id="q2", experts=["bard-small"])),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert details["message"] == (
        "every replica of expert 'bard-small' has a full queue (full: 3 waiting of 3; other: 3 waiting of 3)"
    )
    assert details["retry_after"] is not None
    assert placements_count("bard-small", "queue_full") == before + 1


async def test_exclusions_apply_to_every_expert(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("b1", expert="bard-small", port=50061))
    await stub.Register(register_request("b2", expert="bard-small", port=50062, running=3))
    await stub.Register(register_request("m1", expert="milton-small", port=50063))
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            request_id="r1",
            experts=["milton-small", "bard-small"],
            exclude_replica_ids=["m1", "b1"],
            max_alternates=2,
        )
    )
    assert [(p.expert, p.replica.replica_id, len(p.alternates)) for p in reply.placements] == [
        ("bard-small", "b2", 0)
    ]
    assert [u.expert for u in reply.unavailable] == ["milton-small"]
    assert "excluding 1 already tried" in reply.unavailable[0].reason
    assert await inflight(stub) == {"b1": 0, "b2": 1, "m1": 0}


async def test_place_span_names_the_primary(scheduler_factory) -> None:
    exporter = in_memory_span_exporter()
    async with scheduler_factory() as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await stub.Register(register_request("m1", expert="milton-small"))
            await stub.Place(
                scheduler_pb2.PlaceRequest(request_id="traced", experts=["bard-small", "milton-small"])
            )
        finally:
            await channel.close()
    [span] = [
        s
        for s in exporter.get_finished_spans()  # type: ignore[attr-defined]
        if s.name == "scheduler.place" and s.attributes.get(SpanAttributes.REQUEST_ID) == "traced"
    ]
    assert span.attributes[SpanAttributes.EXPERT] == "milton-small"
    assert span.attributes[SpanAttributes.REPLICA_ID] == "m1"
    assert span.attributes[SpanAttributes.EXPERTS_REQUESTED] == 2


async def test_complete_releases_inflight(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(register_request("a", port=50061))
    await stub.Register(register_request("b", port=50062))
    first = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r1", experts=["bard-small"]))
    second = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r2", experts=["bard-small"]))
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
            reply = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r", experts=["bard-small"]))
            assert reply.placements[0].replica.replica_id == "alive"
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


async def test_place_uses_the_configured_policy(scheduler_factory) -> None:
    """With SCHEDULER_PLACEMENT_POLICY=round-robin, equally idle replicas take turns; least-loaded
    (the default) would send every request to the same one, as each is completed before the next."""
    async with scheduler_factory(placement_policy="round-robin") as app:
        assert app.servicer.policy.name == "round-robin"
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for n, port in (("b1", 50061), ("b2", 50062), ("b3", 50063)):
                await stub.Register(register_request(n, port=port))
            chosen = []
            for i in range(5):
                reply = await stub.Place(
                    scheduler_pb2.PlaceRequest(request_id=f"rr{i}", experts=["bard-small"], max_alternates=2)
                )
                primary = reply.placements[0]
                chosen.append(primary.replica.replica_id)
                assert primary.replica.inflight == 1
                assert len(primary.alternates) == 2
                await stub.Complete(scheduler_pb2.SchedulerCompleteRequest(request_id=f"rr{i}", success=True))
            assert chosen == ["b1", "b2", "b3", "b1", "b2"]
        finally:
            await channel.close()


def _metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_complete_counts_slo_attainment_and_goodput() -> None:
    from switchboard.common.experts_config import ExpertSLO

    slos = {"bard-small": ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05)}
    async with running_scheduler(slos=slos) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            await stub.Register(register_request("a", port=50061))
            before = {
                key: _metric("switchboard_scheduler_goodput_requests_total", expert="bard-small", good=key)
                for key in ("true", "false")
            }
            missed_ttft = _metric("switchboard_scheduler_slo_requests_total", expert="bard-small", objective="ttft", met="false")
            outcomes = [(True, 0.2, 0.6, 9), (True, 0.9, 1.0, 3), (False, 0.1, 0.2, 2)]  # good, slow start, failed
            for i, (success, ttft, latency, tokens) in enumerate(outcomes):
                await stub.Place(scheduler_pb2.PlaceRequest(request_id=f"s{i}", experts=["bard-small"]))
                await stub.Complete(
                    scheduler_pb2.SchedulerCompleteRequest(
                        request_id=f"s{i}", replica_id="a", success=success,
                        usage=common_pb2.Usage(completion_tokens=tokens),
                        time_to_first_token_seconds=ttft, latency_seconds=latency,
                    )
                )
            # Never served (a cached answer, a refusal after placement): released, not judged.
            await stub.Place(scheduler_pb2.PlaceRequest(request_id="unserved", experts=["bard-small"]))
            await stub.Complete(
                scheduler_pb2.SchedulerCompleteRequest(
                    request_id="unserved", replica_id="a", success=False, finish_reason=common_pb2.FINISH_REASON_CANCELLED
                )
            )
            assert (await inflight(stub))["a"] == 0
            good = _metric("switchboard_scheduler_goodput_requests_total", expert="bard-small", good="true")
            bad = _metric("switchboard_scheduler_goodput_requests_total", expert="bard-small", good="false")
            assert (good - before["true"], bad - before["false"]) == (1, 2)
            assert _metric("switchboard_scheduler_slo_requests_total", expert="bard-small", objective="ttft", met="false") - missed_ttft == 2
        finally:
            await channel.close()


async def test_health_checks_are_not_traced_and_rpcs_are(scheduler_factory) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    exporter = in_memory_span_exporter()
    async with scheduler_factory() as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            await scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest())
        finally:
            await channel.close()
    names = {s.name for s in exporter.get_finished_spans()}  # type: ignore[attr-defined]
    assert "/switchboard.v1.Scheduler/GetCluster" in names
    assert not any("grpc.health" in name for name in names)
