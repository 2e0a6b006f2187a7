"""Server interceptors every service installs, in this order (outermost first):

1. OpenTelemetry (from telemetry.server_interceptors): the server span.
2. `MetricsInterceptor`: request count by method and status code, latency.
3. `ErrorInterceptor`: `ServiceError` -> its status with rich details; any other
   exception -> INTERNAL with a generic message (the stack goes to the log, never
   to the client).
Streaming handlers must be async generators (the style all servicers use).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram
from switchboard.common.errors import ServiceError
from switchboard.common.logging import get_logger

log = get_logger(__name__)

RPC_REQUESTS = Counter(
    "switchboard_rpc_requests_total", "gRPC requests handled, by service, method and status code.", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "switchboard_rpc_duration_seconds",
    "Wall time of gRPC requests (whole stream for streaming calls).",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

Behavior = Callable[..., Any]
Wrapper = Callable[[Behavior, bool], Behavior]


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Wrapper) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped; wrap(behavior, response_streaming)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer
    )


def _is_infrastructure(method: str) -> bool:
    return method.startswith(("/grpc.health.v1.", "/grpc.reflection."))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Map exceptions raised by servicers to canonical statuses."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or _is_infrastructure(details.method):
            return handler
        method = details.method

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
            if isinstance(exc, ServiceError):
                status = exc.to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            log.error("unhandled error in handler", method=method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log for this trace id")

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    try:
                        async for item in behavior(request, context):
                            yield item
                    except (grpc.aio.AbortError, GeneratorExit):
                        raise
                    except Exception as exc:
                        await fail(exc, context)

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(exc, context)

            return unary

        return _rewrap(handler, wrap)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Count requests by status code and observe their latency."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or _is_infrastructure(details.method):
            return handler
        method = details.method.rsplit("/", 1)[-1]

        def record(started: float, context: grpc.aio.ServicerContext, failed: bool) -> None:
            code = context.code() if context.code() is not None else (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            if context.cancelled():
                code = grpc.StatusCode.CANCELLED
            RPC_REQUESTS.labels(self.service, method, code.name).inc()
            RPC_LATENCY.labels(self.service, method).observe(time.perf_counter() - started)

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    started, failed = time.perf_counter(), True
                    try:
                        async for item in behavior(request, context):
                            yield item
                        failed = False
                    finally:
                        record(started, context, failed)

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, failed = time.perf_counter(), True
                try:
                    result = await behavior(request, context)
                    failed = False
                    return result
                finally:
                    record(started, context, failed)

            return unary

        return _rewrap(handler, wrap)
