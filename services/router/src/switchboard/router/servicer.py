"""The Router gRPC service: Route, Feedback and ListExperts.

Route scores every expert with the gate, orders the experts (the pinned one
only, when the client pinned a model), asks the scheduler for a replica of each
and returns the candidates best first: the primary replica, other replicas of
its expert, then replicas of the next experts, up to 1 + ROUTER_MAX_ALTERNATES.
"""

from __future__ import annotations

import grpc
from switchboard.common.errors import error_details, invalid_argument, not_found, unavailable
from switchboard.common.experts_config import ExpertSpec
from switchboard.common.logging import bind_request, get_logger
from switchboard.common.telemetry import SpanAttributes, get_tracer
from switchboard.router import metrics
from switchboard.router.config import RouterSettings
from switchboard.router.gate import Gate, select
from switchboard.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)
tracer = get_tracer(__name__)

# Scheduler answers that mean "this expert has nothing to offer now", not "the scheduler is broken".
_NO_REPLICA_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _candidate(expert: str, replica: scheduler_pb2.Replica) -> router_pb2.RouteCandidate:
    return router_pb2.RouteCandidate(expert=expert, replica_id=replica.replica_id, address=replica.address)


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Routes requests to expert replicas and records their outcomes."""

    def __init__(
        self,
        experts: list[ExpertSpec],
        gate: Gate,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        settings: RouterSettings,
    ) -> None:
        self._experts = {spec.name: spec for spec in experts}
        self._gate = gate
        self._scheduler = scheduler
        self._settings = settings

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The scheduler call deadline: our own bound, shortened by the caller's deadline."""
        remaining = context.time_remaining()
        bound = self._settings.scheduler_timeout_seconds
        return bound if remaining is None else max(0.01, min(bound, remaining))

    async def _place(
        self, expert: str, request: router_pb2.RouteRequest, call_timeout: float
    ) -> tuple[list[router_pb2.RouteCandidate], str | None]:
        """Candidates of one expert (chosen replica first), or ([], why not)."""
        place = scheduler_pb2.PlaceRequest(
            request_id=request.request_id,
            expert=expert,
            prompt_tokens=max(1, len(request.prompt) // 4),
            max_tokens=max(0, request.sampling.max_tokens),
            exclude_replica_ids=list(request.exclude_replica_ids),
            max_alternates=self._settings.max_alternates,
        )
        try:
            reply = await self._scheduler.Place(place, timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            # A scheduler answer carries rich details (RetryInfo); a transport failure
            # (scheduler down) is a bare UNAVAILABLE and must not read as "no replica".
            answered = error_details(error)["retry_after"] is not None or error.code() != grpc.StatusCode.UNAVAILABLE
            if answered and error.code() in _NO_REPLICA_CODES:
                return [], f"{expert}: {error.code().name} {error.details()}"
            raise
        return [_candidate(expert, reply.replica)] + [_candidate(expert, alt) for alt in reply.alternates], None

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        """Score experts, place the request, return candidates best first."""
        if not request.prompt:
            raise invalid_argument("prompt", "must not be empty")
        if request.expert and request.expert not in self._experts:
            known = ", ".join(self._experts)
            raise not_found(f"expert {request.expert!r} is not served here; known experts: {known}", reason="EXPERT_NOT_FOUND")
        with bind_request(request.request_id), tracer.start_as_current_span("router.route") as span:
            span.set_attribute(SpanAttributes.REQUEST_ID, request.request_id)
            scores = self._gate.score(request.prompt)
            selection = select(
                scores, relative_threshold=self._settings.relative_threshold, max_k=self._settings.max_k
            )
            order = [request.expert] if request.expert else list(selection.ranked)
            selected = {request.expert} if request.expert else set(selection.selected)
            timeout = self._timeout(context)
            # Place the least preferred expert first: the scheduler counts a request
            # as in flight on the replica of its *last* Place, which must be the primary.
            placed: dict[str, list[router_pb2.RouteCandidate]] = {}
            reasons: list[str] = []
            with tracer.start_as_current_span("router.place"):
                for expert in reversed(order):
                    try:
                        found, why = await self._place(expert, request, timeout)
                    except grpc.aio.AioRpcError as error:
                        raise unavailable(
                            f"scheduler unreachable ({error.code().name}): {error.details()}",
                            retry_after_seconds=self._settings.retry_after_seconds,
                            reason="SCHEDULER_UNAVAILABLE",
                        ) from None
                    if found:
                        placed[expert] = found
                    elif why:
                        reasons.append(why)
            candidates = [c for expert in order for c in placed.get(expert, [])][: 1 + self._settings.max_alternates]
            if not candidates:
                metrics.ROUTE_UNAVAILABLE.inc()
                wanted = request.expert or ", ".join(order)
                log.warning("no replica", experts=order, reasons=list(reversed(reasons)))
                raise unavailable(
                    f"no healthy replica of expert {wanted}; try again shortly",
                    retry_after_seconds=self._settings.retry_after_seconds,
                    reason="NO_HEALTHY_REPLICA",
                )
            primary = candidates[0]
            span.set_attribute(SpanAttributes.EXPERT, primary.expert)
            span.set_attribute(SpanAttributes.REPLICA_ID, primary.replica_id)
            metrics.ROUTE_DECISIONS.labels(primary.expert).inc()
            metrics.GATE_SCORE.labels(primary.expert).observe(scores.get(primary.expert, 0.0))
            log.info(
                "routed",
                expert=primary.expert,
                replica_id=primary.replica_id,
                candidates=len(candidates),
                selected=sorted(selected),
            )
            return router_pb2.RouteResponse(
                request_id=request.request_id,
                candidates=candidates,
                scores=[
                    router_pb2.ExpertScore(expert=name, score=scores[name], selected=name in selected)
                    for name in self._experts
                ],
            )

    async def Feedback(
        self, request: router_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        """Record a request's outcome and forward its completion to the scheduler."""
        if not request.request_id:
            raise invalid_argument("request_id", "must not be empty")
        if request.expert not in self._experts:
            raise not_found(f"expert {request.expert!r} is not served here", reason="EXPERT_NOT_FOUND")
        reason = common_pb2.FinishReason.Name(request.finish_reason)
        metrics.FEEDBACK.labels(request.expert, str(request.success).lower(), reason).inc()
        if request.time_to_first_token_seconds > 0:
            metrics.TIME_TO_FIRST_TOKEN.labels(request.expert).observe(request.time_to_first_token_seconds)
        if request.latency_seconds > 0:
            metrics.REQUEST_LATENCY.labels(request.expert).observe(request.latency_seconds)
        metrics.COMPLETION_TOKENS.labels(request.expert).inc(request.usage.completion_tokens)
        with bind_request(request.request_id):
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
            log.info("feedback", expert=request.expert, success=request.success, finish_reason=reason)
        return router_pb2.FeedbackResponse()

    async def ListExperts(
        self, request: router_pb2.ListExpertsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListExpertsResponse:
        """Every configured expert with its count of ready replicas."""
        try:
            cluster = await self._scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=self._timeout(context))
        except grpc.aio.AioRpcError as error:
            raise unavailable(
                f"scheduler unreachable ({error.code().name}): {error.details()}",
                retry_after_seconds=self._settings.retry_after_seconds,
                reason="SCHEDULER_UNAVAILABLE",
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
