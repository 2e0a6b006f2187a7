"""One stack of real processes (scheduler, router, a generator, gateway) exercised end to end.

Spans go to a real OTLP/gRPC receiver started by the test; logs are the services'
stdout files. The stack serves `bard-small` (one replica) and declares
`milton-small` with no replica, for the "no healthy replica" case.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from switchboard.common.errors import error_details
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import ExportedSpan, RunningStack, TraceReceiver, start_stack

pytestmark = pytest.mark.slow
GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, trace_receiver: tuple[TraceReceiver, str]
) -> Iterator[RunningStack]:
    """The module's stack, exporting spans to the test's OTLP receiver."""
    running = start_stack(
        tmp_path_factory.mktemp("e2e"), model_dir, {"bard-small": 1, "milton-small": 0}, trace_receiver[1]
    )
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="module")
def gateway(stack: RunningStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    """A stub on a channel to the stack's gateway."""
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def generate(
    gateway: gateway_pb2_grpc.GatewayStub, metadata: list[tuple[str, str]], timeout: float = 60, **fields: object
) -> list[gateway_pb2.GenerateResponse]:
    """All messages of one Generate call."""
    sampling = fields.pop("sampling", common_pb2.SamplingParams(max_tokens=12, temperature=0.0))
    request = gateway_pb2.GenerateRequest(prompt=fields.pop("prompt", "To be, or not to be"), sampling=sampling, **fields)
    return list(gateway.Generate(request, metadata=metadata, timeout=timeout))


def generate_error(gateway: gateway_pb2_grpc.GatewayStub, metadata: list[tuple[str, str]], **fields: object) -> dict:
    """The decoded error a Generate call must end with."""
    with pytest.raises(grpc.RpcError) as info:
        generate(gateway, metadata, **fields)
    return error_details(info.value)


def replica_finish(stack: RunningStack, replica_id: str, request_id: str) -> dict:
    """The generator's `generate finished` log event of one request (waits up to 15 s for it)."""
    log_path = stack.log_dir / f"generator-{replica_id}.log"
    deadline = time.monotonic() + 15
    while True:
        for event in map(json.loads, filter(str.strip, log_path.read_text().splitlines())):
            if event.get("request_id") == request_id and event.get("event") == "generate finished":
                return event
        assert time.monotonic() < deadline, f"{replica_id} never finished request {request_id}"
        time.sleep(0.2)


# The small demo experts loop on blank lines under plain greedy decoding; a mild
# repetition penalty keeps greedy output deterministic and makes it visible text.
GREEDY_TEXT = common_pb2.SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.15)


def test_generate_streams_real_text(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    messages = generate(gateway, stack.auth(), sampling=GREEDY_TEXT)
    assert messages[0].model == "bard-small"
    assert len({m.request_id for m in messages}) == 1
    last = messages[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
    assert last.usage.completion_tokens == sum(m.token_count for m in messages) > 0
    assert last.usage.prompt_tokens > 0
    streamed = "".join(m.text for m in messages)
    assert streamed.strip()
    # Greedy decoding is deterministic: the unary form returns the same text.
    complete = gateway.Complete(
        gateway_pb2.CompleteRequest(prompt="To be, or not to be", sampling=GREEDY_TEXT),
        metadata=stack.auth(),
        timeout=60,
    )
    assert complete.text == streamed and complete.model == "bard-small"
    assert complete.usage.completion_tokens == last.usage.completion_tokens


def test_seeded_sampling_is_reproducible_through_the_gateway(
    stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    def sample(seed: int) -> str:
        sampling = common_pb2.SamplingParams(max_tokens=16, temperature=1.0, seed=seed)
        return "".join(m.text for m in generate(gateway, stack.auth(), sampling=sampling))

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1  # the seed, not greedy decoding, fixes the text


def test_list_models_shows_live_replicas(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    reply = gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=stack.auth(), timeout=10)
    assert {m.name: m.ready_replicas for m in reply.models} == {"bard-small": 1, "milton-small": 0}


def _ancestors(span: ExportedSpan, by_id: dict[str, ExportedSpan]) -> list[ExportedSpan]:
    chain = []
    while span.parent_span_id and span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def _trace_is_complete(spans: list[ExportedSpan], request_id: str, services: set[str]) -> tuple[bool, str]:
    """Whether the request's trace has spans of every service, linked to the gateway's root span."""
    roots = [
        s
        for s in spans
        if s.attributes.get("switchboard.request_id") == request_id and s.service == "switchboard-gateway" and not s.parent_span_id
    ]
    if not roots:
        return False, "no gateway root span with the request id"
    root = roots[0]
    trace_spans = [s for s in spans if s.trace_id == root.trace_id]
    missing = services - {s.service for s in trace_spans}
    if missing:
        return False, f"no spans from {sorted(missing)} in trace {root.trace_id}"
    by_id = {s.span_id: s for s in trace_spans}
    if not any(root in _ancestors(s, by_id) for s in trace_spans if s.service == "switchboard-generator"):
        return False, "no generator span descends from the gateway root span:\n" + "\n".join(map(str, trace_spans))
    scheduler_linked = any(
        root in _ancestors(s, by_id) and any(a.service == "switchboard-router" for a in _ancestors(s, by_id))
        for s in trace_spans
        if s.service == "switchboard-scheduler"
    )
    if not scheduler_linked:
        return False, "no scheduler span descends from a router span under the root:\n" + "\n".join(map(str, trace_spans))
    return True, ""


def test_one_trace_spans_all_four_services(
    stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub, trace_receiver: tuple[TraceReceiver, str]
) -> None:
    receiver = trace_receiver[0]
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    generate(gateway, stack.auth(), request_id=request_id)
    services = {"switchboard-gateway", "switchboard-router", "switchboard-scheduler", "switchboard-generator"}
    deadline = time.monotonic() + 30  # spans are exported in batches every 200 ms
    while True:
        complete, why = _trace_is_complete(receiver.snapshot(), request_id, services)
        if complete:
            break
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def test_missing_or_wrong_key_is_unauthenticated(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    assert generate_error(gateway, [])["code"] == grpc.StatusCode.UNAUTHENTICATED
    details = generate_error(gateway, stack.auth("sb-wrong-key"))
    assert details["code"] == grpc.StatusCode.UNAUTHENTICATED and details["reason"] == "API_KEY_INVALID"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=-1)}, "sampling.max_tokens"),
        ({"sampling": common_pb2.SamplingParams(temperature=2.5)}, "sampling.temperature"),
    ],
)
def test_invalid_parameters_name_the_field(
    stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub, fields: dict, field: str
) -> None:
    details = generate_error(gateway, stack.auth(), **fields)
    assert details["code"] == grpc.StatusCode.INVALID_ARGUMENT
    assert details["field_violations"][0][0] == field and field in details["message"]


def test_no_healthy_replica_is_unavailable(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    details = generate_error(gateway, stack.auth(), model="milton-small")
    assert details["code"] == grpc.StatusCode.UNAVAILABLE
    assert details["retry_after"] is not None and "milton-small" in details["message"]
    assert generate_error(gateway, stack.auth(), model="no-such")["code"] == grpc.StatusCode.NOT_FOUND


def test_deadline_exceeded_stops_generation(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    with stack.stack.plan.channel(stack.stack.plan.scheduler_addr, "scheduler") as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        replica = scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5).replicas[0]
    # Far more tokens than fit in the deadline; ignore_eos so the model cannot stop early.
    max_tokens = min(4000, replica.max_model_len - 16)
    request_id = f"deadline-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    details = generate_error(
        gateway,
        stack.auth(),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        request_id=request_id,
        timeout=0.75,
    )
    assert details["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30  # it returned instead of hanging
    # The deadline reached the replica: it stopped the request early.
    finished = replica_finish(stack, replica.replica_id, request_id)
    assert finished["finish_reason"] == "cancelled" and finished["completion_tokens"] < max_tokens


def test_client_cancel_stops_generation_on_the_replica(
    stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    with stack.stack.plan.channel(stack.stack.plan.scheduler_addr, "scheduler") as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        replica = scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5).replicas[0]
    max_tokens = min(4000, replica.max_model_len - 16)
    request_id = f"cancel-{uuid.uuid4().hex[:12]}"
    call = gateway.Generate(
        gateway_pb2.GenerateRequest(
            prompt="To be, or not to be",
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            request_id=request_id,
        ),
        metadata=stack.auth(),
        timeout=120,
    )
    received = [next(call) for _ in range(3)]
    assert all(m.token_count for m in received)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # The replica ends the request as cancelled, long before its max_tokens.
    finished = replica_finish(stack, replica.replica_id, request_id)
    assert finished["finish_reason"] == "cancelled"
    assert finished["completion_tokens"] < max_tokens


def test_the_openai_client_streams_completions_and_chats_through_the_stack(
    stack: RunningStack, trace_receiver: tuple[TraceReceiver, str]
) -> None:
    client = openai.OpenAI(base_url=stack.stack.plan.openai_base_url, api_key=stack.key, max_retries=0, timeout=60)
    assert "bard-small" in [m.id for m in client.models.list()]
    chunks = list(
        client.completions.create(
            model="auto",
            prompt="To be, or not to be",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[0].model == "bard-small"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8 and usage.prompt_tokens > 0
    whole = client.completions.create(model="bard-small", prompt="To be, or not to be", max_tokens=8, temperature=0)
    assert whole.choices[0].text == text  # greedy: the same text streamed or whole
    chat = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Speak, Hamlet."}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens == 6
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.stack.plan.openai_base_url, api_key="sb-wrong", max_retries=0).models.list()
    # One trace: the HTTP request's span is the root of the router's, scheduler's and generator's spans.
    request_id = whole.id.removeprefix("cmpl-")
    services = {"switchboard-gateway", "switchboard-router", "switchboard-scheduler", "switchboard-generator"}
    deadline = time.monotonic() + 30
    while True:
        complete, why = _trace_is_complete(trace_receiver[0].snapshot(), request_id, services)
        if complete:
            break
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def test_an_http_client_that_goes_away_stops_generation_on_the_replica(stack: RunningStack) -> None:
    with stack.stack.plan.channel(stack.stack.plan.scheduler_addr, "scheduler") as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        replica = scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5).replicas[0]
    max_tokens = min(4000, replica.max_model_len - 16)
    client = openai.OpenAI(base_url=stack.stack.plan.openai_base_url, api_key=stack.key, max_retries=0, timeout=60)
    stream = client.completions.create(
        model="bard-small", prompt="To be, or not to be", max_tokens=max_tokens, stream=True
    )
    request_id = ""
    for count, chunk in enumerate(stream):
        request_id = chunk.id.removeprefix("cmpl-")
        if count == 2:
            break
    stream.close()  # the connection goes away mid-stream
    finished = replica_finish(stack, replica.replica_id, request_id)
    assert finished["finish_reason"] == "cancelled"
    assert finished["completion_tokens"] < max_tokens


def test_grpcurl_lists_services_and_health_is_serving(stack: RunningStack) -> None:
    listed = subprocess.run(
        [str(GRPCURL), "-plaintext", stack.gateway_addr, "list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert {"switchboard.v1.Gateway", "grpc.health.v1.Health"} <= set(listed)
    for spec in stack.stack.specs.values():
        # The gateway's public port is plaintext on loopback; the internal services speak mutual TLS only.
        transport = ["-plaintext"]
        if spec.probe_tls is not None:
            tls = spec.probe_tls
            transport = ["-cacert", str(tls.ca_file), "-cert", str(tls.cert_file), "-key", str(tls.key_file)]
            transport += ["-servername", spec.role]
            refused = subprocess.run(
                [str(GRPCURL), "-plaintext", "-d", '{"service":""}', spec.address, "grpc.health.v1.Health/Check"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert refused.returncode != 0, f"{spec.name} answered plaintext"
        health = subprocess.run(
            [str(GRPCURL), *transport, "-d", '{"service":""}', spec.address, "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(health.stdout)["status"] == "SERVING", spec.name


def test_metrics_endpoints_serve_prometheus_text(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    generate(gateway, stack.auth())
    plan = stack.stack.plan
    gateway_text = urllib.request.urlopen(f"http://127.0.0.1:{plan.gateway_metrics}/metrics", timeout=10).read().decode()
    assert "switchboard_gateway_requests_total" in gateway_text
    assert "switchboard_gateway_time_to_first_token_seconds_bucket" in gateway_text
    router_text = urllib.request.urlopen(f"http://127.0.0.1:{plan.router_metrics}/metrics", timeout=10).read().decode()
    assert "switchboard_router_decisions_total" in router_text


def test_every_log_line_is_json_with_trace_ids(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    request_id = f"logs-{uuid.uuid4().hex[:12]}"
    generate(gateway, stack.auth(), request_id=request_id)
    deadline = time.monotonic() + 10
    while True:  # log lines are flushed as written; allow the feedback line to land
        request_lines: dict[str, list[dict]] = {}
        for spec in stack.stack.specs.values():
            log_path = stack.log_dir / f"{spec.name}.log"
            for number, line in enumerate(log_path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    pytest.fail(f"{log_path.name}:{number} is not JSON: {line[:200]}")
                if event.get("request_id") == request_id:
                    request_lines.setdefault(spec.name, []).append(event)
        if {"gateway", "router"} <= set(request_lines) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"gateway", "router"} <= set(request_lines), sorted(request_lines)
    trace_ids = {event.get("trace_id") for events in request_lines.values() for event in events}
    assert len(trace_ids) == 1 and None not in trace_ids, trace_ids
