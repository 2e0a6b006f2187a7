"""OpenTelemetry tracing, configured once per process by the standard OTEL_* variables.

With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported over OTLP/gRPC in
batches (`OTEL_BSP_*` tune the batching); without it, spans are still created
(so trace ids reach the logs and propagate across hops) but not exported.
`OTEL_SERVICE_NAME` overrides the service name. gRPC server and client spans
come from rpc_tracing.py (the server pipeline's first stage, and the channels that
`channels.open_channel` returns); health and reflection calls are not traced.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

_provider: TracerProvider | None = None

class SpanAttributes:
    """Span attribute names: OpenTelemetry's gen_ai.* conventions plus our own switchboard.*."""

    GEN_AI_SYSTEM = "gen_ai.system"
    GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
    GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
    GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
    GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
    GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
    GEN_AI_RESPONSE_ID = "gen_ai.response.id"
    GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
    GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    REQUEST_ID = "switchboard.request_id"
    TENANT = "switchboard.tenant"
    PRIORITY = "switchboard.priority"
    EXPERT = "switchboard.expert"
    EXPERTS_REQUESTED = "switchboard.experts_requested"
    REPLICA_ID = "switchboard.replica_id"
    ATTEMPT = "switchboard.attempt"
    CACHED_PROMPT_TOKENS = "switchboard.usage.cached_prompt_tokens"
    TIME_TO_FIRST_TOKEN = "switchboard.time_to_first_token_s"
    QUEUE_SECONDS = "switchboard.queue_s"
    ROUTER_GATE_KIND = "switchboard.router.gate_kind"
    ROUTER_GATE_VERSION = "switchboard.router.gate_version"
    ROUTER_K = "switchboard.router.k"
    ROUTER_COST_WEIGHT = "switchboard.router.cost_weight"
    ROUTER_PROMPT_TOKENS = "switchboard.router.prompt_tokens"
    ROUTER_EXPLORED = "switchboard.router.explored"
    # Per-expert numbers are one attribute per expert: PREFIX + expert name.
    ROUTER_SCORE_PREFIX = "switchboard.router.score."
    ROUTER_BIAS_PREFIX = "switchboard.router.bias."


def configure_tracing(service: str) -> TracerProvider:
    """Install the process's tracer provider (idempotent)."""
    global _provider
    if _provider is not None:
        return _provider
    name = os.environ.get("OTEL_SERVICE_NAME", f"switchboard-{service}")
    provider = TracerProvider(resource=Resource.create({"service.name": name, "service.namespace": "switchboard"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and stop exporting (at process exit, so the last spans are not lost)."""
    if _provider is not None:
        _provider.shutdown()


def get_tracer(name: str) -> trace.Tracer:
    """A tracer for domain spans (queue, prefill, decode, route, place)."""
    return trace.get_tracer(name)


def in_memory_span_exporter() -> Any:
    """An in-memory exporter on the process's SDK tracer provider (installing one if none is set),
    for tests that assert on the spans a service writes; `get_finished_spans()` reads them."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
