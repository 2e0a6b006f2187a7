"""The Gateway gRPC service: the public API (Generate, Complete, ListModels).

A request is authenticated (bearer API key), validated (each bad field named),
given a deadline (the client's, or GATEWAY_DEFAULT_TIMEOUT_SECONDS), routed by
the router, then streamed from the first candidate replica, with the prompt's
token ids the router made with that candidate's tokenizer (and the text, for a
replica that does not share it). If that replica fails before its first token
the next candidate is tried (failover), with its own expert's ids; after the
first token the stream ends with a clear status, because tokens already sent
cannot be taken back. A client that cancels cancels the upstream call, which
stops generation on the replica. The outcome goes to the router as Feedback
(the router forwards the completion to the scheduler), off the response path.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from switchboard.common.enums import enum_name
from switchboard.common.errors import (
    REPLICA_QUEUE_FULL,
    ServiceError,
    error_details,
    invalid_argument,
    resource_exhausted,
    unauthenticated,
    unavailable,
)
from switchboard.common.logging import bind_request, get_logger
from switchboard.common.telemetry import SpanAttributes
from switchboard.gateway import metrics
from switchboard.gateway.auth import AuthError, KeyStore
from switchboard.gateway.channels import ChannelPool
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.validation import FieldError, Limits, validate_request
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

log = get_logger(__name__)

# Failures of a replica before its first token that another replica may not share.
FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
# RESOURCE_EXHAUSTED reasons that describe the replica, not the request: the next candidate is
# tried. A RESOURCE_EXHAUSTED without one (gRPC's own message-size limits) is about the request
# and every replica would answer the same, so it goes back to the client.
FAILOVER_RESOURCE_REASONS = frozenset({REPLICA_QUEUE_FULL})


def fails_over(code: grpc.StatusCode, reason: str | None) -> bool:
    """Whether a replica's error before its first token is a reason to try the next candidate."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return reason in FAILOVER_RESOURCE_REASONS
    return code in FAILOVER_CODES


# Router answers passed to the client unchanged (they describe the request, not the gateway).
ROUTER_PASSTHROUGH = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
FEEDBACK_TIMEOUT_SECONDS = 2.0


def deadline_exceeded(message: str) -> ServiceError:
    """DEADLINE_EXCEEDED with a message saying which budget ran out."""
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def _passthrough(error: grpc.aio.AioRpcError) -> ServiceError:
    """Re-raise an upstream status (with its rich details) to our client."""
    info = error_details(error)
    return ServiceError(
        error.code(),
        error.details() or error.code().name,
        field_violations=info["field_violations"],
        retry_after_seconds=info["retry_after"],
        reason=info["reason"],
    )


@dataclass
class Outcome:
    """What happened to one request (for metrics, the span and router feedback)."""

    expert: str = ""
    replica_id: str = ""
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Authenticates, validates, routes and streams requests."""

    def __init__(self, settings: GatewaySettings, keys: KeyStore, router: router_pb2_grpc.RouterStub) -> None:
        self._settings = settings
        self._keys = keys
        self._router = router
        self._limits = Limits(
            max_prompt_chars=settings.max_prompt_chars,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
        )
        self._channels = ChannelPool(settings.channel_idle_seconds)
        self._background: set[asyncio.Task[None]] = set()

    # -- plumbing -----------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return self._keys.authenticate(context.invocation_metadata())
        except AuthError as error:
            metrics.AUTH_FAILURES.labels(error.reason).inc()
            log.warning("authentication failed", reason=error.reason, peer=context.peer())
            raise unauthenticated(error.message, reason=error.reason) from None

    def _budget(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds this request may take: the client's deadline, else the configured default."""
        remaining = context.time_remaining()
        return self._settings.default_timeout_seconds if remaining is None else remaining

    async def close(self) -> None:
        """Wait for pending feedback and close the replica channels (on drain)."""
        if self._background:
            await asyncio.wait(self._background, timeout=FEEDBACK_TIMEOUT_SECONDS + 1)
        await self._channels.close()

    # -- the request path -----------------------------------------------------------

    async def _route(
        self,
        request_id: str,
        prompt: str,
        sampling: common_pb2.SamplingParams,
        model: str,
        tenant: str,
        deadline: float,
        cost_weight: float | None = None,
    ) -> router_pb2.RouteResponse:
        timeout = min(self._settings.router_timeout_seconds, deadline - time.monotonic())
        if timeout <= 0:
            raise deadline_exceeded("the request deadline passed before routing")
        try:
            return await self._router.Route(
                router_pb2.RouteRequest(
                    request_id=request_id,
                    prompt=prompt,
                    sampling=sampling,
                    expert=model,
                    tenant=tenant,
                    cost_weight=cost_weight,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in ROUTER_PASSTHROUGH:
                raise _passthrough(error) from None
            if error.code() == grpc.StatusCode.UNAVAILABLE and error_has_retry(error):
                raise _passthrough(error) from None  # the router's own "no healthy replica"
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                if time.monotonic() >= deadline:
                    raise deadline_exceeded("the request deadline passed while routing") from None
                raise unavailable("the router did not answer in time", reason="ROUTER_TIMEOUT") from None
            raise unavailable(
                f"the router is unreachable ({error.code().name})", reason="ROUTER_UNAVAILABLE"
            ) from None

    async def _stream(
        self, request: gateway_pb2.GenerateRequest | gateway_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The shared body of Generate and Complete: yields GenerateResponse messages."""
        started = time.monotonic()
        tenant = self._authenticate(context)
        try:
            cost_weight = request.cost_weight if request.HasField("cost_weight") else None
            sampling = validate_request(
                request.prompt, request.sampling, request.model, request.request_id, self._limits, cost_weight
            )
        except FieldError as error:
            raise invalid_argument(error.field, error.message) from None
        request_id = request.request_id or uuid.uuid4().hex
        deadline = started + self._budget(context)
        span = trace.get_current_span()
        span.set_attribute(SpanAttributes.REQUEST_ID, request_id)
        span.set_attribute(SpanAttributes.TENANT, tenant)
        span.set_attribute(SpanAttributes.GEN_AI_REQUEST_MAX_TOKENS, sampling.max_tokens)
        if sampling.HasField("temperature"):
            span.set_attribute(SpanAttributes.GEN_AI_REQUEST_TEMPERATURE, sampling.temperature)
        outcome = Outcome()
        with bind_request(request_id, tenant=tenant):
            log.info("request", prompt_chars=len(request.prompt), max_tokens=sampling.max_tokens, model=request.model)
            try:
                decision = await self._route(
                    request_id, request.prompt, sampling, request.model, tenant, deadline, cost_weight
                )
                async for message in self._attempts(request_id, request.prompt, sampling, decision, deadline, outcome):
                    yield message
            except ServiceError as error:
                outcome.code = error.code
                raise
            except asyncio.CancelledError:
                outcome.code = grpc.StatusCode.CANCELLED
                outcome.finish_reason = common_pb2.FINISH_REASON_CANCELLED
                raise
            finally:
                self._finish(request_id, tenant, started, outcome, span)

    async def _attempts(
        self,
        request_id: str,
        prompt: str,
        sampling: common_pb2.SamplingParams,
        decision: router_pb2.RouteResponse,
        deadline: float,
        outcome: Outcome,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Try the candidates in order until one streams its first token."""
        failures: list[str] = []
        busy: list[float] = []  # RetryInfo delays of the candidates that refused with a full queue
        upstream = generator_requests(request_id, prompt, sampling, decision)
        for attempt, candidate in enumerate(decision.candidates):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise deadline_exceeded("the request deadline passed before a replica answered")
            outcome.expert, outcome.replica_id = candidate.expert, candidate.replica_id
            upstream_request = upstream[candidate.tokenizer_fingerprint]
            # The lease keeps the pooled channel open until this attempt's call has ended.
            channel = self._channels.acquire(candidate.address)
            call: grpc.aio.UnaryStreamCall | None = None
            streamed = False
            try:
                call = generator_pb2_grpc.GeneratorStub(channel).Generate(upstream_request, timeout=remaining)
                async for chunk in call:
                    now = time.monotonic()
                    message = gateway_pb2.GenerateResponse(
                        request_id=request_id,
                        text=chunk.text,
                        token_count=len(chunk.token_ids),
                        finish_reason=chunk.finish_reason,
                    )
                    if not streamed:
                        message.model = candidate.expert
                        outcome.first_token_at = now
                        trace.get_current_span().set_attribute(SpanAttributes.EXPERT, candidate.expert)
                        trace.get_current_span().set_attribute(SpanAttributes.REPLICA_ID, candidate.replica_id)
                        trace.get_current_span().set_attribute(SpanAttributes.ATTEMPT, attempt)
                    if chunk.HasField("usage"):
                        message.usage.CopyFrom(chunk.usage)
                        outcome.usage.CopyFrom(chunk.usage)
                    outcome.tokens += len(chunk.token_ids)
                    outcome.last_token_at = now
                    streamed = True
                    if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        outcome.finish_reason = chunk.finish_reason
                    yield message
                # Read the stream to its end (not `return` at the last message): the tracing
                # client interceptor ends the upstream call's span only when the stream is exhausted.
                if outcome.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    return
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() >= deadline - 0.01:
                    raise deadline_exceeded(
                        f"the request deadline passed while {candidate.expert} was generating"
                        + (f" ({outcome.tokens} tokens streamed)" if streamed else "")
                    ) from None
                if streamed:
                    outcome.finish_reason = common_pb2.FINISH_REASON_ERROR
                    raise unavailable(
                        f"replica {candidate.replica_id} of {candidate.expert} failed after {outcome.tokens} tokens "
                        f"({code.name}); the partial output cannot be resumed, retry the request",
                        reason="REPLICA_FAILED_MID_STREAM",
                    ) from None
                details = error_details(error)
                if not fails_over(code, details["reason"]):
                    raise _passthrough(error) from None
                metrics.FAILOVERS.labels(candidate.expert, code.name).inc()
                if details["reason"] == REPLICA_QUEUE_FULL:
                    busy.append(details["retry_after"] or 0.0)
                    failures.append(f"{candidate.replica_id} (queue full)")
                else:
                    failures.append(f"{candidate.replica_id} ({code.name})")
                log.warning(
                    "replica failed before the first token",
                    expert=candidate.expert,
                    replica_id=candidate.replica_id,
                    code=code.name,
                    attempt=attempt,
                )
                continue
            finally:
                if call is not None:
                    call.cancel()  # a no-op after a clean end; stops the replica on client cancel
                self._channels.release(candidate.address)
            # The stream closed with OK but without a finish reason: the replica broke its contract.
            if streamed:
                outcome.finish_reason = common_pb2.FINISH_REASON_ERROR
                raise unavailable(
                    f"replica {candidate.replica_id} ended the stream without a finish reason",
                    reason="REPLICA_STREAM_TRUNCATED",
                )
            failures.append(f"{candidate.replica_id} (empty stream)")
        outcome.finish_reason = common_pb2.FINISH_REASON_ERROR
        if busy and len(busy) == len(decision.candidates):
            raise resource_exhausted(
                f"all {len(busy)} candidate replicas have a full queue: " + ", ".join(failures) + "; retry later",
                retry_after_seconds=max(max(busy), 0.1),
                reason="ALL_REPLICAS_BUSY",
            )
        raise unavailable(
            f"all {len(decision.candidates)} candidate replicas failed before the first token: " + ", ".join(failures),
            reason="ALL_REPLICAS_FAILED",
        )

    def _finish(self, request_id: str, tenant: str, started: float, outcome: Outcome, span: trace.Span) -> None:
        """Record metrics and the span's outcome; send feedback to the router in the background."""
        now = time.monotonic()
        success = outcome.code == grpc.StatusCode.OK and outcome.finish_reason not in (
            common_pb2.FINISH_REASON_UNSPECIFIED,
            common_pb2.FINISH_REASON_ERROR,
            common_pb2.FINISH_REASON_CANCELLED,
        )
        expert = outcome.expert or "none"
        metrics.REQUESTS.labels(tenant, expert, outcome.code.name).inc()
        metrics.OUTPUT_TOKENS.labels(tenant, expert).inc(outcome.tokens)
        ttft = (outcome.first_token_at - started) if outcome.first_token_at is not None else 0.0
        if outcome.first_token_at is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(expert).observe(ttft)
            if outcome.tokens > 1 and outcome.last_token_at is not None:
                tpot = (outcome.last_token_at - outcome.first_token_at) / (outcome.tokens - 1)
                metrics.TIME_PER_OUTPUT_TOKEN.labels(expert).observe(tpot)
        span.set_attribute(SpanAttributes.GEN_AI_USAGE_INPUT_TOKENS, outcome.usage.prompt_tokens)
        span.set_attribute(SpanAttributes.GEN_AI_USAGE_OUTPUT_TOKENS, outcome.usage.completion_tokens)
        span.set_attribute(
            SpanAttributes.GEN_AI_RESPONSE_FINISH_REASONS, [enum_name(common_pb2.FinishReason, outcome.finish_reason)]
        )
        if ttft:
            span.set_attribute(SpanAttributes.TIME_TO_FIRST_TOKEN, ttft)
        log.info(
            "finished",
            expert=outcome.expert,
            replica_id=outcome.replica_id,
            code=outcome.code.name,
            finish_reason=enum_name(common_pb2.FinishReason, outcome.finish_reason),
            completion_tokens=outcome.usage.completion_tokens,
            seconds=round(now - started, 4),
        )
        if not outcome.replica_id:
            return  # never placed: nothing for the router or scheduler to learn
        feedback = router_pb2.FeedbackRequest(
            request_id=request_id,
            expert=outcome.expert,
            replica_id=outcome.replica_id,
            success=success,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
            time_to_first_token_seconds=ttft,
            latency_seconds=(outcome.last_token_at or now) - started,
        )
        task = asyncio.create_task(self._send_feedback(feedback))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_feedback(self, feedback: router_pb2.FeedbackRequest) -> None:
        try:
            await self._router.Feedback(feedback, timeout=FEEDBACK_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            log.warning("feedback failed", request_id=feedback.request_id, code=error.code().name)

    # -- RPCs ---------------------------------------------------------------------

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream the completion of a prompt."""
        async for message in self._stream(request, context):
            yield message

    async def Complete(
        self, request: gateway_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CompleteResponse:
        """The whole completion in one response."""
        reply = gateway_pb2.CompleteResponse()
        parts: list[str] = []
        async for message in self._stream(request, context):
            parts.append(message.text)
            reply.request_id = message.request_id
            if message.model:
                reply.model = message.model
            if message.finish_reason:
                reply.finish_reason = message.finish_reason
                reply.usage.CopyFrom(message.usage)
        reply.text = "".join(parts)
        return reply

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        """The expert pools with their ready replica counts."""
        self._authenticate(context)
        try:
            experts = await self._router.ListExperts(
                router_pb2.ListExpertsRequest(), timeout=self._settings.router_timeout_seconds
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and error_has_retry(error):
                raise _passthrough(error) from None
            raise unavailable(f"the router is unreachable ({error.code().name})", reason="ROUTER_UNAVAILABLE") from None
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelInfo(
                    name=e.name,
                    description=e.description,
                    ready_replicas=e.ready_replicas,
                    relative_cost=e.relative_cost,
                )
                for e in experts.experts
            ]
        )


def generator_requests(
    request_id: str, prompt: str, sampling: common_pb2.SamplingParams, decision: router_pb2.RouteResponse
) -> dict[str, generator_pb2.GeneratorGenerateRequest]:
    """The Generate request for each tokenizer fingerprint the candidates name ("" included).

    Every request carries the prompt text; a fingerprint with a tokenization in the router's answer
    adds its token ids, so a candidate's replica gets the ids its expert's tokenizer makes (one
    request per distinct tokenizer, shared by the candidates that name it). A fingerprint without a
    tokenization (a router that broke its contract) gets the text only.
    """
    ids = {t.tokenizer_fingerprint: t.token_ids for t in decision.tokenizations if t.tokenizer_fingerprint}
    requests: dict[str, generator_pb2.GeneratorGenerateRequest] = {}
    for fingerprint in ["", *(c.tokenizer_fingerprint for c in decision.candidates)]:
        if fingerprint in requests:
            continue
        request = generator_pb2.GeneratorGenerateRequest(request_id=request_id, prompt=prompt, sampling=sampling)
        if fingerprint in ids:
            request.prompt_token_ids.extend(ids[fingerprint])
            request.tokenizer_fingerprint = fingerprint
        requests[fingerprint] = request
    return requests


def error_has_retry(error: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE came from the peer's own logic (it carries RetryInfo) rather than transport."""
    return error_details(error)["retry_after"] is not None
