"""The Router gRPC service: a thin protobuf adapter over `RouterCore`.

Route, Feedback and ListExperts convert messages to the core's objects and back, and map the
core's exceptions to canonical statuses with rich details. Spans, logs and metrics of a decision
are written here from what the core returns.
"""

from __future__ import annotations

import grpc
from switchboard.common.enums import enum_name
from switchboard.common.errors import ServiceError, invalid_argument, not_found, unavailable
from switchboard.common.experts_config import ExpertSpec
from switchboard.common.logging import bind_request, get_logger
from switchboard.common.telemetry import SpanAttributes, get_tracer
from switchboard.router import metrics
from switchboard.router.config import RouterSettings
from switchboard.router.core import (
    NOT_IN_SCOPE,
    NoEligibleExpert,
    PlacementUnavailable,
    RequestTooLong,
    RouteInput,
    RouteOutput,
    RouterCore,
    SchedulerUnreachable,
    UnknownExpert,
)
from switchboard.router.decision_log import Outcome
from switchboard.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)
tracer = get_tracer(__name__)

MAX_COST_WEIGHT = 100.0
MAX_ALLOWED_EXPERTS = 64


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Routes requests to expert replicas and records their outcomes."""

    def __init__(
        self,
        experts: list[ExpertSpec],
        core: RouterCore,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        settings: RouterSettings,
    ) -> None:
        self._experts = {spec.name: spec for spec in experts}
        self._core = core
        self._scheduler = scheduler
        self._settings = settings
        self._shares = metrics.ShareTracker(list(self._experts))

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """A scheduler call deadline: our own bound, shortened by the caller's deadline."""
        remaining = context.time_remaining()
        bound = self._settings.scheduler_timeout_seconds
        return bound if remaining is None else max(0.01, min(bound, remaining))

    def _unavailable(self, message: str, reason: str) -> Exception:
        return unavailable(message, retry_after_seconds=self._settings.retry_after_seconds, reason=reason)

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        """Score experts, place the request with one scheduler call, return candidates best first."""
        if not request.prompt:
            raise invalid_argument("prompt", "must not be empty")
        if len(request.prompt) > self._settings.max_prompt_chars:
            raise invalid_argument(
                "prompt", f"at most {self._settings.max_prompt_chars} characters, got {len(request.prompt)}"
            )
        cost_weight = request.cost_weight if request.HasField("cost_weight") else None
        if cost_weight is not None and not 0.0 <= cost_weight <= MAX_COST_WEIGHT:
            raise invalid_argument("cost_weight", f"must be in [0, {MAX_COST_WEIGHT:g}], got {cost_weight}")
        if len(request.allowed_experts) > MAX_ALLOWED_EXPERTS:
            raise invalid_argument(
                "allowed_experts", f"at most {MAX_ALLOWED_EXPERTS} names, got {len(request.allowed_experts)}"
            )
        route = RouteInput(
            request_id=request.request_id,
            prompt=request.prompt,
            max_tokens=max(0, request.sampling.max_tokens),
            expert=request.expert,
            tenant=request.tenant,
            exclude_replica_ids=tuple(request.exclude_replica_ids),
            cost_weight=cost_weight,
            timeout_seconds=self._timeout(context),
            allowed_experts=tuple(request.allowed_experts[:MAX_ALLOWED_EXPERTS]),
            priority=request.priority,
        )
        with bind_request(request.request_id), tracer.start_as_current_span("router.route") as span:
            span.set_attribute(SpanAttributes.REQUEST_ID, request.request_id)
            try:
                with tracer.start_as_current_span("router.place"):
                    output = await self._core.route(route)
            except UnknownExpert as exc:
                raise not_found(str(exc), reason="EXPERT_NOT_FOUND") from None
            except RequestTooLong as exc:
                raise invalid_argument("prompt", str(exc)) from None
            except NoEligibleExpert as exc:
                if all(reason == NOT_IN_SCOPE for reason in exc.reasons.values()):
                    raise ServiceError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "none of the tenant's allowed experts is served here",
                        reason="NO_ALLOWED_EXPERT",
                    ) from None
                metrics.ROUTE_UNAVAILABLE.inc()
                log.warning("no eligible expert", reasons=exc.reasons)
                raise self._unavailable(f"no expert can serve this request now: {exc}", "NO_ELIGIBLE_EXPERT") from None
            except PlacementUnavailable as exc:
                metrics.ROUTE_UNAVAILABLE.inc()
                log.warning("no replica", error=str(exc))
                wanted = request.expert or "any expert"
                raise self._unavailable(
                    f"no healthy replica of {wanted}; try again shortly ({exc})", "NO_HEALTHY_REPLICA"
                ) from None
            except SchedulerUnreachable as exc:
                raise self._unavailable(f"scheduler unreachable ({exc})", "SCHEDULER_UNAVAILABLE") from None
            self._observe(output, span)
            return self._response(request.request_id, output)

    def _observe(self, output: RouteOutput, span: object) -> None:
        """Span attributes, metrics and the log line of one decision."""
        selection = output.selection
        primary = output.candidates[0]
        span.set_attribute(SpanAttributes.EXPERT, primary.expert)  # type: ignore[attr-defined]
        span.set_attribute(SpanAttributes.REPLICA_ID, primary.replica_id)  # type: ignore[attr-defined]
        attributes: dict[str, object] = {
            SpanAttributes.ROUTER_GATE_KIND: output.gate_kind,
            SpanAttributes.ROUTER_GATE_VERSION: output.gate_version,
            SpanAttributes.ROUTER_K: selection.k,
            SpanAttributes.ROUTER_COST_WEIGHT: selection.cost_weight,
            SpanAttributes.ROUTER_PROMPT_TOKENS: output.scores.prompt_tokens,
            SpanAttributes.ROUTER_EXPLORED: selection.explored,
        }
        for choice in selection.choices:
            attributes[SpanAttributes.ROUTER_SCORE_PREFIX + choice.expert] = choice.probability
            attributes[SpanAttributes.ROUTER_BIAS_PREFIX + choice.expert] = choice.bias
        span.set_attributes(attributes)  # type: ignore[attr-defined]
        metrics.ROUTE_DECISIONS.labels(primary.expert).inc()
        metrics.GATE_SCORE.labels(primary.expert).observe(selection.choice(primary.expert).probability)
        metrics.SELECTED_K.observe(selection.k)
        metrics.DECISION_SECONDS.observe(output.decision_seconds)
        if output.tokenizations:
            metrics.TOKENIZE_SECONDS.observe(output.tokenize_seconds)
        for candidate in output.candidates:
            if not candidate.tokenizer_fingerprint:
                metrics.UNTOKENIZED_CANDIDATES.labels(candidate.expert).inc()
        if selection.explored:
            metrics.EXPLORED.inc()
        self._shares.observe(primary.expert)
        log.info(
            "routed",
            expert=primary.expert,
            replica_id=primary.replica_id,
            candidates=len(output.candidates),
            selected=[c.expert for c in selection.choices if c.selected],
            k=selection.k,
            cost_weight=selection.cost_weight,
            decision_ms=round(output.decision_seconds * 1000, 3),
            tokenizations=len(output.tokenizations),
            tokenize_ms=round(output.tokenize_seconds * 1000, 3),
        )

    def _response(self, request_id: str, output: RouteOutput) -> router_pb2.RouteResponse:
        selection = output.selection
        return router_pb2.RouteResponse(
            request_id=request_id,
            candidates=[
                router_pb2.RouteCandidate(
                    expert=c.expert,
                    replica_id=c.replica_id,
                    address=c.address,
                    tokenizer_fingerprint=c.tokenizer_fingerprint,
                    revision=c.revision,
                )
                for c in output.candidates
            ],
            scores=[
                router_pb2.ExpertScore(
                    expert=c.expert,
                    score=c.probability,
                    selected=c.selected,
                    quality=c.quality,
                    bias=c.bias,
                    utility=c.utility,
                    eligible=c.eligible,
                    ineligible_reason=c.why_ineligible,
                    correction=c.correction,
                )
                for c in selection.choices
            ],
            k=selection.k,
            cost_weight=selection.cost_weight,
            gate_kind=output.gate_kind,
            gate_version=output.gate_version,
            prompt_tokens=output.scores.prompt_tokens,
            tokenizations=[
                router_pb2.PromptTokenization(tokenizer_fingerprint=t.fingerprint, token_ids=t.token_ids)
                for t in output.tokenizations
            ],
        )

    async def Feedback(
        self, request: router_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        """Record a request's outcome, learn from it, and forward its completion to the scheduler."""
        if not request.request_id:
            raise invalid_argument("request_id", "must not be empty")
        if request.expert not in self._experts:
            raise not_found(f"expert {request.expert!r} is not served here", reason="EXPERT_NOT_FOUND")
        reason = enum_name(common_pb2.FinishReason, request.finish_reason)  # a newer peer's value: unspecified
        metrics.FEEDBACK.labels(request.expert, str(request.success).lower(), reason).inc()
        if request.time_to_first_token_seconds > 0:
            metrics.TIME_TO_FIRST_TOKEN.labels(request.expert).observe(request.time_to_first_token_seconds)
        if request.latency_seconds > 0:
            metrics.REQUEST_LATENCY.labels(request.expert).observe(request.latency_seconds)
        metrics.COMPLETION_TOKENS.labels(request.expert).inc(request.usage.completion_tokens)
        with bind_request(request.request_id):
            outcome = Outcome(
                expert=request.expert,
                replica_id=request.replica_id,
                success=request.success,
                finish_reason=reason,
                prompt_tokens=request.usage.prompt_tokens,
                completion_tokens=request.usage.completion_tokens,
                time_to_first_token_seconds=max(0.0, request.time_to_first_token_seconds),
                latency_seconds=max(0.0, request.latency_seconds),
            )
            record = self._core.feedback(request.request_id, outcome)
            if record is None and not outcome.not_served:
                metrics.FEEDBACK_UNMATCHED.inc()
            elif record is not None and self._core.online is not None:
                metrics.ONLINE_UPDATES.inc()
            try:
                await self._scheduler.Complete(
                    scheduler_pb2.SchedulerCompleteRequest(
                        request_id=request.request_id,
                        replica_id=request.replica_id,
                        success=request.success,
                        finish_reason=request.finish_reason,
                        usage=request.usage,
                        time_to_first_token_seconds=request.time_to_first_token_seconds,
                        latency_seconds=request.latency_seconds,
                    ),
                    timeout=self._timeout(context),
                )
            except grpc.aio.AioRpcError as error:
                # The outcome is recorded here; the scheduler forgets stale placements by itself.
                log.warning("scheduler complete failed", code=error.code().name, error=error.details())
            log.info(
                "feedback",
                expert=request.expert,
                success=request.success,
                finish_reason=reason,
                reward=None if record is None else round(record.reward, 4),
            )
        return router_pb2.FeedbackResponse()

    async def ListExperts(
        self, request: router_pb2.ListExpertsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListExpertsResponse:
        """Every configured expert with its count of ready replicas."""
        try:
            cluster = await self._scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=self._timeout(context))
        except grpc.aio.AioRpcError as error:
            raise self._unavailable(
                f"scheduler unreachable ({error.code().name}): {error.details()}", "SCHEDULER_UNAVAILABLE"
            ) from None
        ready: dict[str, int] = {}
        for replica in cluster.replicas:
            if replica.state == scheduler_pb2.REPLICA_STATE_READY:
                ready[replica.expert] = ready.get(replica.expert, 0) + 1
        return router_pb2.ListExpertsResponse(
            experts=[
                router_pb2.ExpertInfo(
                    name=spec.name,
                    description=spec.description,
                    relative_cost=spec.relative_cost,
                    ready_replicas=ready.get(spec.name, 0),
                )
                for spec in self._experts.values()
            ]
        )
