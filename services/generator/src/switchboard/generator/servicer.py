"""The `switchboard.v1.Generator` RPC handlers around the engine.

`Generate` validates the request (INVALID_ARGUMENT naming the field), picks its prompt (the
upstream token ids when their tokenizer fingerprint is this replica's, else the text tokenized
here: `prompt_input.py`), hands it to the engine and streams every engine output as one response
message. A request arriving while the engine's waiting queue is at its bound
(GENERATOR_MAX_WAITING) is refused before any work with RESOURCE_EXHAUSTED, RetryInfo and reason
REPLICA_QUEUE_FULL. A request the engine traced a failed step to (and took out of the batch, the
replica serving on) ends with INTERNAL and reason REQUEST_FAILED_IN_ENGINE: its message names the
request and the trace, never the exception's text, and says retrying it unchanged will fail again.
Cancelling the call (or its deadline passing)
cancels the handler task; the engine's stream is closed with `aclosing`, which takes the sequence
out of the batch at the next step and returns its KV blocks to the pool.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from switchboard.common.errors import (
    INJECTED_FAULT,
    REPLICA_QUEUE_FULL,
    REQUEST_FAILED_IN_ENGINE,
    ServiceError,
    failed_precondition,
    invalid_argument,
    resource_exhausted,
    unavailable,
)
from switchboard.common.logging import bind_request, get_logger
from switchboard.common.telemetry import SpanAttributes, get_tracer
from switchboard.generator import metrics
from switchboard.generator.engine import (
    EngineOutput,
    EngineRequest,
    QueueFull,
    RequestFailedInEngine,
    RequestRejected,
)
from switchboard.generator.prompt_input import PromptRejected, choose_prompt
from switchboard.generator.replica_time import ReplicaTimeMeter
from switchboard.generator.sampling import SamplingParams
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc

if TYPE_CHECKING:
    from switchboard.generator.engine import Engine

log = get_logger(__name__)
tracer = get_tracer(__name__)

MAX_REQUEST_ID_LENGTH = 256
MAX_SCORE_TEXTS = 64
# RetryInfo delay of a Generate refused with a full waiting queue (reason REPLICA_QUEUE_FULL): about
# one scheduler heartbeat, by when the queue has moved and the scheduler has seen it.
QUEUE_FULL_RETRY_SECONDS = 1.0

FINISH_REASONS = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos": common_pb2.FINISH_REASON_EOS,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}


# Finish reasons of requests the replica ended (counted in `ReplicaOutcomes`): the others were
# cancelled by the client or refused before any work (full queue, invalid request).
_ENDED = frozenset({"length", "eos", "stop_sequence", "error"})


@dataclass
class ReplicaOutcomes:
    """Requests this replica ended and, of those, failed, since it started (its heartbeats carry
    them: the scheduler compares an expert's revisions by them during a rollout)."""

    ended: int = 0
    failed: int = 0


@dataclass(frozen=True)
class FaultInjection:
    """Faults a drill injects into every Generate (GENERATOR_FAULT_*): a share refused with
    UNAVAILABLE before any work, and a delay before the work starts. Off by default."""

    error_ratio: float = 0.0
    first_token_delay_seconds: float = 0.0
    seed: int | None = None


@dataclass
class ReplicaIdentity:
    """Who this replica is (known once the port is bound)."""

    replica_id: str
    expert: str
    revision: str = ""


def sampling_from_proto(message: common_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Validated sampling parameters; a bad field becomes INVALID_ARGUMENT naming `sampling.<field>`."""
    try:
        return SamplingParams.from_proto(message, default_max_tokens)
    except ValueError as exc:
        text = str(exc)
        field, sep, description = text.partition(": ")
        if not sep or not field.startswith("sampling."):
            field, description = "sampling", text
        raise invalid_argument(field, description) from None


def record_queue_and_prefill(request_id: str, arrival_ns: int, first_scheduled_ns: int | None) -> None:
    """Record generator.queue (arrival to admission) and generator.prefill (admission to now).

    Called when the first token arrives (or the request ends without one). Without an
    admission time (the request never ran) the whole wait is the queue span.
    """
    now_ns = time.time_ns()
    admitted_ns = min(max(first_scheduled_ns or now_ns, arrival_ns), now_ns)
    attributes = {SpanAttributes.REQUEST_ID: request_id}
    queue = tracer.start_span("generator.queue", start_time=arrival_ns, attributes=attributes)
    queue.set_attribute(SpanAttributes.QUEUE_SECONDS, (admitted_ns - arrival_ns) / 1e9)
    queue.end(end_time=admitted_ns)
    if first_scheduled_ns is not None:
        tracer.start_span("generator.prefill", start_time=admitted_ns, attributes=attributes).end(end_time=now_ns)


def response_from_output(output: EngineOutput) -> generator_pb2.GeneratorGenerateResponse:
    """One stream message from one engine output (finish reason and usage only on the last)."""
    response = generator_pb2.GeneratorGenerateResponse(text=output.text, token_ids=output.token_ids)
    if output.finish_reason is not None:
        response.finish_reason = FINISH_REASONS.get(output.finish_reason, common_pb2.FINISH_REASON_ERROR)
    if output.usage is not None:
        response.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=output.usage.prompt_tokens,
                completion_tokens=output.usage.completion_tokens,
                cached_prompt_tokens=output.usage.cached_prompt_tokens,
            )
        )
    return response


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """Serves Generate and Info for one engine.

    `on_engine_failure` is called once when the engine reports a fatal error, so the process can
    stop and exit non-zero (the orchestrator then restarts it).
    """

    def __init__(
        self,
        engine: Engine,
        identity: ReplicaIdentity,
        default_max_tokens: int,
        on_engine_failure: Callable[[BaseException], None] | None = None,
        faults: FaultInjection | None = None,
    ) -> None:
        self.engine = engine
        self.outcomes = ReplicaOutcomes()
        self.replica_time = ReplicaTimeMeter()  # each request's share of the busy time (Usage.replica_seconds)
        self.faults = faults or FaultInjection()
        self._fault_random = random.Random(self.faults.seed)
        self.identity = identity
        self.default_max_tokens = default_max_tokens
        self.draining = False
        self._on_engine_failure = on_engine_failure
        self._failure_reported = False
        # Upstream ids with this fingerprint were made by this replica's own tokenizer.
        self.tokenizer_fingerprint = engine.tokenizer.fingerprint

    def _engine_request(
        self, request: generator_pb2.GeneratorGenerateRequest, request_id: str
    ) -> EngineRequest:
        if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
            raise invalid_argument("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
        sampling = sampling_from_proto(request.sampling, self.default_max_tokens)
        try:
            prompt = choose_prompt(
                request.prompt,
                request.prompt_token_ids,
                request.tokenizer_fingerprint,
                self.tokenizer_fingerprint,
                self.engine.vocab_size,
                self.engine.max_model_len,
            )
        except PromptRejected as exc:
            raise invalid_argument(exc.field, exc.message) from None
        metrics.PROMPT_TOKENIZATION.labels(source=prompt.source).inc()
        return EngineRequest(request_id, prompt=prompt.text, prompt_token_ids=prompt.token_ids, sampling=sampling)

    def _check_engine(self) -> None:
        failure = self.engine.failed
        if failure is not None:
            if not self._failure_reported and self._on_engine_failure is not None:
                self._failure_reported = True
                self._on_engine_failure(failure)
            raise unavailable(
                f"replica {self.identity.replica_id} failed: {failure!r}", retry_after_seconds=None
            )

    async def Generate(
        self, request: generator_pb2.GeneratorGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GeneratorGenerateResponse]:
        """Stream the completion of one prompt as its tokens are sampled."""
        arrival = time.monotonic()
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        with bind_request(request_id):
            if self.draining:
                raise unavailable(f"replica {self.identity.replica_id} is draining", retry_after_seconds=0.0)
            self._check_engine()
            engine_request = self._engine_request(request, request_id)
            await self._inject_faults()
            sampling = engine_request.sampling
            server_span = trace.get_current_span()
            attributes = {
                SpanAttributes.GEN_AI_OPERATION_NAME: "text_completion",
                SpanAttributes.GEN_AI_REQUEST_MODEL: self.engine.info.model_name,
                SpanAttributes.GEN_AI_REQUEST_MAX_TOKENS: sampling.max_tokens,
                SpanAttributes.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
                SpanAttributes.GEN_AI_REQUEST_TOP_P: sampling.top_p,
                SpanAttributes.GEN_AI_REQUEST_TOP_K: sampling.top_k,
                SpanAttributes.REQUEST_ID: request_id,
                SpanAttributes.EXPERT: self.identity.expert,
                SpanAttributes.REPLICA_ID: self.identity.replica_id,
            }
            if sampling.seed is not None:
                # OTel attributes are signed 64-bit; seeds may use the full unsigned range.
                attributes[SpanAttributes.GEN_AI_REQUEST_SEED] = str(sampling.seed)
            server_span.set_attributes(attributes)
            load = self.engine.load()
            server_span.set_attributes(
                {
                    "switchboard.engine.waiting_at_arrival": load.waiting,
                    "switchboard.engine.running_at_arrival": load.running,
                }
            )
            async for message in self._stream(engine_request, arrival, server_span):
                yield message

    async def _stream(
        self,
        engine_request: EngineRequest,
        arrival: float,
        server_span: trace.Span,
    ) -> AsyncIterator[generator_pb2.GeneratorGenerateResponse]:
        """Run the request on the engine and record spans and metrics however it ends."""
        request_id = engine_request.request_id
        decode_span: trace.Span | None = None
        first_token_at: float | None = None
        completion_tokens = 0
        finish_reason = "cancelled"
        usage = None
        # Spans before the first token are recorded once it arrives, when the engine says
        # when the request's prefill first ran: generator.queue (arrival to admission) and
        # generator.prefill (admission to first token).
        arrival_ns = time.time_ns()
        metered = object()  # this call's key in the replica-time meter
        self.replica_time.start(metered)
        try:
            async with aclosing(self.engine.generate(engine_request)) as outputs:
                async for output in outputs:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        record_queue_and_prefill(request_id, arrival_ns, output.first_scheduled_ns)
                        server_span.set_attribute(
                            SpanAttributes.TIME_TO_FIRST_TOKEN, first_token_at - arrival
                        )
                        decode_span = tracer.start_span(
                            "generator.decode", attributes={SpanAttributes.REQUEST_ID: request_id}
                        )
                    completion_tokens += len(output.token_ids)
                    response = response_from_output(output)
                    if output.finish_reason is not None:
                        finish_reason = output.finish_reason
                        usage = output.usage
                        response.usage.replica_seconds = self.replica_time.finish(metered)
                    yield response
        except QueueFull as exc:
            finish_reason = "queue_full"
            raise resource_exhausted(
                f"replica {self.identity.replica_id}: {exc}",
                retry_after_seconds=QUEUE_FULL_RETRY_SECONDS,
                reason=REPLICA_QUEUE_FULL,
            ) from None
        except RequestRejected as exc:
            finish_reason = "rejected"
            raise invalid_argument(exc.field, exc.message) from None
        except RequestFailedInEngine as exc:
            finish_reason = "error"
            metrics.REQUESTS_FAILED_IN_ENGINE.inc()
            raise self._failed_in_engine(exc, server_span, completion_tokens) from None
        except RuntimeError as exc:
            finish_reason = "error"
            if self.engine.failed is not None:
                self._check_engine()
            log.error("generation failed", error=repr(exc))
            raise unavailable(
                f"generation failed on replica {self.identity.replica_id}", retry_after_seconds=None
            ) from exc
        finally:
            self.replica_time.finish(metered)  # a no-op after the last message; frees a cancelled call's
            if first_token_at is None:
                record_queue_and_prefill(request_id, arrival_ns, None)
            if decode_span is not None:
                decode_span.set_attribute(SpanAttributes.GEN_AI_USAGE_OUTPUT_TOKENS, completion_tokens)
                decode_span.end()
            self._record(finish_reason, arrival, first_token_at, completion_tokens, usage, server_span)

    async def _inject_faults(self) -> None:
        """The drill's faults: wait, then refuse a share of the calls (counted as failed)."""
        faults = self.faults
        if faults.first_token_delay_seconds > 0:
            await asyncio.sleep(faults.first_token_delay_seconds)
        if faults.error_ratio > 0 and self._fault_random.random() < faults.error_ratio:
            self.outcomes.ended += 1
            self.outcomes.failed += 1
            metrics.record_finished("error", None, 0.0, 0, 0, 0)
            raise unavailable(
                f"replica {self.identity.replica_id} refused the request: injected fault (GENERATOR_FAULT_ERROR_RATIO)",
                retry_after_seconds=None,
                reason=INJECTED_FAULT,
            )

    def _failed_in_engine(
        self, exc: RequestFailedInEngine, server_span: trace.Span, streamed_tokens: int
    ) -> ServiceError:
        """INTERNAL with reason REQUEST_FAILED_IN_ENGINE for a request the engine took out of the batch."""
        trace_id = server_span.get_span_context().trace_id
        traced = f", trace id {trace_id:032x}" if trace_id else ""
        after = f" after {streamed_tokens} tokens" if streamed_tokens else ""
        server_span.set_attribute("switchboard.failed_in_engine", True)
        return ServiceError(
            grpc.StatusCode.INTERNAL,
            f"request {exc.request_id} could not be served: it failed inside the model on replica "
            f"{self.identity.replica_id}{after} (the replica serves on{traced}); retrying it unchanged "
            "will fail again",
            reason=REQUEST_FAILED_IN_ENGINE,
            metadata={"replica_id": self.identity.replica_id},
        )

    def _record(
        self,
        finish_reason: str,
        arrival: float,
        first_token_at: float | None,
        completion_tokens: int,
        usage: object,
        server_span: trace.Span,
    ) -> None:
        if finish_reason in _ENDED:
            self.outcomes.ended += 1
            self.outcomes.failed += finish_reason == "error"
        prompt_tokens = getattr(usage, "prompt_tokens", 0)
        cached = getattr(usage, "cached_prompt_tokens", 0)
        completion_tokens = getattr(usage, "completion_tokens", completion_tokens)
        total = time.monotonic() - arrival
        ttft = None if first_token_at is None else first_token_at - arrival
        metrics.record_finished(finish_reason, ttft, total, prompt_tokens, completion_tokens, cached)
        server_span.set_attributes(
            {
                SpanAttributes.GEN_AI_RESPONSE_FINISH_REASONS: [finish_reason],
                SpanAttributes.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
                SpanAttributes.GEN_AI_USAGE_OUTPUT_TOKENS: completion_tokens,
                SpanAttributes.CACHED_PROMPT_TOKENS: cached,
            }
        )
        log.info(
            "generate finished",
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=cached,
            time_to_first_token_s=None if ttft is None else round(ttft, 4),
            seconds=round(total, 4),
        )

    async def Score(
        self, request: generator_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.ScoreResponse:
        """The model's log-likelihood of each text (a rollout's quality probe)."""
        score = getattr(self.engine, "score", None)
        if score is None:
            raise failed_precondition(
                f"replica {self.identity.replica_id} fronts a remote engine and cannot score texts",
                reason="SCORE_UNSUPPORTED",
            )
        count = len(request.texts)
        if not 1 <= count <= MAX_SCORE_TEXTS:
            raise invalid_argument("texts", f"give 1 to {MAX_SCORE_TEXTS} texts, got {count}")
        self._check_engine()
        encoded: list[list[int]] = []
        limit = self.engine.max_model_len
        for index, text in enumerate(request.texts):
            ids = list(self.engine.tokenizer.encode(text))
            if not 2 <= len(ids) <= limit:
                raise invalid_argument(
                    f"texts[{index}]", f"must encode to 2..{limit} tokens (the context length), got {len(ids)}"
                )
            encoded.append(ids)
        scores = await score(encoded)
        return generator_pb2.ScoreResponse(
            scores=[generator_pb2.TextScore(log_likelihood=ll, tokens=n) for ll, n in scores]
        )

    async def Info(
        self, request: generator_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.InfoResponse:
        """Describe the loaded model and this replica."""
        info = self.engine.info
        return generator_pb2.InfoResponse(
            replica_id=self.identity.replica_id,
            expert=self.identity.expert,
            model_name=info.model_name,
            architecture=info.architecture,
            device=info.device,
            dtype=info.dtype,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            kv_block_size=info.block_size,
            kv_blocks_total=info.kv_blocks_total,
            parameter_count=info.parameter_count,
            quantization=info.quantization,
            revision=self.identity.revision,
        )
