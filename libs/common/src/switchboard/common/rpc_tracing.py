"""gRPC client and server spans without grpc.aio interceptors on the client and without proxies.

Why not opentelemetry-instrumentation-grpc's aio interceptors: on the client, any grpc.aio client
interceptor turns each call into an intercepted call that runs the chain in an extra asyncio task;
on the server, its interceptor wraps the servicer context in a `wrapt` proxy and re-parses the
metadata and the peer on every call. With those (and the server stages as interceptors of their
own) a hop's machinery cost 0.40-0.43 ms over a bare hop of 0.69-0.88 ms; with this module and the
server pipeline, 0.23-0.24 ms (bench/hop_bench.py, bench/README.md). The spans are the same: one CLIENT span per
outgoing call and one SERVER span per handled call, named by the full method, with `rpc.system`,
`rpc.service`, `rpc.method` and `rpc.grpc.status_code`, ERROR status for a code other than OK,
and the W3C trace context carried in the call's metadata (the global propagator's format).

- `TracedChannel(channel)` wraps a grpc.aio channel: the stubs built on it get multicallables that
  start the CLIENT span, inject the context into the call's metadata and end the span when the call
  ends (its done callback), returning grpc's own call object unchanged.
- `ServerTracing.wrap(behavior, streaming, method)` is the SERVER span around one handler, for the
  server pipeline (interceptors.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from switchboard.common.interceptors import Behavior, Stage, is_infrastructure

RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

Metadata = Sequence[tuple[str, str | bytes]]


def is_traced(method: str) -> bool:
    """Every call is traced but health and reflection, which would drown real requests in the viewer."""
    return not is_infrastructure(method)


@functools.lru_cache(maxsize=256)
def rpc_attributes(method: str) -> Mapping[str, Any]:
    """The span attributes named by the full method ('/switchboard.v1.Router/Route'); computed once
    per method (stubs, and so their multicallables, are made per call on the gateway's hot path)."""
    service, _, name = method.lstrip("/").partition("/")
    return MappingProxyType({RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: name})


def end_span(span: trace.Span, code: grpc.StatusCode | None, details: str | None = None) -> None:
    """Record the call's status on its span and end it (ERROR for any code but OK)."""
    code = code or grpc.StatusCode.UNKNOWN
    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


class _MetadataSetter:
    """The propagator's setter onto a list of gRPC metadata pairs."""

    def set(self, carrier: list[tuple[str, str | bytes]], key: str, value: str) -> None:
        carrier.append((key, value))


class _MetadataGetter:
    """The propagator's getter from a handler's invocation metadata (a sequence of pairs)."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [value for name, value in carrier if name == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [name for name, _ in carrier]


_SETTER = _MetadataSetter()
_GETTER = _MetadataGetter()
# One tracer for every call (a proxy until the process installs its provider, then that provider's):
# `trace.get_tracer` builds a new one each time it is called.
_TRACER = trace.get_tracer(__name__)


def _call_status(call: Any) -> tuple[grpc.StatusCode | None, str | None]:
    """The code and details of a call that has ended (grpc.aio offers them as coroutines only).

    An ended call's coroutines return without suspending, so they are stepped here once instead of
    awaited from a task of their own; one that would suspend (never seen) reports UNKNOWN."""
    results: list[Any] = []
    for coroutine in (call.code(), call.details()):
        try:
            coroutine.send(None)
        except StopIteration as done:
            results.append(done.value)
            continue
        except Exception:
            pass
        coroutine.close()
        results.append(None)
    return results[0], results[1]


class _TracedMultiCallable:
    """A grpc.aio multicallable whose calls carry a CLIENT span."""

    __slots__ = ("_attributes", "_inner", "_method", "_traced")

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method
        self._traced = is_traced(method)
        self._attributes = rpc_attributes(method)

    def __call__(self, request: Any, *, metadata: Metadata | None = None, **kwargs: Any) -> Any:
        if not self._traced:
            return self._inner(request, metadata=metadata, **kwargs)
        span = _TRACER.start_span(self._method, kind=SpanKind.CLIENT, attributes=self._attributes)
        carrier: list[tuple[str, str | bytes]] = list(metadata) if metadata else []
        propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
        try:
            call = self._inner(request, metadata=tuple(carrier), **kwargs)
        except BaseException as error:
            span.record_exception(error)
            end_span(span, grpc.StatusCode.UNKNOWN, type(error).__name__)
            raise
        call.add_done_callback(lambda ended: end_span(span, *_call_status(ended)))
        return call


class TracedChannel(grpc.aio.Channel):
    """A grpc.aio channel whose stubs' calls are traced (CLIENT spans, context in the metadata)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedMultiCallable(self._channel.unary_unary(method, *args, **kwargs), method)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedMultiCallable(self._channel.unary_stream(method, *args, **kwargs), method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedMultiCallable(self._channel.stream_unary(method, *args, **kwargs), method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedMultiCallable(self._channel.stream_stream(method, *args, **kwargs), method)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)


class ServerTracing(Stage):
    """The SERVER span of each handled call, continuing the caller's trace from its metadata."""

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return super().apply(handler, method) if is_traced(method) else handler

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        attributes = rpc_attributes(method)
        tracer = _TRACER

        def start(context: grpc.aio.ServicerContext) -> tuple[trace.Span, object]:
            parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)
            span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            return span, otel_context.attach(trace.set_span_in_context(span, parent))

        def finish(span: trace.Span, token: object, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.OK if error is None else _code_of(error)
            if error is not None and not isinstance(error, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)):
                span.record_exception(error)
            end_span(span, code, context.details() or None)
            # A stream closed from outside (GeneratorExit: finalized from another task's context, its
            # own is gone) has nothing to restore; detaching would only log "Failed to detach context".
            if not isinstance(error, GeneratorExit) and trace.get_current_span() is span:
                otel_context.detach(token)  # type: ignore[arg-type]

        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                span, token = start(context)
                error: BaseException | None = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(span, token, context, error)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span, token = start(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(span, token, context, error)

        return unary


def _code_of(error: BaseException) -> grpc.StatusCode:
    """The status a handler that raised `error` ends with, when it set none itself."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
