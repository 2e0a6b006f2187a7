"""Cross-service fixtures: a model to serve, an OTLP trace receiver, and real stacks of processes.

Every service runs as its own process (`python -m switchboard.<service>`), started
by the same `LocalStack` code as `switchboard up`, on free loopback ports, and is
always stopped at the end. The model is SWITCHBOARD_TEST_MODEL (a model folder) if set,
else the real demo expert bard-small when it has been built (`switchboard experts build`), otherwise a tiny randomly initialised Llama
with a byte-level BPE tokenizer saved in the Hugging Face layout (real tokens, no
meaning), so the tests run on a fresh machine in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Collection, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from switchboard.cli.localstack import LocalStack, plan_stack
from switchboard.cli.processes import ServiceSpec, free_port
from switchboard.gateway.keys import add_key, new_key

TINY_CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Of Man's first disobedience, and the fruit of that forbidden tree",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
] * 25


def build_tiny_model(folder: Path) -> Path:
    """A tiny random Llama checkpoint + tokenizer.json (Hugging Face layout) in `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SWITCHBOARD_TEST_MODEL (any model folder), else bard-small if built, else a tiny random Llama."""
    from switchboard.experts import expert_dir, is_built

    chosen = os.environ.get("SWITCHBOARD_TEST_MODEL")
    if chosen:
        return Path(chosen)
    real = expert_dir("bard-small")
    if is_built(real):
        return real
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@dataclass(frozen=True)
class ExportedSpan:
    """One span as received over OTLP."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver (opentelemetry.proto.collector.trace.v1.TraceService)."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Store every span of the batch with its resource's service.name."""
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value")) if a.value.WhichOneof("value") else None
                        for a in span.attributes
                    }
                    received.append(
                        ExportedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=attributes,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[ExportedSpan]:
        """The spans received so far."""
        with self._lock:
            return list(self.spans)


@pytest.fixture(scope="session")
def trace_receiver() -> Iterator[tuple[TraceReceiver, str]]:
    """(receiver, endpoint URL) of an OTLP/gRPC receiver on a free loopback port."""
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=1).wait()


def write_experts_config(path: Path, model: Path, experts: dict[str, int]) -> Path:
    """An experts config serving `model` under each name, with {name: replicas}."""
    descriptions = {
        "bard-small": "Shakespeare's plays: kings, lords, thou and thee, Romeo, Hamlet.",
        "milton-small": "Milton's Paradise Lost: heaven, hell, Satan, angels, Eden.",
    }
    lines = ["experts:"]
    for name, replicas in experts.items():
        lines += [
            f"  - name: {name}",
            f"    description: {json.dumps(descriptions.get(name, name))}",
            f"    model: {json.dumps(str(model))}",
            "    relative_cost: 1.0",
            f"    replicas: {replicas}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


# Fast heartbeats, expiry and drains so fault tests and teardown take seconds.
TEST_ENV = {
    "SCHEDULER_HEARTBEAT_SECONDS": "0.5",
    "SCHEDULER_EXPIRY_SECONDS": "3",
    "SCHEDULER_DRAIN_SECONDS": "1",
    "ROUTER_DRAIN_SECONDS": "1",
    "GATEWAY_DRAIN_SECONDS": "1",
    "GENERATOR_DRAIN_SECONDS": "1",
    "GATEWAY_MAX_PROMPT_CHARS": "2000",
    "GATEWAY_MAX_TOKENS_LIMIT": "4000",
    "GATEWAY_DEFAULT_MAX_TOKENS": "16",
    "LOG_LEVEL": "info",
}
GENERATOR_ENV = {"GENERATOR_DEVICE": "cpu", "GENERATOR_KV_CACHE_MB": "32", "GENERATOR_DTYPE": "float32"}


@dataclass
class RunningStack:
    """A started LocalStack with its key and log folder, and the generators planned but held back."""

    stack: LocalStack
    key: str
    log_dir: Path
    deferred: dict[str, ServiceSpec] = dataclasses.field(default_factory=dict)  # replica id -> its process

    def start_deferred(self, replica_id: str, timeout: float = 120.0) -> None:
        """Start a held-back generator (a replica deployed later) and wait until it registered."""
        spec = self.deferred.pop(replica_id)
        self.stack.group.start(spec)
        self.stack.group.wait_healthy([spec.name], timeout=timeout)
        self.stack.wait_registered([replica_id], timeout)

    @property
    def gateway_addr(self) -> str:
        """The gateway's host:port."""
        return self.stack.plan.gateway_addr

    def auth(self, key: str | None = None) -> list[tuple[str, str]]:
        """Bearer metadata for `key` (the stack's valid key by default)."""
        return [("authorization", f"Bearer {key or self.key}")]


def start_stack(
    tmp_path: Path,
    model: Path,
    experts: dict[str, int],
    otlp_endpoint: str | None = None,
    env: dict[str, str] | None = None,
    replica_env: dict[str, dict[str, str]] | None = None,
    deferred: Collection[str] = (),
) -> RunningStack:
    """Plan and start a stack on free ports (the caller must stop it); `env` overrides TEST_ENV,
    `replica_env` adds {replica id: environment} to single replicas, `deferred` names replicas
    planned but not started (`RunningStack.start_deferred` starts one)."""
    config = write_experts_config(tmp_path / "experts.yaml", model, experts)
    return start_stack_from_config(
        tmp_path, config, otlp_endpoint=otlp_endpoint, env=env, replica_env=replica_env, deferred=deferred
    )


def start_stack_from_config(
    tmp_path: Path,
    config: Path,
    models: dict[str, str] | None = None,
    otlp_endpoint: str | None = None,
    env: dict[str, str] | None = None,
    replica_env: dict[str, dict[str, str]] | None = None,
    deferred: Collection[str] = (),
) -> RunningStack:
    """Start the stack an experts config declares (`models`: {expert: folder} overrides)."""
    keys_file = tmp_path / "tenants.yaml"
    key = new_key()
    add_key(keys_file, "test-tenant", key)
    # Internal hops run mutual TLS, as `switchboard up` runs them; tests reach them with plan.channel.
    plan = plan_stack(config, keys_file, models=models, free_ports=True, tls_dir=tmp_path / "pki")
    plan.env.update({**TEST_ENV, **(env or {})})
    plan.generator_env.update(GENERATOR_ENV)
    plan.generators = [
        dataclasses.replace(g, env={**g.env, **(replica_env or {}).get(g.replica_id, {})}) for g in plan.generators
    ]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otlp_endpoint:
        plan.env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
        )
    log_dir = tmp_path / "logs"
    stack = LocalStack(plan, log_dir, base_env=base_env, grace=10.0)
    held = {replica_id: stack.specs.pop(f"generator-{replica_id}") for replica_id in deferred}
    plan.generators = [g for g in plan.generators if g.replica_id not in held]
    try:
        stack.start(timeout=240)
    except BaseException:
        stack.stop()
        raise
    return RunningStack(stack, key, log_dir, held)


__all__ = ["RunningStack", "TraceReceiver", "free_port", "start_stack", "start_stack_from_config"]
