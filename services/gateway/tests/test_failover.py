"""Failover on a busy replica: a generator that refuses before its first token with
RESOURCE_EXHAUSTED and reason REPLICA_QUEUE_FULL is skipped for the next candidate; when every
candidate is full the client gets RESOURCE_EXHAUSTED with RetryInfo; a RESOURCE_EXHAUSTED without
that reason describes the request and is passed back without trying another replica, as is an
INTERNAL with reason REQUEST_FAILED_IN_ENGINE (the replica's engine traced a failed step to it).

The router and the replicas are stand-ins served in-process over real channels (as in
test_token_ids.py); the real generator's refusal is tested in the generator's own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.errors import (
    REPLICA_QUEUE_FULL,
    REQUEST_FAILED_IN_ENGINE,
    ServiceError,
    error_details,
    resource_exhausted,
)
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.core import fails_over
from switchboard.gateway.keys import add_key, new_key
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    router_pb2_grpc,
)

from .test_token_ids import FP_A, FP_B, SAMPLING, FakeRouter, decision, grpc_server, started_gateway


class Replica(generator_pb2_grpc.GeneratorServicer):
    """Refuses as a full generator does (`mode="full"`), with a bare RESOURCE_EXHAUSTED (`"bare"`), as one
    whose engine failed the request (`"poison"`), or serves one token."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        if self.mode == "full":
            error = resource_exhausted(
                "replica r: the waiting queue is full (4 requests waiting, bound 4)",
                retry_after_seconds=1.5,
                reason=REPLICA_QUEUE_FULL,
            )
            await context.abort_with_status(error.to_status())
        if self.mode == "bare":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "received message larger than max")
        if self.mode == "hang":  # accepted the call, then never answers (a wedged engine)
            await asyncio.Event().wait()
        if self.mode == "poison":  # as a generator whose engine traced a failed step to this request
            error = ServiceError(
                grpc.StatusCode.INTERNAL,
                "request g-1 could not be served: it failed inside the model on replica r; "
                "retrying it unchanged will fail again",
                reason=REQUEST_FAILED_IN_ENGINE,
            )
            await context.abort_with_status(error.to_status())
        yield generator_pb2.GeneratorGenerateResponse(
            text="x",
            token_ids=[5],
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(completion_tokens=1),
        )


@asynccontextmanager
async def gateway_over(
    tmp_path: Path, *modes: str, **overrides: object
) -> AsyncIterator[tuple[gateway_pb2_grpc.GatewayStub, str, list[Replica]]]:
    """A gateway whose router answers with one candidate per replica (experts a, b, ...), in order."""
    replicas = [Replica(mode) for mode in modes]
    router = FakeRouter(decision())
    keys_file, key = tmp_path / "tenants.yaml", new_key()
    add_key(keys_file, "tenant", key)
    async with (
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
        _servers(replicas) as addresses,
    ):
        fingerprints = [FP_A, FP_B]
        router.answer = decision(
            *((chr(ord("a") + i), address, fingerprints[i % 2]) for i, address in enumerate(addresses))
        )
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr,
            tenants_file=keys_file,
            http_port=0,
            **overrides,  # type: ignore[arg-type]
        )
        async with started_gateway(settings) as channel:
            yield gateway_pb2_grpc.GatewayStub(channel), key, replicas


@asynccontextmanager
async def _servers(replicas: list[Replica]) -> AsyncIterator[list[str]]:
    addresses: list[str] = []
    managers = [
        grpc_server(lambda s, r=r: generator_pb2_grpc.add_GeneratorServicer_to_server(r, s)) for r in replicas
    ]
    try:
        for manager in managers:
            addresses.append(await manager.__aenter__())
        yield addresses
    finally:
        for manager in reversed(managers[: len(addresses)]):
            await manager.__aexit__(None, None, None)


def failovers(expert: str, code: str) -> float:
    return (
        REGISTRY.get_sample_value("switchboard_gateway_failovers_total", {"expert": expert, "code": code})
        or 0.0
    )


def test_only_a_busy_replicas_resource_exhausted_fails_over() -> None:
    assert fails_over(grpc.StatusCode.RESOURCE_EXHAUSTED, REPLICA_QUEUE_FULL)
    assert not fails_over(grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert not fails_over(grpc.StatusCode.RESOURCE_EXHAUSTED, "SOMETHING_ELSE")
    assert fails_over(grpc.StatusCode.UNAVAILABLE, None)
    assert not fails_over(grpc.StatusCode.INVALID_ARGUMENT, None)


def test_a_request_that_failed_in_the_engine_is_not_failed_over() -> None:
    """INTERNAL fails over, unless the replica traced the failure to the request itself."""
    assert fails_over(grpc.StatusCode.INTERNAL, None)
    assert fails_over(grpc.StatusCode.UNKNOWN, "SOMETHING_ELSE")
    assert not fails_over(grpc.StatusCode.INTERNAL, REQUEST_FAILED_IN_ENGINE)
    assert not fails_over(grpc.StatusCode.UNKNOWN, REQUEST_FAILED_IN_ENGINE)


async def test_a_full_replica_fails_over_to_the_next_candidate(tmp_path: Path) -> None:
    before = failovers("a", "RESOURCE_EXHAUSTED")
    async with gateway_over(tmp_path, "full", "serve") as (gateway, key, (full, serving)):
        reply = await gateway.Complete(
            gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=20,
        )
    assert reply.text == "x" and reply.model == "b"
    assert (full.calls, serving.calls) == (1, 1)
    assert failovers("a", "RESOURCE_EXHAUSTED") == before + 1


async def test_every_candidate_full_is_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    async with gateway_over(tmp_path, "full", "full") as (gateway, key, replicas):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in gateway.Generate(
                gateway_pb2.GenerateRequest(prompt="To be", sampling=SAMPLING),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=20,
            ):
                pass
    details = error_details(info.value)
    assert details["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert details["reason"] == "ALL_REPLICAS_BUSY" and details["retry_after"] == pytest.approx(1.5)
    assert "a-1 (queue full)" in details["message"] and "b-1 (queue full)" in details["message"]
    assert [r.calls for r in replicas] == [1, 1]


async def test_resource_exhausted_without_the_reason_is_not_failed_over(tmp_path: Path) -> None:
    async with gateway_over(tmp_path, "bare", "serve") as (gateway, key, (bare, serving)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.Complete(
                gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=20,
            )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (bare.calls, serving.calls) == (1, 0)


async def test_a_request_that_failed_in_the_engine_goes_back_to_the_client(tmp_path: Path) -> None:
    before = failovers("a", "INTERNAL")
    async with gateway_over(tmp_path, "poison", "serve") as (gateway, key, (poisoned, serving)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.Complete(
                gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=20,
            )
    details = error_details(info.value)
    assert details["code"] == grpc.StatusCode.INTERNAL, details
    assert details["reason"] == REQUEST_FAILED_IN_ENGINE
    assert "retrying it unchanged will fail again" in details["message"]
    assert (poisoned.calls, serving.calls) == (1, 0)
    assert failovers("a", "INTERNAL") == before


async def test_a_hung_replica_gets_a_first_token_budget_then_the_next_candidate_serves(tmp_path: Path) -> None:
    before = REGISTRY.get_sample_value(
        "switchboard_gateway_failovers_total", {"expert": "a", "code": "FIRST_TOKEN_TIMEOUT"}
    ) or 0.0
    async with gateway_over(tmp_path, "hang", "serve", attempt_first_token_seconds=0.3) as (stub, key, replicas):
        reply = await stub.Complete(
            gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=20,
        )
    assert reply.text == "x" and reply.model == "b"
    assert [r.calls for r in replicas] == [1, 1]
    after = REGISTRY.get_sample_value("switchboard_gateway_failovers_total", {"expert": "a", "code": "FIRST_TOKEN_TIMEOUT"})
    assert after == before + 1


async def test_a_deadline_shorter_than_the_budget_is_deadline_exceeded(tmp_path: Path) -> None:
    async with gateway_over(tmp_path, "hang", "serve", attempt_first_token_seconds=30) as (stub, key, _):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Complete(
                gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=0.5,
            )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
