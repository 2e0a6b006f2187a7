"""The gateway's transport-free core: one request pipeline shared by the gRPC API and the HTTP front.

`GatewayCore.generate(principal, request, deadline)` runs a request for an authenticated caller:

1. **validate**: every bad field named (INVALID_ARGUMENT), the tenant's output-token limit too;
2. **scope**: a pinned model the tenant may not use is PERMISSION_DENIED; an unpinned request is
   routed among the experts its scopes allow;
3. **limits**: the tenant's request and token rates, concurrent streams and monthly budget
   (`TenantLimiter`, state in Redis or in process), RESOURCE_EXHAUSTED with RetryInfo and
   QuotaFailure when one is spent;
4. **admission**: a bounded queue with priority bands and fair sharing between tenants
   (`AdmissionController`); under overload low-priority work is shed first;
5. **route**: the router picks the candidates (with the tenant's priority and allowed experts);
   the exact prompt token count it returns is checked against the tenant's prompt limit and settles
   the token bucket;
6. **stream** from the first candidate, failing over before the first token; a deterministic request
   whose answer the response cache holds (`response_cache.py`) streams it from there instead;
7. **account**: output tokens charged as they stream and settled at the end, usage metered per
   tenant and expert, one audit line, feedback to the router off the response path.

It yields `GenerateResponse` messages (the contract's own data type) and raises `ServiceError`;
the gRPC servicer and the HTTP front only translate requests, deadlines and errors.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from switchboard.common.channels import open_channel
from switchboard.common.enums import enum_name
from switchboard.common.errors import (
    REPLICA_QUEUE_FULL,
    REQUEST_FAILED_IN_ENGINE,
    ServiceError,
    error_details,
    invalid_argument,
    resource_exhausted,
    unavailable,
)
from switchboard.common.logging import bind_request, get_logger
from switchboard.common.telemetry import SpanAttributes
from switchboard.gateway import metrics
from switchboard.gateway import response_cache as cache_metrics
from switchboard.gateway.admission import AdmissionController, AdmissionRejected, AdmissionTimeout
from switchboard.gateway.channels import ChannelPool
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.limiter import Admission, LimitExceeded, LimitKind, TenantLimiter
from switchboard.gateway.limitstore import LimitStoreUnavailable
from switchboard.gateway.metering import UsageMeter
from switchboard.gateway.prices import PriceBook
from switchboard.gateway.principal import Principal, Priority
from switchboard.gateway.response_cache import (
    CachedAnswer,
    CorruptEntry,
    ResponseCache,
    cache_key,
    decode_entry,
    encode_entry,
    is_deterministic,
    namespace_for,
)
from switchboard.gateway.tenants import TenantDirectory
from switchboard.gateway.validation import FieldError, Limits, validate_request
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
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
# Reasons that describe the request even under a failover code: the replica's engine traced a
# failed step to this request and served on (INTERNAL, REQUEST_FAILED_IN_ENGINE), so the next
# replica would fail it the same way (and its batch with it). It goes back to the client as is.
NO_FAILOVER_REASONS = frozenset({REQUEST_FAILED_IN_ENGINE})


def fails_over(code: grpc.StatusCode, reason: str | None) -> bool:
    """Whether a replica's error before its first token is a reason to try the next candidate."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return reason in FAILOVER_RESOURCE_REASONS
    if reason in NO_FAILOVER_REASONS:
        return False
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
    revision: str = ""  # of the expert, as the replica that streamed registered it (prices, cache keys)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    text: list[str] | None = None  # the output, kept only when GATEWAY_LOG_TEXT is on
    cached: bool = False  # served from the response cache (the placed replica never ran it)


PROTO_PRIORITY = {
    Priority.LOW: common_pb2.PRIORITY_LOW,
    Priority.NORMAL: common_pb2.PRIORITY_NORMAL,
    Priority.HIGH: common_pb2.PRIORITY_HIGH,
}
# The gateway has no tokenizer: before the router's exact count, a prompt is sized at one token per
# CHARS_PER_TOKEN characters (the router's own estimate), then settled to the exact count.
CHARS_PER_TOKEN = 4
STREAM_RETRY_SECONDS = 1.0


def estimate_prompt_tokens(prompt: str) -> int:
    """The prompt's token count before the router has counted it exactly."""
    return max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))


def permission_denied(message: str, reason: str) -> ServiceError:
    """PERMISSION_DENIED: the caller is known but its scopes do not allow this."""
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, reason=reason)


def limit_error(error: LimitExceeded) -> ServiceError:
    """A tenant limit refusal as the caller sees it.

    Rates, streams and the budget say when to retry (RESOURCE_EXHAUSTED, RetryInfo, QuotaFailure
    naming the limit); a request larger than the tenant may ever send is INVALID_ARGUMENT, since
    retrying cannot help.
    """
    if error.kind is LimitKind.TOO_LARGE:
        field_name = "prompt" if error.limit == "max_prompt_tokens" else "sampling.max_tokens"
        return invalid_argument(field_name, error.message)
    return resource_exhausted(
        error.message,
        # A stream slot frees when one of the tenant's streams ends, which nobody can know: retry soon.
        retry_after_seconds=error.retry_after_seconds if error.retry_after_seconds is not None else STREAM_RETRY_SECONDS,
        reason="TENANT_LIMIT_EXCEEDED",
        quota_violations=[(error.quota_subject, f"{error.limit}: {error.message}")],
        metadata={"limit": error.limit},
    )


class GatewayCore:
    """Validates, admits, routes, streams and accounts requests for authenticated principals."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: router_pb2_grpc.RouterStub,
        limiter: TenantLimiter,
        admission: AdmissionController,
        meter: UsageMeter,
        tenants: TenantDirectory,
        cache: ResponseCache | None = None,
        prices: PriceBook | None = None,
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._prices = prices or PriceBook(None)
        self._tenants = tenants
        self._router = router
        self._limiter = limiter
        self._admission = admission
        self._meter = meter
        self._limits = Limits(
            max_prompt_chars=settings.max_prompt_chars,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
        )
        tls = settings.server.tls
        self._channels = ChannelPool(
            settings.channel_idle_seconds, open_=lambda address: open_channel(address, tls, peer_role="generator")
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def meter(self) -> UsageMeter:
        """Usage by tenant and expert."""
        return self._meter

    async def close(self) -> None:
        """Wait for pending feedback and close the replica channels (on drain)."""
        if self._background:
            await asyncio.wait(self._background, timeout=FEEDBACK_TIMEOUT_SECONDS + 1)
        await self._channels.close()

    # -- the request path -----------------------------------------------------------

    def _validate(
        self, principal: Principal, request: gateway_pb2.GenerateRequest | gateway_pb2.CompleteRequest
    ) -> common_pb2.SamplingParams:
        try:
            cost_weight = request.cost_weight if request.HasField("cost_weight") else None
            sampling = validate_request(
                request.prompt, request.sampling, request.model, request.request_id, self._limits, cost_weight
            )
        except FieldError as error:
            raise invalid_argument(error.field, error.message) from None
        max_output = principal.limits.max_output_tokens
        if max_output is not None and sampling.max_tokens > max_output:
            raise invalid_argument(
                "sampling.max_tokens",
                f"at most {max_output} for tenant {principal.tenant}, got {sampling.max_tokens}",
            )
        if request.model and not principal.may_use(request.model):
            raise permission_denied(
                f"tenant {principal.tenant} may not use model {request.model!r}; ask for a scope experts:{request.model}",
                reason="MODEL_NOT_ALLOWED",
            )
        return sampling

    async def _admit_limits(
        self, principal: Principal, request_id: str, prompt: str, sampling: common_pb2.SamplingParams
    ) -> Admission:
        try:
            return await self._limiter.admit(
                principal,
                request_id=request_id,
                prompt_tokens=estimate_prompt_tokens(prompt),
                max_output_tokens=sampling.max_tokens,
                prompt_exact=False,
            )
        except LimitExceeded as error:
            metrics.LIMIT_REFUSALS.labels(principal.tenant, error.limit).inc()
            raise limit_error(error) from None
        except LimitStoreUnavailable:
            metrics.LIMIT_REFUSALS.labels(principal.tenant, "limit_store_unavailable").inc()
            raise unavailable(
                "the gateway cannot check this tenant's limits right now (its limits store is unreachable); retry",
                reason="LIMITS_UNAVAILABLE",
                retry_after_seconds=1.0,
            ) from None

    async def generate(
        self,
        principal: Principal,
        request: gateway_pb2.GenerateRequest | gateway_pb2.CompleteRequest,
        deadline: float,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Run one request for `principal` until `deadline` (time.monotonic()); yields its stream."""
        started = time.monotonic()
        sampling = self._validate(principal, request)
        request_id = request.request_id or uuid.uuid4().hex
        tenant = principal.tenant
        span = trace.get_current_span()
        span.set_attribute(SpanAttributes.REQUEST_ID, request_id)
        span.set_attribute(SpanAttributes.TENANT, tenant)
        span.set_attribute(SpanAttributes.PRIORITY, enum_name(common_pb2.Priority, PROTO_PRIORITY[principal.priority]))
        span.set_attribute(SpanAttributes.GEN_AI_REQUEST_MAX_TOKENS, sampling.max_tokens)
        if sampling.HasField("temperature"):
            span.set_attribute(SpanAttributes.GEN_AI_REQUEST_TEMPERATURE, sampling.temperature)
        outcome = Outcome(text=[] if self._settings.log_text else None)
        with bind_request(request_id, tenant=tenant):
            log.info("request", prompt_chars=len(request.prompt), max_tokens=sampling.max_tokens, model=request.model)
            limits: Admission | None = None
            try:
                limits = await self._admit_limits(principal, request_id, request.prompt, sampling)
                cost = estimate_prompt_tokens(request.prompt) + sampling.max_tokens
                async with self._admission.admit(tenant, principal.priority, cost, deadline):
                    decision = await self._route(request_id, request, sampling, principal, deadline)
                    outcome.prompt_tokens = decision.prompt_tokens
                    await self._settle_prompt(principal, limits, decision, outcome)
                    # -- response cache: looked up after routing, keyed on the chosen expert --------
                    cacheable = self._cache is not None and bool(decision.candidates)
                    if cacheable and not is_deterministic(sampling):
                        cacheable = False
                        cache_metrics.REQUESTS.labels("skip").inc()
                    answer = (
                        await self._cache_get(self._key(principal, request.prompt, sampling, decision, 0))
                        if cacheable
                        else None
                    )
                    if answer is not None:
                        async for message in self._replay(request_id, answer, decision, deadline, outcome, limits):
                            yield message
                        return
                    recorded: list[gateway_pb2.GenerateResponse] = []
                    # -- end of the response cache's lookup ---------------------------------------
                    async for message in self._attempts(
                        request_id, request.prompt, sampling, decision, deadline, outcome, limits
                    ):
                        if cacheable:
                            recorded.append(message)
                        yield message
                    if cacheable:
                        await self._cache_put(principal, request.prompt, sampling, decision, outcome, recorded)
            except ServiceError as error:
                outcome.code = error.code
                raise
            except AdmissionRejected as error:
                outcome.code = grpc.StatusCode.RESOURCE_EXHAUSTED
                metrics.LIMIT_REFUSALS.labels(tenant, "admission").inc()
                raise resource_exhausted(
                    error.message, retry_after_seconds=error.retry_after_seconds, reason=error.reason
                ) from None
            except AdmissionTimeout:
                outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED
                raise deadline_exceeded("the request deadline passed while it waited for admission") from None
            except asyncio.CancelledError:
                outcome.code = grpc.StatusCode.CANCELLED
                outcome.finish_reason = common_pb2.FINISH_REASON_CANCELLED
                raise
            finally:
                if limits is not None:
                    await limits.finish(outcome.tokens)
                self._finish(request_id, principal, started, outcome, span, request.prompt)

    # -- the response cache (response_cache.py) --------------------------------------

    def _key(
        self,
        principal: Principal,
        prompt: str,
        sampling: common_pb2.SamplingParams,
        decision: router_pb2.RouteResponse,
        index: int,
    ) -> str:
        """The cache key of this request as candidate `index` (its expert and tokenizer) would serve it."""
        candidate = decision.candidates[index]
        ids = next(
            (t.token_ids for t in decision.tokenizations if t.tokenizer_fingerprint == candidate.tokenizer_fingerprint),
            (),
        )
        return cache_key(
            namespace_for(principal.tenant, principal.share_cache),
            candidate.expert,
            candidate.tokenizer_fingerprint,
            ids if candidate.tokenizer_fingerprint else (),
            prompt,
            sampling,
            revision=candidate.revision,
        )

    async def _cache_get(self, key: str) -> CachedAnswer | None:
        """The cached answer, or None: a miss, and also a store that failed or an unreadable entry."""
        assert self._cache is not None
        try:
            data = await self._cache.get(key)
        except Exception as error:  # a cache failure is a miss, never a failed request
            cache_metrics.REQUESTS.labels("error").inc()
            log.warning("response cache lookup failed; serving from a replica", error=str(error))
            return None
        if data is None:
            cache_metrics.REQUESTS.labels("miss").inc()
            return None
        try:
            answer = decode_entry(data)
        except CorruptEntry as error:
            cache_metrics.REQUESTS.labels("corrupt").inc()
            log.warning("unreadable response cache entry; serving from a replica", error=str(error))
            return None
        cache_metrics.REQUESTS.labels("hit").inc()
        return answer

    async def _cache_put(
        self,
        principal: Principal,
        prompt: str,
        sampling: common_pb2.SamplingParams,
        decision: router_pb2.RouteResponse,
        outcome: Outcome,
        messages: list[gateway_pb2.GenerateResponse],
    ) -> None:
        """Store an answer that finished normally, under the key of the candidate that served it."""
        assert self._cache is not None
        if outcome.finish_reason in (
            common_pb2.FINISH_REASON_UNSPECIFIED,
            common_pb2.FINISH_REASON_ERROR,
            common_pb2.FINISH_REASON_CANCELLED,
        ) or not messages:
            return
        index = next((i for i, c in enumerate(decision.candidates) if c.replica_id == outcome.replica_id), None)
        if index is None:
            return
        stored = []
        for message in messages:
            copy = gateway_pb2.GenerateResponse()
            copy.CopyFrom(message)
            copy.ClearField("request_id")
            stored.append(copy)
        entry = encode_entry(outcome.expert, stored)
        try:
            if await self._cache.put(self._key(principal, prompt, sampling, decision, index), entry):
                cache_metrics.STORED.inc()
                cache_metrics.STORED_BYTES.inc(len(entry))
        except Exception as error:  # a cache failure never fails a request
            cache_metrics.REQUESTS.labels("error").inc()
            log.warning("response cache store failed", error=str(error))

    async def _replay(
        self,
        request_id: str,
        answer: CachedAnswer,
        decision: router_pb2.RouteResponse,
        deadline: float,
        outcome: Outcome,
        limits: Admission,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream a cached answer in the shapes a replica's stream has; its tokens count as usage."""
        outcome.expert, outcome.replica_id, outcome.cached = answer.expert, decision.candidates[0].replica_id, True
        outcome.revision = decision.candidates[0].revision  # the key named it
        # A cached answer is usage like any other (as for the token budget): priced at its expert's price.
        limits.set_price(self._prices.price(answer.expert, outcome.revision))
        trace.get_current_span().set_attribute(SpanAttributes.EXPERT, answer.expert)
        for index, cached in enumerate(answer.messages):
            if time.monotonic() >= deadline:
                raise deadline_exceeded("the request deadline passed while the cached answer streamed")
            now = time.monotonic()
            message = gateway_pb2.GenerateResponse()
            message.CopyFrom(cached)
            message.request_id = request_id
            if index == 0:
                message.model = answer.expert
                outcome.first_token_at = now
            if message.HasField("usage") or message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                message.usage.cached = True
                message.usage.replica_seconds = 0.0  # no replica ran it (the stored one is the first answer's)
                outcome.usage.CopyFrom(message.usage)
            outcome.tokens += message.token_count
            outcome.last_token_at = now
            if outcome.text is not None:
                outcome.text.append(message.text)
            await limits.charge_output(message.token_count)
            if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                outcome.finish_reason = message.finish_reason
                await limits.finish(outcome.tokens)
            yield message

    async def _settle_prompt(
        self, principal: Principal, limits: Admission, decision: router_pb2.RouteResponse, outcome: Outcome
    ) -> None:
        """Check the exact prompt count against the tenant's limit; charge it instead of the estimate.

        A refusal here comes after the router placed the request: the outcome names the placement
        so the feedback (cancelled, never started) releases it on the scheduler.
        """
        try:
            await limits.settle_prompt(decision.prompt_tokens)
        except LimitExceeded as error:
            await limits.refund()
            outcome.finish_reason = common_pb2.FINISH_REASON_CANCELLED
            if decision.candidates:
                outcome.expert, outcome.replica_id = decision.candidates[0].expert, decision.candidates[0].replica_id
            metrics.LIMIT_REFUSALS.labels(principal.tenant, error.limit).inc()
            raise limit_error(error) from None

    async def _route(
        self,
        request_id: str,
        request: gateway_pb2.GenerateRequest | gateway_pb2.CompleteRequest,
        sampling: common_pb2.SamplingParams,
        principal: Principal,
        deadline: float,
    ) -> router_pb2.RouteResponse:
        timeout = min(self._settings.router_timeout_seconds, deadline - time.monotonic())
        if timeout <= 0:
            raise deadline_exceeded("the request deadline passed before routing")
        allowed = principal.allowed_experts()
        if allowed is not None and not allowed:
            raise permission_denied(f"tenant {principal.tenant} may use no expert", reason="MODEL_NOT_ALLOWED")
        try:
            return await self._router.Route(
                router_pb2.RouteRequest(
                    request_id=request_id,
                    prompt=request.prompt,
                    sampling=sampling,
                    expert=request.model,
                    tenant=principal.tenant,
                    cost_weight=request.cost_weight if request.HasField("cost_weight") else None,
                    priority=PROTO_PRIORITY[principal.priority],
                    allowed_experts=sorted(allowed or ()),
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

    async def _attempts(
        self,
        request_id: str,
        prompt: str,
        sampling: common_pb2.SamplingParams,
        decision: router_pb2.RouteResponse,
        deadline: float,
        outcome: Outcome,
        limits: Admission,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Try the candidates in order until one streams its first token; output tokens are charged as they stream."""
        failures: list[str] = []
        busy: list[float] = []  # RetryInfo delays of the candidates that refused with a full queue
        upstream = generator_requests(request_id, prompt, sampling, decision)
        for attempt, candidate in enumerate(decision.candidates):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise deadline_exceeded("the request deadline passed before a replica answered")
            outcome.expert, outcome.replica_id, outcome.revision = candidate.expert, candidate.replica_id, candidate.revision
            upstream_request = upstream[candidate.tokenizer_fingerprint]
            # The lease keeps the pooled channel open until this attempt's call has ended.
            channel = self._channels.acquire(candidate.address)
            call: grpc.aio.UnaryStreamCall | None = None
            streamed = False
            try:
                call = generator_pb2_grpc.GeneratorStub(channel).Generate(upstream_request, timeout=remaining)
                chunks = call.__aiter__()
                try:
                    # The last candidate gets the whole deadline: there is no one left to try, and a
                    # replica with a deep queue (a flood pinned to one pool) is busy, not hung.
                    last = attempt == len(decision.candidates) - 1
                    first = await self._first_chunk(chunks, remaining, budgeted=not last)
                except TimeoutError:
                    if time.monotonic() >= deadline - 0.01:
                        raise deadline_exceeded(
                            f"the request deadline passed before {candidate.expert} sent its first token"
                        ) from None
                    # A hung replica must not eat the whole deadline: the next candidate gets the rest.
                    metrics.FAILOVERS.labels(candidate.expert, "FIRST_TOKEN_TIMEOUT").inc()
                    failures.append(f"{candidate.replica_id} (no first token in {self._settings.attempt_first_token_seconds:g} s)")
                    log.warning("replica sent no first token in time", expert=candidate.expert, replica_id=candidate.replica_id)
                    continue
                async for chunk in _prepend(first, chunks):
                    now = time.monotonic()
                    count = len(chunk.token_ids)
                    if chunk.HasField("usage") and chunk.usage.completion_tokens > outcome.tokens + count:
                        # A replica that streams no token ids (a remote engine's text-only API) states
                        # the count in its final usage: the tokens not yet counted are charged here.
                        count = chunk.usage.completion_tokens - outcome.tokens
                    message = gateway_pb2.GenerateResponse(
                        request_id=request_id,
                        text=chunk.text,
                        token_count=count,
                        finish_reason=chunk.finish_reason,
                    )
                    if not streamed:
                        message.model = candidate.expert
                        outcome.first_token_at = now
                        # The expert that streams is the one that is paid for (not a failed candidate).
                        limits.set_price(self._prices.price(candidate.expert, outcome.revision))
                        trace.get_current_span().set_attribute(SpanAttributes.EXPERT, candidate.expert)
                        trace.get_current_span().set_attribute(SpanAttributes.REPLICA_ID, candidate.replica_id)
                        trace.get_current_span().set_attribute(SpanAttributes.ATTEMPT, attempt)
                    if chunk.HasField("usage"):
                        message.usage.CopyFrom(chunk.usage)
                        outcome.usage.CopyFrom(chunk.usage)
                    outcome.tokens += count
                    outcome.last_token_at = now
                    if outcome.text is not None:
                        outcome.text.append(chunk.text)
                    await limits.charge_output(count)
                    streamed = True
                    if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        outcome.finish_reason = chunk.finish_reason
                        # Settle and free the stream slot before the last message goes out: a client that
                        # sends its next request as soon as this one ends must find the slot free.
                        await limits.finish(outcome.tokens, outcome.usage.replica_seconds)
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
                    if error_details(error)["reason"] in NO_FAILOVER_REASONS:
                        raise _passthrough(error) from None  # the request broke the engine: retrying will too
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

    async def _first_chunk(
        self, chunks: AsyncIterator[generator_pb2.GeneratorGenerateResponse], remaining: float, budgeted: bool
    ) -> generator_pb2.GeneratorGenerateResponse | None:
        """The stream's first message within the attempt's first-token budget (None: it ended empty);
        TimeoutError past the budget (or the request's deadline, if sooner)."""
        budget = self._settings.attempt_first_token_seconds if budgeted else 0.0
        try:
            # asyncio.timeout, not wait_for: wait_for runs the read in a task of its own, one more
            # trip through the event loop on every request's critical path.
            async with asyncio.timeout(min(budget, remaining) if budget else remaining):
                return await anext(chunks)
        except StopAsyncIteration:
            return None

    def _finish(
        self, request_id: str, principal: Principal, started: float, outcome: Outcome, span: trace.Span, prompt: str
    ) -> None:
        """Meter usage, record metrics, the span and the audit line; send feedback to the router in the background."""
        now = time.monotonic()
        tenant = principal.tenant
        success = outcome.code == grpc.StatusCode.OK and outcome.finish_reason not in (
            common_pb2.FINISH_REASON_UNSPECIFIED,
            common_pb2.FINISH_REASON_ERROR,
            common_pb2.FINISH_REASON_CANCELLED,
        )
        expert = outcome.expert or "none"
        prompt_tokens = outcome.usage.prompt_tokens or (outcome.prompt_tokens if outcome.first_token_at else 0)
        metrics.REQUESTS.labels(tenant, expert, outcome.code.name).inc()
        metrics.OUTPUT_TOKENS.labels(tenant, expert).inc(outcome.tokens)
        if outcome.first_token_at is not None:
            cost = self._prices.price(expert, outcome.revision).cost(
                prompt_tokens, outcome.tokens, outcome.usage.replica_seconds
            )
            self._meter.record(tenant, expert, prompt_tokens, outcome.tokens, cost)
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
        # The audit line: one per request (the trace id is added by the logger). The prompt and output only
        # when the operator opted in, and then through the logging chain's redaction filter.
        text = {"prompt": prompt, "output": "".join(outcome.text)} if outcome.text is not None else {}
        log.info(
            "audit",
            **text,
            tenant=tenant,
            key_id=principal.key_id,
            priority=principal.priority.name.lower(),
            expert=outcome.expert,
            replica_id=outcome.replica_id,
            code=outcome.code.name,
            finish_reason=enum_name(common_pb2.FinishReason, outcome.finish_reason),
            prompt_tokens=prompt_tokens,
            completion_tokens=outcome.tokens,
            seconds=round(now - started, 4),
            cached=outcome.cached,
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
        if outcome.cached:
            # Served from the response cache: the placed replica never ran it. The feedback says so
            # (cancelled, never started, as for a request refused after placement) to free the placement.
            feedback = router_pb2.FeedbackRequest(
                request_id=request_id,
                expert=outcome.expert,
                replica_id=outcome.replica_id,
                success=False,
                finish_reason=common_pb2.FINISH_REASON_CANCELLED,
            )
        task = asyncio.create_task(self._send_feedback(feedback))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_feedback(self, feedback: router_pb2.FeedbackRequest) -> None:
        try:
            await self._router.Feedback(feedback, timeout=FEEDBACK_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            log.warning("feedback failed", request_id=feedback.request_id, code=error.code().name)

    # -- the other calls ------------------------------------------------------------

    async def list_models(self, principal: Principal) -> gateway_pb2.ListModelsResponse:
        """The expert pools the principal may use, with their ready replica counts."""
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
                if principal.may_use(e.name)
            ]
        )

    async def usage(self, principal: Principal, tenant: str) -> gateway_pb2.UsageResponse:
        """Usage by tenant and expert; other tenants' only with the admin scope."""
        if tenant and tenant != principal.tenant and not principal.is_admin:
            raise permission_denied(
                f"only an admin may read another tenant's usage; tenant {principal.tenant} has no admin scope",
                reason="ADMIN_SCOPE_REQUIRED",
            )
        selected = tenant or (None if principal.is_admin else principal.tenant)
        month, rows = await self._meter.report(
            selected, self._month_tokens, self._budget, self._month_cost, self._cost_budget
        )
        return gateway_pb2.UsageResponse(month=month, usage=rows, currency=self._prices.table.currency)

    async def _month_tokens(self, tenant: str) -> int:
        try:
            return await self._limiter.month_tokens(tenant)
        except LimitStoreUnavailable:
            raise unavailable("usage totals are unavailable (the limits store is unreachable); retry") from None

    async def _month_cost(self, tenant: str) -> float:
        try:
            return await self._limiter.month_cost(tenant)
        except LimitStoreUnavailable:
            raise unavailable("usage totals are unavailable (the limits store is unreachable); retry") from None

    def _cost_budget(self, tenant: str) -> float | None:
        principal = self._tenants.tenant(tenant)
        return principal.limits.monthly_cost_budget if principal is not None else None

    def _budget(self, tenant: str) -> int | None:
        principal = self._tenants.tenant(tenant)
        return principal.limits.monthly_token_budget if principal is not None else None


async def _prepend(
    first: generator_pb2.GeneratorGenerateResponse | None,
    rest: AsyncIterator[generator_pb2.GeneratorGenerateResponse],
) -> AsyncIterator[generator_pb2.GeneratorGenerateResponse]:
    """`first` (when the stream had one) then the rest of the same stream."""
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk


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
