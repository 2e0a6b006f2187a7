"""The Gateway RPCs over real channels, with a real router and scheduler in-process.

Token streaming itself (and failover to a live replica) is exercised against real
generator processes in the cross-service tests (tests/); here every path that ends
before a generator produces a token: auth, validation, routing errors, dead replicas.
"""

from __future__ import annotations

import socket

import grpc
import pytest
from switchboard.common.errors import error_details
from switchboard.v1 import common_pb2, gateway_pb2

from .conftest import Stack


def generate(prompt: str = "To be, or not to be", **sampling: object) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))


async def stream_error(stack: Stack, request: gateway_pb2.GenerateRequest, metadata=None, **kwargs) -> dict:
    """Call Generate, drain it, and return the decoded error it must end with."""
    call = stack.gateway.Generate(request, metadata=stack.auth() if metadata is None else metadata, timeout=20, **kwargs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return error_details(info.value)


def dead_address() -> str:
    """A loopback address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_missing_and_wrong_keys_are_unauthenticated(stack: Stack) -> None:
    details = await stream_error(stack, generate(), metadata=[])
    assert details["code"] == grpc.StatusCode.UNAUTHENTICATED
    assert details["reason"] == "API_KEY_MISSING" and "Bearer" in details["message"]
    details = await stream_error(stack, generate(), metadata=stack.auth("sb-not-a-key"))
    assert details["code"] == grpc.StatusCode.UNAUTHENTICATED and details["reason"] == "API_KEY_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Complete(gateway_pb2.CompleteRequest(prompt="x"), metadata=[("authorization", "Basic x")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.ListModels(gateway_pb2.ListModelsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generate(prompt=""), "prompt"),
        (generate(prompt="x" * 201), "prompt"),
        (generate(max_tokens=-3), "sampling.max_tokens"),
        (generate(max_tokens=65), "sampling.max_tokens"),
        (generate(temperature=3.0), "sampling.temperature"),
        (generate(top_p=0.0), "sampling.top_p"),
        (generate(top_k=-2), "sampling.top_k"),
        (generate(stop=["x"] * 9), "sampling.stop"),
        (generate(min_tokens=9), "sampling.min_tokens"),
        (gateway_pb2.GenerateRequest(prompt="hi", request_id="r" * 129), "request_id"),
    ],
)
async def test_invalid_arguments_name_the_field(stack: Stack, request_: gateway_pb2.GenerateRequest, field: str) -> None:
    details = await stream_error(stack, request_)
    assert details["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert details["field_violations"][0][0] == field
    assert field in details["message"]


async def test_unknown_model_is_not_found(stack: Stack) -> None:
    details = await stream_error(stack, gateway_pb2.GenerateRequest(prompt="hi", model="gpt-9"))
    assert details["code"] == grpc.StatusCode.NOT_FOUND and "gpt-9" in details["message"]


async def test_no_replica_is_unavailable_with_retry_info(stack: Stack) -> None:
    details = await stream_error(stack, generate())
    assert details["code"] == grpc.StatusCode.UNAVAILABLE
    assert details["retry_after"] is not None and details["reason"] == "NO_HEALTHY_REPLICA"


async def test_dead_replicas_are_tried_in_turn_then_unavailable(stack: Stack) -> None:
    await stack.register("bard-dead-1", "bard-small", dead_address())
    await stack.register("bard-dead-2", "bard-small", dead_address())
    details = await stream_error(stack, gateway_pb2.GenerateRequest(prompt="hi", model="bard-small"))
    assert details["code"] == grpc.StatusCode.UNAVAILABLE
    assert details["reason"] == "ALL_REPLICAS_FAILED"
    assert "bard-dead-1" in details["message"] and "bard-dead-2" in details["message"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Complete(gateway_pb2.CompleteRequest(prompt="hi"), metadata=stack.auth(), timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_list_models(stack: Stack) -> None:
    await stack.register("bard-1", "bard-small", dead_address())
    reply = await stack.gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=stack.auth(), timeout=10)
    assert [(m.name, m.ready_replicas) for m in reply.models] == [
        ("bard-small", 1),
        ("milton-small", 0),
        ("scribe-large", 0),
    ]
    assert reply.models[2].relative_cost == pytest.approx(4.0)
