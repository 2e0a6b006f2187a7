"""Client and server spans of real calls (rpc_tracing.py) and the server pipeline's per-method
composition (interceptors.py), over a real GrpcService and the channels services use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind, StatusCode
from switchboard.common.channels import open_channel
from switchboard.common.errors import not_found
from switchboard.common.interceptors import Behavior, ServerPipeline, Stage
from switchboard.common.service import GrpcService
from switchboard.common.settings import ServerSettings
from switchboard.common.telemetry import get_tracer, in_memory_span_exporter

SERVICE = "switchboard.test.Traced"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
SEEN_METADATA: list[dict[str, Any]] = []


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    SEEN_METADATA.append(dict(context.invocation_metadata() or ()))
    if request == b"missing":
        raise not_found("no such thing")
    with get_tracer("test").start_as_current_span("inside"):
        return request


async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request or b"3")):
        yield bytes([i])
        await asyncio.sleep(0.01)


def add_service(server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    svc = GrpcService("traced", ServerSettings(port=0, metrics_port=0, drain_seconds=1.0))
    add_service(svc.server)
    task = asyncio.create_task(svc.run([SERVICE], handle_signals=False))
    await asyncio.wait_for(svc.started.wait(), 10)
    ch = open_channel(f"127.0.0.1:{svc.port}")
    yield ch
    await ch.close()
    svc.stop()
    await asyncio.wait_for(task, 10)


@pytest.fixture
def exporter() -> Any:
    spans = in_memory_span_exporter()
    spans.clear()
    return spans


async def ended(exporter: Any, name: str, count: int = 2) -> list[Any]:
    """The finished spans named `name`, once `count` of them have ended (server spans end after the reply)."""
    for _ in range(200):
        spans = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name}: {len(spans)} spans ended, wanted {count}")


def by_kind(spans: list[Any]) -> dict[SpanKind, Any]:
    return {span.kind: span for span in spans}


async def test_one_trace_from_the_client_span_to_the_server_span(channel: grpc.aio.Channel, exporter: Any) -> None:
    with get_tracer("test").start_as_current_span("caller") as caller:
        assert await channel.unary_unary(UNARY)(b"hello", metadata=(("x-own", "kept"),), timeout=5) == b"hello"
    spans = by_kind(await ended(exporter, UNARY))
    client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    trace_id = caller.get_span_context().trace_id
    assert client.context.trace_id == server.context.trace_id == trace_id
    assert client.parent.span_id == caller.get_span_context().span_id
    assert server.parent.span_id == client.context.span_id  # continued from the call's metadata
    for span in (client, server):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == SERVICE
        assert span.attributes["rpc.method"] == "Unary"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status.status_code is not StatusCode.ERROR
    inside = next(s for s in exporter.get_finished_spans() if s.name == "inside")
    assert inside.parent.span_id == server.context.span_id  # the server span is current in the handler
    assert SEEN_METADATA[-1]["x-own"] == "kept" and "traceparent" in SEEN_METADATA[-1]


async def test_a_failed_call_marks_both_spans_with_its_code(channel: grpc.aio.Channel, exporter: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(UNARY)(b"missing", timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    spans = by_kind(await ended(exporter, UNARY))
    for span in spans.values():
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert span.status.status_code is StatusCode.ERROR
    assert "no such thing" in (spans[SpanKind.SERVER].status.description or "")


async def test_a_stream_span_ends_with_the_stream(channel: grpc.aio.Channel, exporter: Any) -> None:
    call = channel.unary_stream(STREAM)(b"3", timeout=5)
    assert [item async for item in call] == [b"\x00", b"\x01", b"\x02"]
    assert await call.code() == grpc.StatusCode.OK  # grpc's own call object, not a wrapper
    spans = by_kind(await ended(exporter, STREAM))
    assert spans[SpanKind.CLIENT].attributes["rpc.grpc.status_code"] == 0
    assert spans[SpanKind.SERVER].attributes["rpc.grpc.status_code"] == 0


async def test_a_cancelled_stream_ends_both_spans_cancelled(channel: grpc.aio.Channel, exporter: Any) -> None:
    call = channel.unary_stream(STREAM)(b"100", timeout=5)
    assert await call.read() == b"\x00"
    call.cancel()
    spans = by_kind(await ended(exporter, STREAM))
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert spans[SpanKind.CLIENT].attributes["rpc.grpc.status_code"] == cancelled
    assert spans[SpanKind.SERVER].attributes["rpc.grpc.status_code"] == cancelled
    assert all(span.status.status_code is StatusCode.ERROR for span in spans.values())


async def test_health_checks_are_not_traced(channel: grpc.aio.Channel, exporter: Any) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await channel.unary_unary(UNARY)(b"after", timeout=5)
    await ended(exporter, UNARY)
    assert not [s for s in exporter.get_finished_spans() if "Health" in s.name]


class CountingStage(Stage):
    """Counts how often it is asked to wrap a method, and tags each call it sees."""

    def __init__(self, calls: list[str]) -> None:
        self.applied: list[str] = []
        self.calls = calls

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        self.applied.append(method)
        calls = self.calls

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            calls.append(f"{self.name}:{method}")
            return await behavior(request, context)

        return unary

    name = "stage"


async def test_the_pipeline_composes_each_method_once_and_runs_stages_in_order() -> None:
    calls: list[str] = []
    outer, inner = CountingStage(calls), CountingStage(calls)
    outer.name, inner.name = "outer", "inner"
    server = grpc.aio.server(interceptors=[ServerPipeline([outer, inner])])
    add_service(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as raw:
            for _ in range(3):
                assert await raw.unary_unary(UNARY)(b"x", timeout=5) == b"x"
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await raw.unary_unary(f"/{SERVICE}/Nope")(b"x", timeout=5)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert outer.applied == inner.applied == [UNARY]  # composed once, reused by the next two calls
    assert calls == [f"outer:{UNARY}", f"inner:{UNARY}"] * 3
