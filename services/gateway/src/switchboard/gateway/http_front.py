"""The OpenAI-compatible HTTP front: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

A thin adapter over `GatewayCore`, like the gRPC servicer: it turns OpenAI's JSON into a
`GenerateRequest`, the core's stream into OpenAI's JSON or server-sent events, and the core's
`ServiceError`s into OpenAI's error shape and HTTP status codes. Authentication is a middleware
that resolves the caller's `Principal` (the same `Authenticator` as the gRPC interceptor) before any
route runs, so a route added later cannot forget it; only `/health` is public.

`model` names an expert, or is `auto` (or `switchboard`) to let the router choose among the experts
the tenant may use. Parameters the gateway does not serve (n > 1, logprobs, tools, ...) are refused
with 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from switchboard.common.errors import ServiceError
from switchboard.common.logging import get_logger
from switchboard.common.telemetry import get_tracer
from switchboard.gateway import metrics
from switchboard.gateway.auth import Authenticator, AuthError
from switchboard.gateway.chat import ChatError, ChatTemplates, normalize_messages
from switchboard.gateway.core import GatewayCore
from switchboard.gateway.principal import Principal
from switchboard.v1 import common_pb2, gateway_pb2

log = get_logger(__name__)
tracer = get_tracer(__name__)

AUTO_MODELS = frozenset({"", "auto", "switchboard"})
PUBLIC_PATHS = frozenset({"/health"})
FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
}
# gRPC status -> (HTTP status, OpenAI error type), as OpenAI's API answers them.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# Fields of OpenAI's requests that this front reads; others it accepts but ignores are listed below.
COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "user", "n"}
)
CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "user",
        "n",
    }
)
# Accepted at their neutral values only (what most clients send by default).
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False, "best_of": 1, "suffix": None}
NEUTRAL_CHAT = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None, "tools": None}
MAX_STOP = 8
# Messages a streamed response may hold between the core and a slow client before the core waits.
PUMP_QUEUE_MESSAGES = 64


def http_max_body_bytes(max_prompt_chars: int) -> int:
    """The largest JSON body accepted: a longest prompt with every character escaped (\\uXXXX, 6 bytes)
    plus room for the other fields; a larger body is refused before it is parsed."""
    return 6 * max_prompt_chars + 64 * 1024


class RequestError(Exception):
    """A request the front refuses before the core sees it: (field, message) -> 400."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def error_response(status: int, kind: str, message: str, param: str | None = None, code: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def service_error_body(error: ServiceError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and headers (Retry-After) for a core error."""
    status, kind = HTTP_STATUS.get(error.code, (500, "server_error"))
    param = error.field_violations[0][0] if error.field_violations else None
    headers: dict[str, str] = {}
    if error.retry_after_seconds is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_seconds)))
    body = {"error": {"message": error.message, "type": kind, "param": param, "code": error.reason}}
    return status, body, headers


class AuthMiddleware:
    """Resolve the principal of every request but the public paths, or answer 401 (OpenAI's shape)."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self._app = app
        self._authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self._app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = self._authenticator.authenticate(authorization)
        except AuthError as error:
            metrics.AUTH_FAILURES.labels(error.reason).inc()
            response = error_response(401, "authentication_error", error.message, code=error.reason)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self._app(scope, receive, send)


def _principal(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # only if the middleware was bypassed: fail closed
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "request not authenticated", reason="NOT_AUTHENTICATED")
    return principal


def _number(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise RequestError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return value


def _refuse_unsupported(body: Mapping[str, Any], known: frozenset[str], neutral: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name in neutral:
            if value not in (neutral[name], None):
                raise RequestError(name, f"is not supported by this server (only {neutral[name]!r})")
            continue
        # Unknown fields are ignored, as OpenAI-compatible servers do for forward compatibility.


def sampling_from(body: Mapping[str, Any], max_tokens_field: str = "max_tokens") -> common_pb2.SamplingParams:
    """SamplingParams from OpenAI's fields (the core validates ranges and names the proto field)."""
    sampling = common_pb2.SamplingParams()
    max_tokens = _number(body, max_tokens_field, int)
    if max_tokens is not None:
        if max_tokens < 1:
            raise RequestError(max_tokens_field, f"must be at least 1, got {max_tokens}")
        sampling.max_tokens = min(max_tokens, 2**31 - 1)
    for name in ("temperature", "top_p"):
        value = _number(body, name, float)
        if value is not None:
            if not -sys.float_info.max <= value <= sys.float_info.max:  # NaN, infinities, ints too large for a float
                raise RequestError(name, f"must be a finite number, got {value!r}")
            setattr(sampling, name, float(value))
    seed = _number(body, "seed", int)
    if seed is not None:
        sampling.seed = seed % 2**64
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop", "must be a string or a list of strings")
        sampling.stop.extend(stop[: MAX_STOP + 1])  # one over the limit still fails validation, naming it
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("n", "only n = 1 is supported")
    return sampling


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model", "must be a string: an expert's name, or auto")
    return "" if model in AUTO_MODELS else model


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise RequestError("stream_options", "must be an object")
    return bool(options.get("include_usage"))


def _usage(usage: common_pb2.Usage) -> dict[str, Any]:
    """OpenAI's usage object; a response-cache hit says so twice (gateway README, HTTP front).

    On a hit no replica ran the request, so every prompt token was served from a cache: OpenAI's
    `prompt_tokens_details.cached_tokens` is the whole prompt (what OpenAI-aware clients read), and
    `cached: true` (Switchboard's field, the gRPC `Usage.cached`) says the completion was cached too.
    Otherwise `cached_tokens` counts the prompt tokens the replica's prefix cache reused.
    """
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached:
        out["prompt_tokens_details"] = {"cached_tokens": usage.prompt_tokens}
        out["cached"] = True
    elif usage.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    return out


class CorePump:
    """Runs one core stream in its own task and hands its messages over a small queue.

    The core's stream binds context variables (the request's log fields, the span) for its whole
    life, so it must run in one context; Starlette reads a streaming body in another task than the
    route's. The pump's task is created in the route's context (so the request's span is the
    parent of everything the core does) and lives until the stream ends or `close` cancels it.
    """

    _END = object()

    def __init__(self, stream: AsyncIterator[gateway_pb2.GenerateResponse]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=PUMP_QUEUE_MESSAGES)
        self._task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[gateway_pb2.GenerateResponse]) -> None:
        try:
            async for message in stream:
                await self._queue.put(message)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the reader, which raises it in its own context
            await self._queue.put(error)
            return
        await self._queue.put(self._END)

    async def next(self) -> gateway_pb2.GenerateResponse | None:
        """The next message, None at the end; raises what the stream raised."""
        item = await self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Cancel the stream if it is still running (idempotent)."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class OpenAIFront:
    """The routes, over one core."""

    def __init__(
        self,
        core: GatewayCore,
        templates: ChatTemplates,
        default_timeout_seconds: float,
        max_body_bytes: int,
    ) -> None:
        self._core = core
        self._templates = templates
        self._timeout = default_timeout_seconds
        self._max_body = max_body_bytes

    async def _json(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise RequestError(None, f"request body over {self._max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body:
                raise RequestError(None, f"request body over {self._max_body} bytes")
        try:
            parsed = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(None, "the body is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise RequestError(None, f"the body is not valid JSON ({exc.msg} at character {exc.pos})") from None
        except (ValueError, RecursionError):  # a number of over 4300 digits; nesting deeper than the parser's stack
            raise RequestError(None, "the body is not valid JSON (a number too long or nesting too deep)") from None
        if not isinstance(parsed, dict):
            raise RequestError(None, "the body must be a JSON object")
        return parsed

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout


    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        body = await self._json(request)
        _refuse_unsupported(body, COMPLETION_FIELDS, NEUTRAL)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt", "must be a string (one prompt per request)")
        generate = gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling_from(body), model=_model(body))
        return await self._respond(request, body, generate, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        body = await self._json(request)
        _refuse_unsupported(body, CHAT_FIELDS, NEUTRAL_CHAT)
        model = _model(body)
        try:
            prompt = self._templates.render(normalize_messages(body.get("messages")), model)
        except ChatError as error:
            raise RequestError(error.field, error.message) from None
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        generate = gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling_from(body, field), model=model)
        return await self._respond(request, body, generate, chat=True)

    async def _respond(self, request: Request, body: Mapping[str, Any], generate: gateway_pb2.GenerateRequest, chat: bool) -> Response:
        principal = _principal(request)
        stream_requested = body.get("stream") is True
        include_usage = _include_usage(body)
        generate.request_id = uuid.uuid4().hex
        response_id = ("chatcmpl-" if chat else "cmpl-") + generate.request_id
        created = int(time.time())
        if not stream_requested:
            messages = [m async for m in self._core.generate(principal, generate, self._deadline())]
            return JSONResponse(self._whole(messages, response_id, created, chat))
        pump = CorePump(self._core.generate(principal, generate, self._deadline()))
        try:
            first = await pump.next()  # an error before the first token is a plain HTTP error
        except BaseException:
            await pump.close()
            raise
        head = [first] if first is not None else []
        return StreamingResponse(
            self._events(pump, head, response_id, created, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @staticmethod
    def _whole(messages: list[gateway_pb2.GenerateResponse], response_id: str, created: int, chat: bool) -> dict[str, Any]:
        text = "".join(m.text for m in messages)
        last = messages[-1] if messages else gateway_pb2.GenerateResponse()
        model = next((m.model for m in messages if m.model), "")
        finish = FINISH_REASONS.get(last.finish_reason, "stop")
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(last.usage),
        }

    async def _events(
        self,
        pump: CorePump,
        head: list[gateway_pb2.GenerateResponse],
        response_id: str,
        created: int,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's chunk shapes; an error after the first token is an error event."""
        model = next((m.model for m in head if m.model), "")
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage: common_pb2.Usage | None = None

        def event(payload: Mapping[str, Any]) -> bytes:
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"

        def chunk(message: gateway_pb2.GenerateResponse, first: bool) -> bytes:
            finish = FINISH_REASONS.get(message.finish_reason) if message.finish_reason else None
            if chat:
                delta: dict[str, Any] = {"content": message.text}
                if first:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": message.text, "finish_reason": finish, "logprobs": None}
            payload: dict[str, Any] = {"id": response_id, "object": kind, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return event(payload)

        first = True
        try:
            for message in head:
                yield chunk(message, first)
                first = False
                if message.finish_reason:
                    usage = message.usage
            while (message := await pump.next()) is not None:
                yield chunk(message, first)
                first = False
                if message.finish_reason:
                    usage = message.usage
        except ServiceError as error:
            _, body, _ = service_error_body(error)
            yield event(body)
            yield b"data: [DONE]\n\n"
            return
        finally:
            await pump.close()  # a client that went away cancels the request upstream
        if include_usage and usage is not None:
            yield event(
                {"id": response_id, "object": kind, "created": created, "model": model, "choices": [], "usage": _usage(usage)}
            )
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the experts the caller may use."""
        listing = await self._core.list_models(_principal(request))
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "switchboard"} for m in listing.models],
            }
        )


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _ending(body: AsyncIterator[Any], span: trace.Span) -> AsyncIterator[Any]:
    """A streaming body that ends the request's span when the stream ends (or the client goes away)."""
    try:
        async for part in body:
            yield part
    finally:
        span.end()


def _traced(handler: Callable[[Request], Awaitable[Response]], name: str) -> Callable[[Request], Awaitable[Response]]:
    """Run a route in a server span continuing the caller's W3C trace, mapping errors to OpenAI's shapes.

    A streamed response keeps its span open until its last event, so the span covers the whole request.
    """

    async def route(request: Request) -> Response:
        parent = propagate.extract(dict(request.headers))
        span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        streaming = False
        try:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.url.path)
            try:
                response = await handler(request)
            except RequestError as error:
                message = error.message if error.field is None else f"{error.field}: {error.message}"
                response = error_response(400, "invalid_request_error", message, param=error.field)
            except ServiceError as error:
                status, body, headers = service_error_body(error)
                response = JSONResponse(body, status_code=status, headers=headers)
            except UnicodeEncodeError:
                # JSON may carry lone surrogates (\ud800) that no UTF-8 string, so no protobuf field, can hold.
                response = error_response(400, "invalid_request_error", "strings must be valid Unicode (no lone surrogates)")
            except Exception:
                log.exception("unhandled error in HTTP route", path=request.url.path)
                response = error_response(500, "server_error", "internal error; see the gateway log for this trace id")
            span.set_attribute("http.response.status_code", response.status_code)
            metrics.HTTP_REQUESTS.labels(name, str(response.status_code)).inc()
            if isinstance(response, StreamingResponse):
                response.body_iterator = _ending(response.body_iterator, span)
                streaming = True
            return response
        finally:
            otel_context.detach(token)
            if not streaming:
                span.end()

    return route


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found_error", f"no route {request.method} {request.url.path}; see /v1/models")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, "invalid_request_error", f"{request.method} is not allowed on {request.url.path}")


def build_app(front: OpenAIFront, authenticator: Authenticator) -> ASGIApp:
    """The ASGI application: routes behind the authentication middleware."""
    app = Starlette(
        routes=[
            Route("/v1/completions", _traced(front.completions, "POST /v1/completions"), methods=["POST"]),
            Route("/v1/chat/completions", _traced(front.chat_completions, "POST /v1/chat/completions"), methods=["POST"]),
            Route("/v1/models", _traced(front.models, "GET /v1/models"), methods=["GET"]),
            Route("/health", _health, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )
    return AuthMiddleware(app, authenticator)
