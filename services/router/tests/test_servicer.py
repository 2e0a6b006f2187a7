"""The Router RPCs over real channels, against a real in-process scheduler."""

from __future__ import annotations

import grpc
import pytest
from switchboard.common.errors import error_details
from switchboard.v1 import common_pb2, router_pb2, scheduler_pb2

from .conftest import Stack, running_stack

BARD_PROMPT = "Enter Hamlet. My lord, the king doth wake tonight; Romeo and Juliet, thou and thee"


async def register(stack: Stack, replica_id: str, expert: str, port: int, running: int = 0) -> None:
    await stack.scheduler_stub.Register(
        scheduler_pb2.RegisterRequest(
            replica_id=replica_id,
            expert=expert,
            address=f"127.0.0.1:{port}",
            device="cpu",
            model_name=expert,
            max_model_len=512,
            load=scheduler_pb2.ReplicaLoad(running=running, kv_blocks_total=100),
        )
    )


def route(prompt: str = BARD_PROMPT, **fields: object) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        request_id="req-1", prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=8), **fields
    )


async def expect(call: object, code: grpc.StatusCode) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return error_details(info.value)


async def test_route_orders_primary_replicas_then_next_expert(stack: Stack) -> None:
    await register(stack, "bard-busy", "bard-small", 50061, running=5)
    await register(stack, "bard-idle", "bard-small", 50062, running=0)
    await register(stack, "milton-1", "milton-small", 50063)
    reply = await stack.router.Route(route())
    assert [c.replica_id for c in reply.candidates] == ["bard-idle", "bard-busy", "milton-1"]
    assert reply.candidates[0].address == "127.0.0.1:50062"
    assert [s.expert for s in reply.scores] == ["bard-small", "milton-small", "scribe-large"]
    assert sum(s.score for s in reply.scores) == pytest.approx(1.0)
    assert max(reply.scores, key=lambda s: s.score).expert == "bard-small"
    assert next(s for s in reply.scores if s.expert == "bard-small").selected
    # The primary is the replica the scheduler counts the request on.
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    inflight = {r.replica_id: r.inflight for r in cluster.replicas}
    assert inflight == {"bard-idle": 1, "bard-busy": 0, "milton-1": 0}


async def test_route_falls_back_to_another_expert_and_honours_exclusions(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "scribe-1", "scribe-large", 50064)
    reply = await stack.router.Route(route(exclude_replica_ids=["bard-1"]))
    assert [c.replica_id for c in reply.candidates] == ["scribe-1"]


async def test_pinned_expert_gets_only_its_replicas(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "milton-1", "milton-small", 50063)
    reply = await stack.router.Route(route(expert="milton-small"))
    assert [c.expert for c in reply.candidates] == ["milton-small"]
    assert [s.expert for s in reply.scores if s.selected] == ["milton-small"]


async def test_alternates_are_capped() -> None:
    async with running_stack(max_alternates=0) as stack:
        await register(stack, "bard-1", "bard-small", 50061)
        await register(stack, "bard-2", "bard-small", 50062)
        reply = await stack.router.Route(route())
        assert len(reply.candidates) == 1


async def test_route_errors(stack: Stack) -> None:
    details = await expect(stack.router.Route(route(prompt="")), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == "prompt"
    details = await expect(stack.router.Route(route(expert="gpt-9")), grpc.StatusCode.NOT_FOUND)
    assert "gpt-9" in details["message"] and "bard-small" in details["message"]
    details = await expect(stack.router.Route(route()), grpc.StatusCode.UNAVAILABLE)
    assert details["retry_after"] == pytest.approx(1.0)
    assert details["reason"] == "NO_HEALTHY_REPLICA"
    await register(stack, "bard-1", "bard-small", 50061)
    await expect(stack.router.Route(route(expert="milton-small")), grpc.StatusCode.UNAVAILABLE)


async def test_scheduler_down_is_unavailable_not_a_hang() -> None:
    async with running_stack(scheduler_alive=False) as stack:
        details = await expect(stack.router.Route(route(), timeout=10), grpc.StatusCode.UNAVAILABLE)
        assert details["reason"] == "SCHEDULER_UNAVAILABLE"
        await expect(stack.router.ListExperts(router_pb2.ListExpertsRequest(), timeout=10), grpc.StatusCode.UNAVAILABLE)


async def test_list_experts_counts_ready_replicas(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "bard-2", "bard-small", 50062)
    reply = await stack.router.ListExperts(router_pb2.ListExpertsRequest())
    counts = {e.name: e.ready_replicas for e in reply.experts}
    assert counts == {"bard-small": 2, "milton-small": 0, "scribe-large": 0}
    scribe = next(e for e in reply.experts if e.name == "scribe-large")
    assert scribe.relative_cost == pytest.approx(4.0) and "Shakespeare" in scribe.description


async def test_feedback_completes_the_placement(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await stack.router.Route(route())
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].inflight == 1
    await stack.router.Feedback(
        router_pb2.FeedbackRequest(
            request_id="req-1",
            expert="bard-small",
            replica_id="bard-1",
            success=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=8),
            time_to_first_token_seconds=0.05,
            latency_seconds=0.3,
        )
    )
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].inflight == 0
    details = await expect(
        stack.router.Feedback(router_pb2.FeedbackRequest(expert="bard-small")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "request_id"
    await expect(
        stack.router.Feedback(router_pb2.FeedbackRequest(request_id="x", expert="nope")), grpc.StatusCode.NOT_FOUND
    )
