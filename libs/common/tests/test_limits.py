"""Limits before work and clean statuses for malformed input, on a real in-process server.

The server limits are settings (`{PREFIX}_MAX_RECEIVE_MESSAGE_BYTES`, ...) that gRPC enforces
before any handler runs; undecodable request bytes answer INVALID_ARGUMENT naming the message
type (the `DecodeInterceptor` every GrpcService installs), never UNKNOWN with Python text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import pytest
from grpc_health.v1 import health_pb2
from switchboard.common.enums import enum_name
from switchboard.common.errors import error_details
from switchboard.common.service import GrpcService, server_options
from switchboard.common.settings import (
    ServerSettings,
    SettingsError,
    load_server_settings,
    load_settings,
    method_message_limits,
    reference_markdown,
    settings_reference,
)
from switchboard.v1 import common_pb2, scheduler_pb2

SERVICE = "switchboard.test.Limits"
LIMIT = 64 * 1024


@dataclass(frozen=True)
class FrontSettings:
    """A service that chooses its own limit defaults."""

    server_defaults: ClassVar[dict[str, Any]] = {"max_receive_message_bytes": 100_000, "max_concurrent_streams": 8}
    server: ServerSettings


def test_limit_defaults_and_a_service_choosing_its_own() -> None:
    plain = load_server_settings("X", 1, 2, environ={})
    assert plain.max_receive_message_bytes == 4 * 1024 * 1024 and plain.max_metadata_bytes == 16 * 1024
    assert (plain.max_concurrent_streams, plain.max_ping_strikes, plain.keepalive_permit_without_calls) == (1024, 2, True)
    front = load_settings(FrontSettings, server_prefix="FRONT", environ={})
    assert (front.server.max_receive_message_bytes, front.server.max_concurrent_streams) == (100_000, 8)
    assert front.server.max_send_message_bytes == plain.max_send_message_bytes
    docs = {d.env: d.default for d in settings_reference(FrontSettings, server_prefix="FRONT")}
    assert docs["FRONT_MAX_RECEIVE_MESSAGE_BYTES"] == "100000" and docs["FRONT_MAX_PING_STRIKES"] == "2"
    assert "`FRONT_MAX_METADATA_BYTES` | `16384`" in reference_markdown(settings_reference(FrontSettings, server_prefix="FRONT"))
    set_ = load_settings(
        FrontSettings,
        server_prefix="FRONT",
        environ={"FRONT_MAX_RECEIVE_MESSAGE_BYTES": "2048", "FRONT_KEEPALIVE_PERMIT_WITHOUT_CALLS": "false"},
    )
    assert (set_.server.max_receive_message_bytes, set_.server.keepalive_permit_without_calls) == (2048, False)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FRONT_MAX_RECEIVE_MESSAGE_BYTES", "10"),
        ("FRONT_MAX_RECEIVE_MESSAGE_BYTES", "lots"),
        ("FRONT_MAX_SEND_MESSAGE_BYTES", "0"),
        ("FRONT_MAX_METADATA_BYTES", "-1"),
        ("FRONT_MAX_CONCURRENT_STREAMS", "0"),
        ("FRONT_KEEPALIVE_TIME_SECONDS", "0.1"),
        ("FRONT_KEEPALIVE_TIMEOUT_SECONDS", "x"),
        ("FRONT_KEEPALIVE_PERMIT_WITHOUT_CALLS", "maybe"),
        ("FRONT_MIN_CLIENT_PING_INTERVAL_SECONDS", "0"),
        ("FRONT_MAX_PING_STRIKES", "-2"),
    ],
)
def test_bad_limits_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(FrontSettings, server_prefix="FRONT", environ={variable: value})


def test_server_defaults_must_name_a_limit() -> None:
    with pytest.raises(TypeError, match="max_recieve"):
        load_server_settings("X", 1, 2, environ={}, defaults={"max_recieve": 1})


def test_options_carry_the_settings() -> None:
    options = dict(server_options(ServerSettings(max_receive_message_bytes=5000, max_concurrent_streams=7, max_ping_strikes=0)))
    assert options["grpc.max_receive_message_length"] == 5000
    assert options["grpc.max_concurrent_streams"] == 7 and options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.max_metadata_size"] == 16 * 1024
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1


class Recorder:
    """The test methods: decode `ReportLoadRequest` and remember every request that reached them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def unary(self, request: scheduler_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext) -> scheduler_pb2.ReportLoadResponse:
        self.calls.append(request)
        return scheduler_pb2.ReportLoadResponse(known=True)

    async def stream(self, request: scheduler_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.ReportLoadResponse]:
        self.calls.append(request)
        yield scheduler_pb2.ReportLoadResponse(known=True)


@asynccontextmanager
async def serving(settings: ServerSettings, recorder: Recorder) -> AsyncIterator[GrpcService]:
    """A GrpcService on a free port whose methods are the recorder's (ReportLoad messages), stopped on exit."""
    svc = GrpcService("limits", settings)
    rpc = (scheduler_pb2.ReportLoadRequest.FromString, scheduler_pb2.ReportLoadResponse.SerializeToString)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(recorder.unary, *rpc),
        "Stream": grpc.unary_stream_rpc_method_handler(recorder.stream, *rpc),
    }
    if isinstance(recorder, Collector):
        handlers["Collect"] = grpc.stream_unary_rpc_method_handler(recorder.collect, *rpc)
    svc.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    task = asyncio.create_task(svc.run([SERVICE], handle_signals=False))
    await asyncio.wait_for(svc.started.wait(), 10)
    try:
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcService, Recorder]]:
    recorder = Recorder()
    settings = ServerSettings(port=0, metrics_port=0, drain_seconds=0.2, max_receive_message_bytes=LIMIT, max_metadata_bytes=4096)
    async with serving(settings, recorder) as svc:
        yield svc, recorder


def raw_channel(svc: GrpcService) -> grpc.aio.Channel:
    """A plain channel that may send 32 MiB (the server's limit is what is under test)."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}", options=[("grpc.max_send_message_length", 32 * 1024 * 1024)])


def sized_request(size: int) -> bytes:
    """A valid ReportLoadRequest of exactly `size` encoded bytes (its replica_id padded)."""
    pad = size - 8
    while True:
        data = scheduler_pb2.ReportLoadRequest(replica_id="r" * pad).SerializeToString()
        if len(data) == size:
            return data
        pad += size - len(data)


async def test_oversized_message_is_refused_before_the_handler(served: tuple[GrpcService, Recorder]) -> None:
    svc, recorder = served
    async with raw_channel(svc) as channel:
        for method in ("Unary", "Stream"):
            call = channel.unary_unary(f"/{SERVICE}/{method}") if method == "Unary" else channel.unary_stream(f"/{SERVICE}/{method}")
            for size in (LIMIT + 1, 16 * 1024 * 1024):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    reply = call(sized_request(size), timeout=10)
                    if method == "Unary":
                        await reply
                    else:
                        async for _ in reply:
                            pass
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, size, caught.value.details())
        assert recorder.calls == []
        # The largest message the limit allows reaches the handler.
        reply = await channel.unary_unary(f"/{SERVICE}/Unary")(sized_request(LIMIT), timeout=10)
        assert scheduler_pb2.ReportLoadResponse.FromString(reply).known
        assert len(recorder.calls) == 1 and len(recorder.calls[0].replica_id) > LIMIT - 16


async def test_oversized_metadata_is_refused_before_the_handler(served: tuple[GrpcService, Recorder]) -> None:
    svc, recorder = served
    async with raw_channel(svc) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", metadata=[("x-big", "v" * 8192)], timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert recorder.calls == []
        assert await call(b"", metadata=[("x-small", "v" * 1024)], timeout=10) is not None


GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x12\x05ab", b"\x0a\x02\xc3\x28", bytes(range(256)))


def assert_clean_invalid_argument(error: grpc.aio.AioRpcError, message_type: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details() or ""
    assert message_type in details
    for leak in ("DecodeError", "Error parsing", "Exception", "Traceback", "<class", "Unexpected"):
        assert leak not in details
    info = error_details(error)
    assert info["reason"] == "MALFORMED_REQUEST"


async def test_undecodable_bytes_answer_invalid_argument_naming_the_type(served: tuple[GrpcService, Recorder]) -> None:
    svc, recorder = served
    async with raw_channel(svc) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=None, response_deserializer=None)
        stream = channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=None, response_deserializer=None)
        for garbage in GARBAGE:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(garbage, timeout=10)
            assert_clean_invalid_argument(caught.value, "switchboard.v1.ReportLoadRequest")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream(garbage, timeout=10):
                    pass
            assert_clean_invalid_argument(caught.value, "switchboard.v1.ReportLoadRequest")
        assert recorder.calls == []
        # Health (a service the runtime adds) too.
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(b"\xff\xff", timeout=10)
        assert_clean_invalid_argument(caught.value, "grpc.health.v1.HealthCheckRequest")
        # A good request still works afterwards.
        reply = await check(health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=10)
        assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING
        assert await unary(scheduler_pb2.ReportLoadRequest(replica_id="ok").SerializeToString(), timeout=10)


def test_unknown_enum_values_read_as_unspecified() -> None:
    request = scheduler_pb2.SchedulerCompleteRequest.FromString(
        scheduler_pb2.SchedulerCompleteRequest(request_id="r").SerializeToString() + b"\x20\x63"  # finish_reason = 99
    )
    assert request.finish_reason == 99
    assert enum_name(common_pb2.FinishReason, request.finish_reason) == "FINISH_REASON_UNSPECIFIED"
    assert enum_name(common_pb2.FinishReason, common_pb2.FINISH_REASON_EOS) == "FINISH_REASON_EOS"


# Per-method bounds: tighter than the server-wide limit for small methods, checked before decoding.
BOUND = 1024
BOUNDS_ENV = {
    "LIMITS_DRAIN_SECONDS": "0.2",
    "LIMITS_MAX_RECEIVE_MESSAGE_BYTES": str(LIMIT),
    "LIMITS_MAX_METHOD_MESSAGE_BYTES": f"Limits/Unary={BOUND},Limits/Collect={BOUND}",
}


def test_method_bounds_merge_over_the_defaults_and_name_the_variable() -> None:
    plain = load_server_settings("X", 1, 2, environ={})
    assert method_message_limits(plain) == {
        "Health/Check": 4096,
        "Health/Watch": 4096,
        "Health/List": 4096,
        "ServerReflection/ServerReflectionInfo": 16384,
    }
    # A service's defaults add to the shared ones; an operator's pairs replace only their methods.
    front = load_settings(
        BoundedFront,
        server_prefix="FRONT",
        environ={"FRONT_MAX_METHOD_MESSAGE_BYTES": "Health/Check=2048, Front/New=512"},
    )
    limits = method_message_limits(front.server)
    assert limits["Health/Check"] == 2048 and limits["Health/Watch"] == 4096
    assert limits["Front/Small"] == 256 and limits["Front/New"] == 512
    docs = {d.env: d.default for d in settings_reference(BoundedFront, server_prefix="FRONT")}
    assert "Front/Small=256" in docs["FRONT_MAX_METHOD_MESSAGE_BYTES"]
    assert "Health/Check=4096" in docs["FRONT_MAX_METHOD_MESSAGE_BYTES"]
    # A default bound above a lowered server limit is capped, not an error.
    low = load_settings(BoundedFront, server_prefix="FRONT", environ={"FRONT_MAX_RECEIVE_MESSAGE_BYTES": "2048"})
    assert method_message_limits(low.server)["ServerReflection/ServerReflectionInfo"] == 2048


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Health/Check", "expected Service/Method=bytes"),
        ("Check=100", "expected Service/Method=bytes"),
        ("Health/Check=lots", "expected a number of bytes"),
        ("Health/Check=8", "must be >= 16"),
        ("Health/Check=5000000", "over FRONT_MAX_RECEIVE_MESSAGE_BYTES"),
    ],
)
def test_bad_method_bounds_name_the_variable(value: str, why: str) -> None:
    with pytest.raises(SettingsError, match="FRONT_MAX_METHOD_MESSAGE_BYTES") as caught:
        load_settings(BoundedFront, server_prefix="FRONT", environ={"FRONT_MAX_METHOD_MESSAGE_BYTES": value})
    assert why in str(caught.value)


@dataclass(frozen=True)
class BoundedFront:
    """A service with its own per-method bounds."""

    server_defaults: ClassVar[dict[str, Any]] = {"max_method_message_bytes": ("Front/Small=256",)}
    server: ServerSettings


async def test_a_bound_for_a_method_the_server_does_not_serve_stops_the_start() -> None:
    settings = load_server_settings("LIMITS", 0, 0, environ={"LIMITS_MAX_METHOD_MESSAGE_BYTES": "Health/Chek=100"})
    svc = GrpcService("limits", settings)
    with pytest.raises(SettingsError, match="LIMITS_MAX_METHOD_MESSAGE_BYTES: Health/Chek is not a method"):
        await svc.run([SERVICE], handle_signals=False)


class Collector(Recorder):
    """Adds a client-streaming method: every message of the stream is bounded."""

    async def collect(self, requests: AsyncIterator[scheduler_pb2.ReportLoadRequest], context: grpc.aio.ServicerContext) -> scheduler_pb2.ReportLoadResponse:
        async for request in requests:
            self.calls.append(request)
        return scheduler_pb2.ReportLoadResponse(known=True)


@pytest.fixture
async def bounded() -> AsyncIterator[tuple[GrpcService, Collector]]:
    recorder = Collector()
    async with serving(load_server_settings("LIMITS", 0, 0, environ=BOUNDS_ENV), recorder) as svc:
        yield svc, recorder


def assert_too_large(error: grpc.aio.AioRpcError, method: str, limit: int, size: int) -> None:
    """RESOURCE_EXHAUSTED naming the size, the bound, the method and the setting (reason MESSAGE_TOO_LARGE)."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    details = error.details() or ""
    assert f"{size} bytes" in details and f"{limit}-byte bound of {method}" in details, details
    assert "LIMITS_MAX_METHOD_MESSAGE_BYTES" in details
    info = error_details(error)
    assert info["reason"] == "MESSAGE_TOO_LARGE" and info["retry_after"] is None
    assert info["metadata"] == {"method": method, "limit_bytes": str(limit), "setting": "LIMITS_MAX_METHOD_MESSAGE_BYTES"}


async def test_a_message_over_its_method_bound_is_refused_before_decoding(bounded: tuple[GrpcService, Collector]) -> None:
    svc, recorder = bounded
    async with raw_channel(svc) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for size in (BOUND + 1, LIMIT):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(sized_request(size), timeout=10)
            assert_too_large(caught.value, "Limits/Unary", BOUND, size)
        # Over the bound and undecodable: refused for its size, since it is never decoded.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"\xff" * (BOUND + 1), timeout=10)
        assert_too_large(caught.value, "Limits/Unary", BOUND, BOUND + 1)
        # Each message of a client stream is bounded: the first fits, the second does not.
        collect = channel.stream_unary(f"/{SERVICE}/Collect")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(iter([sized_request(BOUND), sized_request(BOUND + 1)]), timeout=10)
        assert_too_large(caught.value, "Limits/Collect", BOUND, BOUND + 1)
        assert len(recorder.calls) == 1  # only the message within the bound reached the handler
        # Health's shared bound, on the runtime-added service.
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        big = health_pb2.HealthCheckRequest(service="s" * 5000).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(big, timeout=10)
        assert_too_large(caught.value, "Health/Check", 4096, len(big))
        # At the bound the request is served; a method without a bound keeps the server-wide limit.
        assert scheduler_pb2.ReportLoadResponse.FromString(await unary(sized_request(BOUND), timeout=10)).known
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        assert [m async for m in stream(sized_request(LIMIT), timeout=10)]
        reply = await check(health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=10)
        assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING
        assert len(recorder.calls) == 3
