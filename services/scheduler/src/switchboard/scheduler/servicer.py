"""The `switchboard.v1.Scheduler` RPC handlers: validation, proto conversion, and calls into the registry.

`Place` is a thin adapter over `placement.Placer` (the placement logic, with no gRPC import). The
handlers raise `switchboard.common.errors` exceptions; the shared server's interceptor turns them
into canonical gRPC statuses with rich details (BadRequest, RetryInfo, ErrorInfo).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from pathlib import Path

import grpc
from switchboard.common.channels import open_channel
from switchboard.common.enums import enum_name
from switchboard.common.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    unavailable,
)
from switchboard.common.experts_config import ExpertSLO
from switchboard.common.logging import get_logger
from switchboard.common.outcomes import never_served
from switchboard.common.telemetry import SpanAttributes, get_tracer
from switchboard.common.tls import TlsIdentity, peer_identity
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler import metrics
from switchboard.scheduler.actuators import ActuatorError
from switchboard.scheduler.ownership import NotYourReplica, ReplicaOwners
from switchboard.scheduler.placement import (
    InvalidPlacement,
    PlacementPolicy,
    PlacementRequest,
    PlacementResult,
    Placer,
    UnknownExperts,
)
from switchboard.scheduler.prefix_index import InvalidKvEvents, KvAck, KvEventIn, KvEventsIn, validate
from switchboard.scheduler.registry import (
    DuplicateReplica,
    LoadSnapshot,
    ReplicaInfo,
    ReplicaRecord,
    ReplicaRegistry,
    ReplicaState,
    ReplicaView,
)
from switchboard.scheduler.revisions import RevisionDeployer
from switchboard.scheduler.rollout import (
    MAX_REVISION_LENGTH,
    InvalidRollout,
    NoRollout,
    RevisionLedger,
    Rollout,
    RolloutConflict,
    RolloutManager,
    RolloutState,
)
from switchboard.scheduler.rollout_messages import rollout_to_proto, spec_from_proto
from switchboard.scheduler.slo import judge
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)
tracer = get_tracer(__name__)

MAX_ID_LENGTH = 256
# Largest KV block a replica may announce (tokens; the generator's GENERATOR_BLOCK_SIZE bound).
MAX_KV_BLOCK_SIZE = 1024
# Most prompt token ids one Place may carry (documented in PlaceRequest.prompt_token_ids): the
# scheduler hashes them once per block size on every Place, so the bound bounds that work.
MAX_PROMPT_TOKEN_IDS = 131072
MAX_FINGERPRINT_LENGTH = 256
MAX_REASON_LENGTH = 1024
# How long one generator has to score a quality probe's texts.
PROBE_TIMEOUT_SECONDS = 120.0
_COST_FIELDS = ("base_ms", "prefill_token_ms", "decode_seq_ms", "context_token_ms")

_STATE_TO_PROTO = {
    ReplicaState.READY: scheduler_pb2.REPLICA_STATE_READY,
    ReplicaState.DRAINING: scheduler_pb2.REPLICA_STATE_DRAINING,
}


def address_problem(address: str) -> str | None:
    """Why `address` is not a usable `host:port` (None when it is). IPv6 hosts go in brackets."""
    if not address:
        return "is required (host:port of the replica's Generator service)"
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return f"must be host:port, got {address!r}"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return f"IPv6 hosts must be in brackets, e.g. [::1]:50061; got {address!r}"
    if any(c.isspace() for c in host) or "/" in host:
        return f"host must not contain spaces or '/', got {address!r}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port must be an integer in 1..65535, got {port!r}"
    return None


def load_from_proto(message: scheduler_pb2.ReplicaLoad) -> LoadSnapshot:
    """The registry's view of a reported load."""
    return LoadSnapshot(
        running=message.running,
        waiting=message.waiting,
        kv_blocks_used=message.kv_blocks_used,
        kv_blocks_total=message.kv_blocks_total,
        tokens_per_second=message.tokens_per_second,
        requests_ended=message.requests_ended,
        requests_failed=message.requests_failed,
    )


def load_to_proto(load: LoadSnapshot) -> scheduler_pb2.ReplicaLoad:
    """The wire form of a load snapshot."""
    return scheduler_pb2.ReplicaLoad(
        running=load.running,
        waiting=load.waiting,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        tokens_per_second=load.tokens_per_second,
        requests_ended=load.requests_ended,
        requests_failed=load.requests_failed,
    )


def kv_events_from_proto(message: scheduler_pb2.KvEvents) -> KvEventsIn:
    """The prefix index's view of reported KV events, validated (INVALID_ARGUMENT naming the field)."""
    batch = KvEventsIn(
        events=tuple(
            KvEventIn(
                sequence=e.sequence,
                stored=tuple(e.stored_block_hashes),
                evicted=tuple(e.evicted_block_hashes),
                cleared=e.cleared,
            )
            for e in message.events
        ),
        reset=message.reset,
    )
    try:
        validate(batch)
    except InvalidKvEvents as error:
        raise invalid_argument(error.field, error.description) from None
    return batch


def cost_model_from_proto(message: scheduler_pb2.StepCostModel, field: str = "cost_model") -> CostModel:
    """The domain cost model of an announced one; a non-finite or negative coefficient is
    INVALID_ARGUMENT naming it (e.g. `cost_model.base_ms`)."""
    values: dict[str, float] = {}
    for name in _COST_FIELDS:
        value = getattr(message, name)
        if not math.isfinite(value) or value < 0:
            raise invalid_argument(
                f"{field}.{name}", f"must be a finite number of milliseconds >= 0, got {value!r}; refit the cost profile"
            )
        values[name] = value
    return CostModel(**values)


def cost_model_to_proto(model: CostModel) -> scheduler_pb2.StepCostModel:
    """The wire form of a replica's cost model."""
    return scheduler_pb2.StepCostModel(**{name: getattr(model, name) for name in _COST_FIELDS})


def _check_fingerprint(field: str, value: str) -> None:
    if len(value) > MAX_FINGERPRINT_LENGTH:
        raise invalid_argument(field, f"must be at most {MAX_FINGERPRINT_LENGTH} characters, got {len(value)}")


def replica_info_from_proto(request: scheduler_pb2.RegisterRequest) -> ReplicaInfo:
    """The registry's view of an announced replica, its KV hashing, tokenizer and cost model validated
    (INVALID_ARGUMENT naming the field). Identity fields are checked by the caller."""
    if request.kv_block_size > MAX_KV_BLOCK_SIZE:
        raise invalid_argument(
            "kv_block_size",
            f"must be at most {MAX_KV_BLOCK_SIZE} tokens per KV block (0: not announced), got {request.kv_block_size}",
        )
    _check_fingerprint("tokenizer_fingerprint", request.tokenizer_fingerprint)
    if len(request.revision) > MAX_REVISION_LENGTH or not request.revision.isprintable():
        raise invalid_argument(
            "revision", f"must be at most {MAX_REVISION_LENGTH} printable characters (GENERATOR_REVISION)"
        )
    cost = cost_model_from_proto(request.cost_model) if request.HasField("cost_model") else None
    return ReplicaInfo(
        replica_id=request.replica_id,
        expert=request.expert,
        address=request.address,
        device=request.device,
        model_name=request.model_name,
        max_model_len=request.max_model_len,
        kv_block_size=request.kv_block_size,
        kv_hash_seed=request.kv_hash_seed,
        tokenizer_fingerprint=request.tokenizer_fingerprint,
        cost_model=cost,
        max_waiting=request.max_waiting,
        revision=request.revision,
    )


def placement_from_proto(request: scheduler_pb2.PlaceRequest) -> PlacementRequest:
    """The placer's view of a PlaceRequest; the deprecated `expert` means `experts: [expert]`."""
    if request.expert and request.experts:
        raise invalid_argument(
            "expert", "is deprecated and must not be set together with experts; list it in experts"
        )
    if len(request.request_id) > MAX_ID_LENGTH:
        raise invalid_argument("request_id", f"must be at most {MAX_ID_LENGTH} characters")
    count = len(request.prompt_token_ids)
    if count > MAX_PROMPT_TOKEN_IDS:
        raise invalid_argument(
            "prompt_token_ids",
            f"at most {MAX_PROMPT_TOKEN_IDS} token ids per Place, got {count}; send none for longer prompts",
        )
    _check_fingerprint("tokenizer_fingerprint", request.tokenizer_fingerprint)
    return PlacementRequest(
        request_id=request.request_id,
        experts=(request.expert,) if request.expert else tuple(request.experts),
        prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        exclude_replica_ids=frozenset(request.exclude_replica_ids),
        max_alternates=request.max_alternates,
        min_model_len=request.min_model_len,
        prompt_token_ids=tuple(request.prompt_token_ids),
        tokenizer_fingerprint=request.tokenizer_fingerprint,
    )


def _check_id(field: str, value: str) -> None:
    if not value:
        raise invalid_argument(field, "is required")
    if len(value) > MAX_ID_LENGTH:
        raise invalid_argument(field, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Serves the Scheduler service over one registry and one placement policy."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        experts: Collection[str],
        policy: PlacementPolicy,
        heartbeat_seconds: float,
        retry_after_seconds: float = 1.0,
        slos: Mapping[str, ExpertSLO | None] | None = None,
        rollout_state_file: Path | None = None,
        tls: TlsIdentity | None = None,
        deployer: RevisionDeployer | None = None,
    ) -> None:
        self.registry = registry
        self.deployer = deployer  # starts a rollout's new revision and retires the loser (revisions.py)
        self._deploying: set[str] = set()  # experts whose deploy call runs now
        self._background: set[asyncio.Task[None]] = set()
        self._tls = tls  # this scheduler's identity, for the quality probe's calls to generators
        self._probing: set[str] = set()  # experts whose quality probe runs now
        self.experts = frozenset(experts)
        self.slos = dict(slos or {})
        self.policy = policy
        self.heartbeat_seconds = heartbeat_seconds
        self.retry_after_seconds = retry_after_seconds
        self.placer = Placer(registry, policy, self.experts)
        self.ledger = RevisionLedger(registry.clock)
        self.rollouts = RolloutManager(
            self.experts,
            self.ledger,
            registry.count_ready,
            clock=registry.clock,
            state_file=rollout_state_file,
            on_transition=self._rollout_transition,
        )
        self.rollouts.load()
        for rollout in self.rollouts.list():
            self._rollout_gauges(rollout)
        self.placer.splits = self.rollouts.splits
        self._owners = ReplicaOwners(lambda replica_id: registry.get(replica_id) is not None)
        metrics.update_replica_gauges(self.experts, ())

    def replica_to_proto(self, view: ReplicaView) -> scheduler_pb2.Replica:
        """The wire form of one replica as a snapshot saw it."""
        info = view.info
        return scheduler_pb2.Replica(
            replica_id=info.replica_id,
            expert=info.expert,
            address=info.address,
            device=info.device,
            model_name=info.model_name,
            max_model_len=info.max_model_len,
            load=load_to_proto(view.load),
            state=_STATE_TO_PROTO[view.state],
            seconds_since_heartbeat=view.heartbeat_age,
            inflight=view.inflight,
            kv_block_size=info.kv_block_size,
            kv_hash_seed=info.kv_hash_seed,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            cost_model=cost_model_to_proto(info.cost_model) if info.cost_model is not None else None,
            max_waiting=info.max_waiting,
            revision=info.revision,
        )

    def _changed(self) -> None:
        metrics.update_replica_gauges(self.experts, self.registry.replicas())

    def _speaks_for(self, replica_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's identity (None without TLS); PERMISSION_DENIED if it may not speak for the replica."""
        identity = peer_identity(context)
        try:
            self._owners.check(replica_id, identity)
        except NotYourReplica as exc:
            log.warning("replica call refused", replica_id=replica_id, identity=identity, peer=context.peer())
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, str(exc), reason="NOT_YOUR_REPLICA") from None
        return identity

    async def Register(
        self, request: scheduler_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterResponse:
        """Add or refresh a replica of a declared expert."""
        _check_id("replica_id", request.replica_id)
        if not request.expert:
            raise invalid_argument("expert", "is required")
        if request.expert not in self.experts:
            known = ", ".join(sorted(self.experts)) or "(none)"
            raise invalid_argument(
                "expert", f"unknown expert {request.expert!r}; the experts config declares: {known}"
            )
        problem = address_problem(request.address)
        if problem is not None:
            raise invalid_argument("address", problem)
        identity = self._speaks_for(request.replica_id, context)
        info = replica_info_from_proto(request)
        kv = kv_events_from_proto(request.kv_events) if request.HasField("kv_events") else None
        try:
            new = self.registry.register(info, load_from_proto(request.load))
        except DuplicateReplica as exc:
            raise already_exists(str(exc), reason="REPLICA_ID_TAKEN", retry_after_seconds=exc.retry_after_seconds) from None
        self._owners.bind(info.replica_id, identity)
        self._pin_serving_revision(info)
        ack = self.registry.apply_kv_events(info.replica_id, kv) if kv is not None else None
        ack = ack or self.registry.kv_ack(info.replica_id) or KvAck(0, True)
        self._changed()
        log.info(
            "replica registered" if new else "replica re-registered",
            replica_id=info.replica_id,
            expert=info.expert,
            address=info.address,
            device=info.device,
            model=info.model_name,
            kv_block_size=info.kv_block_size,
            tokenizer_fingerprint=info.tokenizer_fingerprint[:12],
            cost_model=info.cost_model is not None,
        )
        return scheduler_pb2.RegisterResponse(
            heartbeat_interval_seconds=self.heartbeat_seconds,
            expiry_seconds=self.registry.expiry_seconds,
            kv_acked_sequence=ack.acked_sequence,
            kv_resync_needed=ack.resync_needed,
        )

    async def ReportLoad(
        self, request: scheduler_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReportLoadResponse:
        """Record a heartbeat and fold its KV events; known=false tells the replica to register again."""
        _check_id("replica_id", request.replica_id)
        self._speaks_for(request.replica_id, context)
        kv = kv_events_from_proto(request.kv_events) if request.HasField("kv_events") else None
        record = self.registry.get(request.replica_id)
        was_draining = record is not None and record.state is ReplicaState.DRAINING
        previous = record.load if record is not None else None
        load = load_from_proto(request.load)
        known = self.registry.report_load(request.replica_id, load, request.draining)
        if not known:
            return scheduler_pb2.ReportLoadResponse(known=False)
        if record is not None and previous is not None:
            self._count_outcomes(record, previous, load)
        if request.draining and not was_draining:
            log.info("replica draining", replica_id=request.replica_id)
            self._changed()
        ack = self.registry.apply_kv_events(request.replica_id, kv) if kv is not None else None
        ack = ack or self.registry.kv_ack(request.replica_id) or KvAck(0, True)
        return scheduler_pb2.ReportLoadResponse(
            known=True, kv_acked_sequence=ack.acked_sequence, kv_resync_needed=ack.resync_needed
        )

    def _pin_serving_revision(self, info: ReplicaInfo) -> None:
        """A replica of a revision its expert does not serve yet takes no traffic until a rollout:
        the expert is pinned to the revision its other replicas serve."""
        others = {r.info.revision for r in self.registry.healthy_replicas(info.expert) if r.replica_id != info.replica_id}
        if others and info.revision not in others and len(others) == 1:
            (serving,) = others
            if self.rollouts.pin(info.expert, serving):
                log.info(
                    "new revision registered: it takes traffic only through a rollout",
                    expert=info.expert,
                    serving_revision=serving,
                    new_revision=info.revision,
                    replica_id=info.replica_id,
                )

    def _unpin_if_one_revision(self, expert: str) -> None:
        """Drop an expert's pin once its replicas serve one revision again (the fast path returns)."""
        if len({r.info.revision for r in self.registry.healthy_replicas(expert)}) <= 1:
            self.rollouts.unpin(expert)

    def _count_outcomes(self, record: ReplicaRecord, previous: LoadSnapshot, load: LoadSnapshot) -> None:
        """Credit the requests a heartbeat says the replica ended since the last one to its revision
        (counters that went down: the replica restarted under its id, so they count from zero)."""
        ended = load.requests_ended - previous.requests_ended
        failed = load.requests_failed - previous.requests_failed
        if ended < 0 or failed < 0:
            ended, failed = load.requests_ended, load.requests_failed
        if ended <= 0 and failed <= 0:
            return
        revision = record.info.revision
        self.ledger.record_outcomes(record.expert, revision, ended, failed)
        metrics.REVISION_REQUESTS.labels(expert=record.expert, revision=revision, failed="true").inc(failed)
        metrics.REVISION_REQUESTS.labels(expert=record.expert, revision=revision, failed="false").inc(
            max(0, ended - failed)
        )

    async def Deregister(
        self, request: scheduler_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DeregisterResponse:
        """Remove a replica; removing an unknown one succeeds too (a drain after a scheduler restart)."""
        _check_id("replica_id", request.replica_id)
        self._speaks_for(request.replica_id, context)
        record = self.registry.deregister(request.replica_id)
        self._owners.release(request.replica_id)
        if record is not None:
            self._unpin_if_one_revision(record.expert)
            self._changed()
            log.info("replica deregistered", replica_id=record.replica_id, expert=record.expert)
        return scheduler_pb2.DeregisterResponse()

    async def Place(
        self, request: scheduler_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PlaceResponse:
        """Place the request on its candidate experts, best first; reserve only the primary."""
        placement = placement_from_proto(request)
        with tracer.start_as_current_span("scheduler.place") as span:
            span.set_attribute(SpanAttributes.REQUEST_ID, request.request_id)
            span.set_attribute(SpanAttributes.EXPERTS_REQUESTED, len(placement.experts))
            span.set_attribute(SpanAttributes.PRIORITY, enum_name(common_pb2.Priority, request.priority))
            try:
                result = self.placer.place(placement)
            except InvalidPlacement as error:
                raise invalid_argument(error.field, error.description) from None
            except UnknownExperts as error:
                for _ in error.unknown:
                    metrics.PLACEMENTS.labels(expert="unknown", outcome="unknown_expert").inc()
                raise not_found(str(error), reason="EXPERT_NOT_FOUND") from None
            metrics.count_placements(result, placement.prompt_tokens + placement.max_tokens)
            primary = result.primary
            if primary is None:
                raise unavailable(
                    result.reasons(),
                    retry_after_seconds=self.retry_after_seconds,
                    reason="NO_HEALTHY_REPLICA",
                )
            span.set_attribute(SpanAttributes.EXPERT, primary.expert)
            span.set_attribute(SpanAttributes.REPLICA_ID, primary.replica.replica_id)
            if self.rollouts.splits:
                revision = primary.replica.info.revision
                span.set_attribute("switchboard.revision", revision)
                metrics.REVISION_PLACEMENTS.labels(expert=primary.expert, revision=revision).inc()
            self._changed()
            return self.result_to_proto(result)

    def result_to_proto(self, result: PlacementResult) -> scheduler_pb2.PlaceResponse:
        """The wire form of a placement, the deprecated replica/alternates filled from the primary."""
        placements = [
            scheduler_pb2.ExpertPlacement(
                expert=p.expert,
                replica=self.replica_to_proto(p.replica),
                alternates=[self.replica_to_proto(r) for r in p.alternates],
            )
            for p in result.placements
        ]
        reply = scheduler_pb2.PlaceResponse(
            placements=placements,
            unavailable=[
                scheduler_pb2.ExpertUnavailable(expert=u.expert, reason=u.reason) for u in result.unavailable
            ],
        )
        if placements:
            reply.replica.CopyFrom(placements[0].replica)
            reply.alternates.extend(placements[0].alternates)
        return reply

    async def Complete(
        self, request: scheduler_pb2.SchedulerCompleteRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerCompleteResponse:
        """Stop counting a placed request as in flight; unknown requests are accepted (idempotent)."""
        _check_id("request_id", request.request_id)
        record = self.registry.complete(request.request_id, request.replica_id)
        expert = record.expert if record is not None else "unknown"
        metrics.COMPLETIONS.labels(expert=expert, success=str(request.success).lower()).inc()
        unserved = never_served(
            request.finish_reason == common_pb2.FINISH_REASON_CANCELLED,
            request.usage.completion_tokens,
            request.time_to_first_token_seconds,
        )
        if record is not None and not unserved and request.success and request.time_to_first_token_seconds > 0:
            tokens = request.usage.completion_tokens
            decode = request.latency_seconds - request.time_to_first_token_seconds
            tpot = decode / (tokens - 1) if tokens > 1 and decode > 0 else 0.0
            self.ledger.record_latency(record.expert, record.info.revision, request.time_to_first_token_seconds, tpot)
        if record is not None and not unserved:
            metrics.count_slo(
                expert,
                judge(
                    self.slos.get(expert),
                    request.success,
                    request.time_to_first_token_seconds,
                    request.latency_seconds,
                    request.usage.completion_tokens,
                ),
            )
        self._changed()
        log.debug(
            "request completed",
            request_id=request.request_id,
            replica_id=request.replica_id,
            success=request.success,
            finish_reason=enum_name(common_pb2.FinishReason, request.finish_reason),
        )
        return scheduler_pb2.SchedulerCompleteResponse()

    async def GetCluster(
        self, request: scheduler_pb2.GetClusterRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetClusterResponse:
        """Every known replica, grouped by expert."""
        return scheduler_pb2.GetClusterResponse(
            replicas=[self.replica_to_proto(v) for v in self.registry.snapshot().views()]
        )

    def sweep_once(self) -> list[ReplicaRecord]:
        """Drop the replicas whose heartbeats stopped; returns them."""
        expired = self.registry.expire()
        if expired:
            self._owners.prune()
        for record in expired:
            self._unpin_if_one_revision(record.expert)
            metrics.EXPIRATIONS.labels(expert=record.expert).inc()
            log.warning(
                "replica expired",
                replica_id=record.replica_id,
                expert=record.expert,
                address=record.info.address,
                expiry_seconds=self.registry.expiry_seconds,
            )
        self._changed()
        return expired

    # ------------------------------------------------------------------ rollouts

    async def StartRollout(
        self, request: scheduler_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.StartRolloutResponse:
        """Start moving an expert's traffic to a new revision."""
        if not request.HasField("spec"):
            raise invalid_argument("spec", "is required (expert, from_revision, to_revision, ...)")
        try:
            spec = spec_from_proto(request.spec)
            if spec.deploy is not None and self.deployer is None:
                raise RolloutConflict(
                    "this rollout asks to deploy its new revision, but the scheduler has no deployer "
                    "(SCHEDULER_ROLLOUT_DEPLOYER=none): start its replicas yourself and leave deploy out, "
                    "or set SCHEDULER_ROLLOUT_DEPLOYER"
                )
            rollout = self.rollouts.start(spec)
        except InvalidRollout as error:
            raise invalid_argument(error.field, error.description) from None
        except RolloutConflict as error:
            raise failed_precondition(str(error), reason="ROLLOUT_CONFLICT") from None
        return scheduler_pb2.StartRolloutResponse(rollout=rollout_to_proto(rollout, self.registry.clock()))

    async def GetRollout(
        self, request: scheduler_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetRolloutResponse:
        """An expert's current (or last) rollout."""
        _check_id("expert", request.expert)
        try:
            rollout = self.rollouts.get(request.expert)
        except NoRollout as error:
            raise not_found(str(error), reason="ROLLOUT_NOT_FOUND") from None
        return scheduler_pb2.GetRolloutResponse(rollout=rollout_to_proto(rollout, self.registry.clock()))

    async def ListRollouts(
        self, request: scheduler_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListRolloutsResponse:
        """Every expert's current (or last) rollout."""
        now = self.registry.clock()
        return scheduler_pb2.ListRolloutsResponse(rollouts=[rollout_to_proto(r, now) for r in self.rollouts.list()])

    async def PauseRollout(
        self, request: scheduler_pb2.PauseRolloutRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PauseRolloutResponse:
        """Hold a running rollout at its weights."""
        return scheduler_pb2.PauseRolloutResponse(rollout=self._rollout_action(request, self.rollouts.pause))

    async def ResumeRollout(
        self, request: scheduler_pb2.ResumeRolloutRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ResumeRolloutResponse:
        """Continue a paused rollout."""
        return scheduler_pb2.ResumeRolloutResponse(rollout=self._rollout_action(request, self.rollouts.resume))

    async def AbortRollout(
        self, request: scheduler_pb2.AbortRolloutRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortRolloutResponse:
        """Stop a rollout; all traffic back to the old revision."""
        return scheduler_pb2.AbortRolloutResponse(rollout=self._rollout_action(request, self.rollouts.abort))

    def _rollout_action(
        self,
        request: scheduler_pb2.PauseRolloutRequest | scheduler_pb2.ResumeRolloutRequest | scheduler_pb2.AbortRolloutRequest,
        action: Callable[[str, str], Rollout],
    ) -> scheduler_pb2.Rollout:
        """Pause, resume or abort (the three requests have the same fields)."""
        _check_id("expert", request.expert)
        if len(request.reason) > MAX_REASON_LENGTH:
            raise invalid_argument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        try:
            rollout = action(request.expert, request.reason)
        except NoRollout as error:
            raise not_found(str(error), reason="ROLLOUT_NOT_FOUND") from None
        except RolloutConflict as error:
            raise failed_precondition(str(error), reason="ROLLOUT_CONFLICT") from None
        return rollout_to_proto(rollout, self.registry.clock())

    def _rollout_gauges(self, rollout: Rollout) -> None:
        spec = rollout.spec
        metrics.update_rollout_gauges(
            spec.expert,
            rollout.state.value,
            spec.to_revision,
            rollout.weight,
            rollout.step,
            rollout.step_elapsed(self.registry.clock()),
        )

    def _rollout_transition(self, rollout: Rollout, transition: str, detail: str) -> None:
        """Every rollout transition: metrics, one log line and a span with the event."""
        spec = rollout.spec
        metrics.ROLLOUT_TRANSITIONS.labels(expert=spec.expert, transition=transition).inc()
        self._rollout_gauges(rollout)
        attributes = {
            "switchboard.expert": spec.expert,
            "switchboard.rollout.from_revision": spec.from_revision,
            "switchboard.rollout.to_revision": spec.to_revision,
            "switchboard.rollout.strategy": spec.strategy,
            "switchboard.rollout.step": rollout.step,
            "switchboard.rollout.weight": rollout.weight,
            "switchboard.rollout.state": rollout.state.value,
            "switchboard.rollout.reason": detail,
        }
        with tracer.start_as_current_span("scheduler.rollout", attributes=attributes) as span:
            span.add_event(f"rollout.{transition}", attributes=attributes)
        if rollout.state.ended and spec.deploy is not None and self.deployer is not None:
            self._in_background(self._retire(rollout))
        stats = {f"{s.revision}": f"{s.failed}/{s.requests} failed, ttft p95 {s.ttft_p95 * 1000:.1f} ms" for s in rollout.stats}
        logger = log.warning if transition in ("rolled_back", "aborted") else log.info
        logger(
            f"rollout {transition}",
            expert=spec.expert,
            from_revision=spec.from_revision,
            to_revision=spec.to_revision,
            step=rollout.step,
            weight=rollout.weight,
            reason=detail,
            stats=stats,
        )

    def start_deploys(self) -> list[asyncio.Task[None]]:
        """Ask the deployer for the new replicas of every rollout that waits for them (once per rollout)."""
        started = []
        for rollout in self.rollouts.pending_deploys():
            expert = rollout.spec.expert
            if expert not in self._deploying and self.deployer is not None:
                self._deploying.add(expert)
                started.append(self._in_background(self._deploy(rollout)))
        return started

    async def _deploy(self, rollout: Rollout) -> None:
        spec = rollout.spec
        assert spec.deploy is not None and self.deployer is not None
        try:
            await asyncio.to_thread(self.deployer.deploy, spec.expert, spec.to_revision, spec.deploy.model, spec.deploy.replicas)
            self.rollouts.record_deploy_started(spec.expert)
        except ActuatorError as error:
            self.rollouts.record_deploy_failure(spec.expert, f"{error.reason}: {error}")
        finally:
            self._deploying.discard(spec.expert)

    async def _retire(self, rollout: Rollout) -> None:
        """Once a rollout with a deploy ended: retire the revision that lost."""
        spec = rollout.spec
        assert self.deployer is not None
        promoted = rollout.state is RolloutState.PROMOTED
        loser = spec.from_revision if promoted else spec.to_revision
        try:
            await asyncio.to_thread(self.deployer.retire, spec.expert, loser, promoted)
        except ActuatorError as error:
            log.error("retiring a revision failed", expert=spec.expert, revision=loser, reason=error.reason, error=str(error))

    def _in_background(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def start_probes(self) -> list[asyncio.Task[None]]:
        """Start the quality probe of every rollout that waits for one (once per rollout)."""
        started = []
        for rollout in self.rollouts.pending_probes():
            expert = rollout.spec.expert
            if expert not in self._probing:
                self._probing.add(expert)
                started.append(asyncio.get_running_loop().create_task(self._probe(rollout)))
        return started

    async def _probe(self, rollout: Rollout) -> None:
        """Score the probe's texts on one ready replica of each revision; record the mean NLL per token."""
        spec = rollout.spec
        probe = spec.quality_probe
        assert probe is not None
        try:
            nll: dict[str, float] = {}
            for revision in (spec.from_revision, spec.to_revision):
                replica = next(
                    (r for r in self.registry.healthy_replicas(spec.expert) if r.info.revision == revision), None
                )
                if replica is None:
                    raise LookupError(f"revision {revision} has no ready replica to score on")
                nll[revision] = await self._mean_nll(replica, probe.texts)
        except (LookupError, grpc.aio.AioRpcError) as error:
            detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
            self.rollouts.record_probe(spec.expert, None, detail)
        else:
            self.rollouts.record_probe(spec.expert, nll)
        finally:
            self._probing.discard(spec.expert)

    async def _mean_nll(self, replica: ReplicaRecord, texts: Sequence[str]) -> float:
        async with open_channel(replica.info.address, self._tls, "generator") as channel:
            reply = await generator_pb2_grpc.GeneratorStub(channel).Score(
                generator_pb2.ScoreRequest(texts=list(texts)), timeout=PROBE_TIMEOUT_SECONDS
            )
        tokens = sum(s.tokens for s in reply.scores)
        if tokens <= 0:
            raise LookupError(f"replica {replica.replica_id} scored no tokens")
        return -sum(s.log_likelihood for s in reply.scores) / tokens

    def tick_rollouts(self) -> None:
        """Judge every active rollout once (starting any deploy and quality probe due) and refresh the rollout gauges."""
        self.start_deploys()
        self.start_probes()
        self.rollouts.tick()
        for rollout in self.rollouts.list():
            if not rollout.state.ended:
                self._rollout_gauges(rollout)

    async def run_rollouts(self, interval_seconds: float) -> None:
        """Judge the rollouts every `interval_seconds` until cancelled (a failure is logged, never fatal)."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                self.tick_rollouts()
            except Exception as error:  # one bad tick (a full disk for the state file) must not stop judging
                log.error("rollout tick failed", error=repr(error))

    async def run_sweeper(self, interval_seconds: float) -> None:
        """Sweep expired replicas every `interval_seconds` until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            self.sweep_once()
