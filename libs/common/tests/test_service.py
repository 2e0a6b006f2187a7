"""The server bootstrap over a real channel: health, reflection, error mapping,
metrics, drain. The test service is a generic handler on the real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details, invalid_argument, unavailable
from switchboard.common.logging import bind_request, configure_logging, get_logger
from switchboard.common.service import HEALTH_LIST_LIMIT, GrpcService
from switchboard.common.settings import ServerSettings
from switchboard.common.telemetry import configure_tracing, get_tracer

SERVICE = "switchboard.test.Echo"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"bad":
        raise invalid_argument("prompt", "must not be empty")
    if request == b"busy":
        raise unavailable("no healthy replica of expert 'x'", retry_after_seconds=1.5)
    if request == b"crash":
        raise ValueError("secret internal detail")
    return request


async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(3):
        yield bytes([i])
        if request == b"fail-midway":
            raise invalid_argument("sampling.stop", "too many stop strings")
    if request == b"slow":
        await asyncio.sleep(0.5)
        yield b"done"


def add_echo(server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def service() -> AsyncIterator[GrpcService]:
    svc = GrpcService("echo", ServerSettings(port=0, metrics_port=0, drain_seconds=2.0))
    add_echo(svc.server)
    task = asyncio.create_task(svc.run([SERVICE], handle_signals=False))
    await asyncio.wait_for(svc.started.wait(), 10)
    yield svc
    svc.stop()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def channel(service: GrpcService) -> AsyncIterator[grpc.aio.Channel]:
    ch = open_channel(f"127.0.0.1:{service.port}")
    yield ch
    await ch.close()


def call_unary(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/Unary")


async def test_health_serving_and_reflection(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for reply in replies:
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        break


async def test_health_list_names_every_service_with_its_status(
    service: GrpcService, channel: grpc.aio.Channel
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: r.status for name, r in reply.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        SERVICE: health_pb2.HealthCheckResponse.SERVING,
    }
    # List reads the same statuses as Check: a change shows in both.
    await service.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert reply.statuses[SERVICE].status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert reply.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    check = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_list_over_the_limit_is_resource_exhausted(
    service: GrpcService, channel: grpc.aio.Channel
) -> None:
    for i in range(HEALTH_LIST_LIMIT):
        await service.health.set(f"switchboard.test.Extra{i}", health_pb2.HealthCheckResponse.SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_service_error_becomes_rich_status(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(b"bad", timeout=5)
    info = error_details(caught.value)
    assert info["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert info["message"] == "prompt: must not be empty"
    assert info["field_violations"] == [("prompt", "must not be empty")]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(b"busy", timeout=5)
    info = error_details(caught.value)
    assert info["code"] == grpc.StatusCode.UNAVAILABLE and info["retry_after"] == pytest.approx(1.5)


async def test_unexpected_error_is_internal_without_details(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(b"crash", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_stream_error_after_messages(channel: grpc.aio.Channel) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in channel.unary_stream(f"/{SERVICE}/Stream")(b"fail-midway", timeout=5):
            received.append(item)
    assert received == [b"\x00"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.stop" in caught.value.details()


async def test_metrics_count_codes(channel: grpc.aio.Channel) -> None:
    def count(code: str) -> float:
        value = REGISTRY.get_sample_value(
            "switchboard_rpc_requests_total", {"service": "echo", "method": "Unary", "code": code}
        )
        return value or 0.0

    ok_before, bad_before = count("OK"), count("INVALID_ARGUMENT")
    assert await call_unary(channel)(b"hi", timeout=5) == b"hi"
    with pytest.raises(grpc.aio.AioRpcError):
        await call_unary(channel)(b"bad", timeout=5)
    assert count("OK") == ok_before + 1
    assert count("INVALID_ARGUMENT") == bad_before + 1


async def test_drain_finishes_inflight_and_goes_not_serving() -> None:
    svc = GrpcService("echo", ServerSettings(port=0, metrics_port=0, drain_seconds=5.0))
    add_echo(svc.server)
    drained = asyncio.Event()

    async def on_drain() -> None:
        drained.set()

    svc.on_drain(on_drain)
    task = asyncio.create_task(svc.run([SERVICE], handle_signals=False))
    await svc.started.wait()
    channel = open_channel(f"127.0.0.1:{svc.port}")
    try:
        call = channel.unary_stream(f"/{SERVICE}/Stream")(b"slow", timeout=10)
        first = await call.read()
        assert first == b"\x00"
        svc.stop()
        rest = []  # read() to the end: grpc.aio does not let one call mix read() and iteration
        while (item := await call.read()) is not grpc.aio.EOF:
            rest.append(item)
        assert rest[-1] == b"done"  # the in-flight stream finished within the grace period
        assert drained.is_set()
        await asyncio.wait_for(task, 10)
    finally:
        await channel.close()


def test_log_lines_are_json_with_trace_and_request_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_tracing("echo")
    configure_logging("echo", "info")
    log = get_logger("test")
    tracer = get_tracer("test")
    with tracer.start_as_current_span("request") as span, bind_request("req-1"):
        log.info("inside", tokens=3)
        trace_id = format(span.get_span_context().trace_id, "032x")
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    inside = next(line for line in lines if line["event"] == "inside")
    assert inside["request_id"] == "req-1" and inside["service"] == "echo" and inside["tokens"] == 3
    assert inside["trace_id"] == trace_id and len(inside["span_id"]) == 16
    outside = next(line for line in lines if line["event"] == "outside")
    assert "request_id" not in outside


def test_module_level_logger_made_before_configure_renders_json() -> None:
    """A logger created at import time (before configure_logging) must still print JSON."""
    import subprocess
    import sys

    code = (
        "from switchboard.common.logging import get_logger, configure_logging\n"
        "log = get_logger('early')\n"
        "configure_logging('probe', 'info')\n"
        "log.info('hello', n=1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["event"] == "hello" and line["logger_name"] == "early" and line["service"] == "probe"
