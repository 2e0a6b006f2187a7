"""The server pipeline every service installs: one grpc.aio interceptor running these stages,
outermost first:

1. `ServerTracing` (rpc_tracing.py): the server span.
2. `MetricsInterceptor`: request count by method and status code, latency.
3. `DecodeInterceptor`: a request message over its method's bound
   (`<SERVICE>_MAX_METHOD_MESSAGE_BYTES`) -> RESOURCE_EXHAUSTED naming the bound and the
   setting (reason MESSAGE_TOO_LARGE), before it is decoded; request bytes that do not
   decode as the method's message -> INVALID_ARGUMENT naming the message type (reason
   MALFORMED_REQUEST); both before any later stage or the servicer sees the
   request, and no Python exception text.
4. The identity check (tls.py, with mutual TLS), then the service's own stages (`extra_interceptors`).
5. `ErrorInterceptor`: `ServiceError` -> its status with rich details; any other
   exception -> INTERNAL with a generic message (the stack goes to the log, never
   to the client).

Why one interceptor (`ServerPipeline`) and not a chain: grpc.aio awaits each interceptor of a chain
on every call, and each re-wrapped the handler per call. The pipeline composes the stages' wrappers
once per method and reuses them, so a call costs one dictionary lookup before its handler runs
(bench/gateway_bench.py's `hop` rows). Every stage is still an interceptor on its own, for a server
that wants only one.
Streaming handlers must be async generators (the style all servicers use).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError
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
# A handler cancelled this close to (or past) its deadline was ended by the deadline, not by the client.
DEADLINE_SLACK_SECONDS = 0.05
Wrapper = Callable[[Behavior, bool], Behavior]


def rewrap_handler(handler: grpc.RpcMethodHandler, wrap: Wrapper) -> grpc.RpcMethodHandler:
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


def rewrap_handler_with(handler: grpc.RpcMethodHandler, wrap: Wrapper, deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    """Like `rewrap_handler`, with another request deserializer."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return factory(wrap(behavior, bool(handler.response_streaming)), deserializer, handler.response_serializer)


def is_infrastructure(method: str) -> bool:
    return method.startswith(("/grpc.health.v1.", "/grpc.reflection."))


class Stage(grpc.aio.ServerInterceptor):
    """One step of the server pipeline. `apply` wraps one method's handler, once per method;
    subclasses override `wrap` (the behavior) or `apply` (the whole handler, e.g. its deserializer)."""

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return rewrap_handler(handler, lambda behavior, streaming: self.wrap(behavior, streaming, method))

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        return behavior

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return handler if handler is None else self.apply(handler, details.method)


class ServerPipeline(grpc.aio.ServerInterceptor):
    """Run `stages` (outermost first) as one interceptor, composing them once per method.

    The composed handler is kept with the handler it wraps and rebuilt if the server ever answers a
    method with another handler; only methods the server serves are kept (an unknown method has no
    handler), so the cache is bounded by the services' methods."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self._stages = tuple(stages)
        self._composed: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        cached = self._composed.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        composed = handler
        for stage in reversed(self._stages):
            composed = stage.apply(composed, method)
        self._composed[method] = (handler, composed)
        return composed


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
    """`context.abort`, for a call that may have ended in grpc core meanwhile.

    When the caller's deadline passes (or it goes away) at the moment a handler fails, for example
    a handler whose own deadline is the caller's, core has already finished the call and sending the
    status fails with ExecuteBatchError, which grpc logs as an error in core. Nobody is left to tell:
    the call ends as cancelled, which grpc treats as such (no status to send, nothing logged).
    """
    try:
        await context.abort(code, details, trailing)
    except ExecuteBatchError:
        raise asyncio.CancelledError(f"the call ended before its {code.name} status went out") from None


class ErrorInterceptor(Stage):
    """Map exceptions raised by servicers to canonical statuses."""

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return handler if is_infrastructure(method) else super().apply(handler, method)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
            if isinstance(exc, ServiceError):
                status = exc.to_status()
                await _abort(context, status.code, status.details, status.trailing_metadata)
            log.error("unhandled error in handler", method=method, exc_info=exc)
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the service log for this trace id")

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


class MetricsInterceptor(Stage):
    """Count requests by status code and observe their latency."""

    def __init__(self, service: str) -> None:
        self.service = service

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return handler if is_infrastructure(method) else super().apply(handler, method)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        name = method.rsplit("/", 1)[-1]
        latency = RPC_LATENCY.labels(self.service, name)
        service = self.service

        def record(started: float, context: grpc.aio.ServicerContext, failed: bool, ended_outside: bool = False) -> None:
            code = context.code() if context.code() is not None else (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            if context.cancelled():
                code = grpc.StatusCode.CANCELLED
            elif ended_outside and context.code() is None:
                # gRPC cancelled the handler: the client went away or its deadline passed (no status of ours).
                remaining = context.time_remaining()
                passed = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
                code = grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED
            RPC_REQUESTS.labels(service, name, code.name).inc()
            latency.observe(time.perf_counter() - started)

        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, failed, outside = time.perf_counter(), True, False
                try:
                    async for item in behavior(request, context):
                        yield item
                    failed = False
                except (asyncio.CancelledError, GeneratorExit):
                    outside = True
                    raise
                finally:
                    record(started, context, failed, outside)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, failed, outside = time.perf_counter(), True, False
            try:
                result = await behavior(request, context)
                failed = False
                return result
            except asyncio.CancelledError:
                outside = True
                raise
            finally:
                record(started, context, failed, outside)

        return unary


MALFORMED_REQUEST = "MALFORMED_REQUEST"
# ErrorInfo reason of a request message over its method's bound (the bound and its setting in metadata).
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"


class _Undecodable:
    """Stands in for a request whose bytes did not decode; the handler wrapper answers for it."""

    __slots__ = ("message_type",)

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


@dataclass(frozen=True)
class MethodBound:
    """One method's request message bound and the setting that sets it (named in the refusal)."""

    method: str  # "Service/Method", as the setting spells it
    limit: int
    setting: str


class _Oversized:
    """Stands in for a request message over its method's bound (never decoded)."""

    __slots__ = ("bound", "size")

    def __init__(self, bound: MethodBound, size: int) -> None:
        self.bound, self.size = bound, size


def method_key(full_method: str) -> str:
    """`/grpc.health.v1.Health/Check` -> `Health/Check`: the service's short name and the method."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{method}"


def message_type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """The full protobuf name a deserializer decodes (`Message.FromString`), or a generic phrase."""
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", None)
    return name if isinstance(name, str) and name else "the method's request message"


def malformed_request(message_type: str) -> ServiceError:
    """INVALID_ARGUMENT for undecodable request bytes: names the type, never the decoder's exception."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid {message_type} (its bytes do not decode)",
        reason=MALFORMED_REQUEST,
        metadata={"message_type": message_type},
    )


def message_too_large(bound: MethodBound, size: int) -> ServiceError:
    """RESOURCE_EXHAUSTED for a request message over its method's bound, naming the bound and its setting.

    RESOURCE_EXHAUSTED is what gRPC itself answers for a message over the server-wide limit, so a
    client sees one code for "too large" whichever bound refused it; no RetryInfo (the same message
    is refused again).
    """
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request message is {size} bytes, over the {bound.limit}-byte bound of {bound.method} "
        f"(set by {bound.setting})",
        reason=MESSAGE_TOO_LARGE,
        metadata={"method": bound.method, "limit_bytes": str(bound.limit), "setting": bound.setting},
    )


def safe_deserializer(
    deserializer: Callable[[bytes], Any] | None, bound: MethodBound | None = None
) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns a stand-in instead of raising on bytes it cannot decode, and
    (with a `bound`) a stand-in without decoding for a message over the bound."""
    if deserializer is None:
        return None
    message_type = message_type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        if bound is not None and len(data) > bound.limit:
            return _Oversized(bound, len(data))  # checked before any decode work
        try:
            return deserializer(data)
        except Exception:  # DecodeError, invalid UTF-8, nesting too deep, ...: all the same to the caller
            return _Undecodable(message_type)

    return deserialize


async def _reject(item: _Undecodable | _Oversized, context: grpc.aio.ServicerContext) -> None:
    if isinstance(item, _Oversized):
        status = message_too_large(item.bound, item.size).to_status()
    else:
        status = malformed_request(item.message_type).to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class DecodeInterceptor(Stage):
    """Refuse request messages over their method's bound, and answer undecodable request bytes
    with INVALID_ARGUMENT naming the message type.

    `bounds` maps "Service/Method" (`method_key`) to its bound; a method without one is bounded only
    by the server-wide max_receive_message_bytes, which gRPC applies before any interceptor. The
    size check runs in the deserializer, so an oversized message is never decoded, and every
    message of a client stream is checked.

    grpc.aio decodes a request with the handler's `request_deserializer` and turns a decode
    exception into UNKNOWN carrying the Python exception's class and text. This stage
    swaps in a deserializer that never raises (`safe_deserializer`) and a behavior that, for a
    request that did not decode, aborts with `malformed_request` before anything after it runs.
    Applied to every method of every service (health and reflection included).
    """

    def __init__(self, bounds: Mapping[str, MethodBound] | None = None) -> None:
        self.bounds = dict(bounds or {})

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
            return handler  # a sync handler (none in this project): left as it is
        request_streaming = bool(handler.request_streaming)

        def checked_requests(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async def iterate() -> AsyncIterator[Any]:
                async for item in requests:
                    if isinstance(item, (_Undecodable, _Oversized)):
                        await _reject(item, context)
                    yield item

            return iterate()

        async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request_streaming:
                return checked_requests(request, context)
            if isinstance(request, (_Undecodable, _Oversized)):
                await _reject(request, context)
            return request

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    request = await check(request, context)
                    async for item in behavior(request, context):
                        yield item

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await check(request, context), context)

            return call

        bound = self.bounds.get(method_key(method))
        return rewrap_handler_with(handler, wrap, safe_deserializer(handler.request_deserializer, bound))
