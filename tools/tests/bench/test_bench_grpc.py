"""The gRPC stream parser and the replay's accounting against a real grpc.aio Gateway server.

The server below is a real gRPC server on a loopback port implementing Gateway.Generate: it
streams token chunks, ends with usage, fails with a status mid-stream, or never finishes, as
the prompt asks. It checks the bearer key like the real gateway does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.bench.records import RequestRecord
from switchboard.bench.runner import replay
from switchboard.bench.targets.gateway_grpc import GatewayTarget
from switchboard.bench.workload import TraceRequest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

KEY = "test-key"


class StreamingGateway(gateway_pb2_grpc.GatewayServicer):
    """Streams `max_tokens` chunks; prompt "fail" aborts after two, "hang" never ends."""

    def __init__(self) -> None:
        self.requests: list[gateway_pb2.GenerateRequest] = []
        self.cancelled = asyncio.Event()

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        self.requests.append(request)
        if request.prompt == "hang":
            yield gateway_pb2.GenerateResponse(request_id=request.request_id, text="x", token_count=1, model="m")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        sent = 0
        for i in range(0, request.sampling.max_tokens, 2):
            tokens = min(2, request.sampling.max_tokens - i)  # two tokens per message, like a batched detokenizer
            yield gateway_pb2.GenerateResponse(request_id=request.request_id, text="ab" * tokens,
                                               token_count=tokens, model="m" if i == 0 else "")
            sent += tokens
            if request.prompt == "fail" and i >= 2:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "replica queue full")
        yield gateway_pb2.GenerateResponse(
            request_id=request.request_id, finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=sent,
                                   cached_prompt_tokens=1))


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, StreamingGateway]]:
    server = grpc.aio.server()
    servicer = StreamingGateway()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def requests(n: int, output_tokens: int = 5, gap: float = 0.0) -> list[TraceRequest]:
    return [TraceRequest(i, i * gap, 3, output_tokens) for i in range(n)]


async def test_stream_parser_records_chunks_usage_and_exact_output(gateway: tuple[str, StreamingGateway]) -> None:
    address, servicer = gateway
    target = GatewayTarget(address, KEY, model="bard-small", temperature=0.0, seed=7)
    records = await replay(target, requests(1, output_tokens=5), ["to be or"], timeout_s=30)
    rec = records[0]
    assert rec.status == "ok", rec.error
    assert [n for _, n in rec.chunks] == [2, 2, 1]
    assert rec.output_tokens == 5 and rec.prompt_tokens == 3 and rec.cached_prompt_tokens == 1
    assert rec.finish_reason == "FINISH_REASON_LENGTH"
    assert rec.model == "m"
    assert rec.ttft is not None and rec.e2e is not None and rec.e2e >= rec.ttft >= 0
    sent = servicer.requests[0]
    assert (sent.sampling.max_tokens, sent.sampling.min_tokens, sent.sampling.ignore_eos) == (5, 5, True)
    assert sent.model == "bard-small" and sent.sampling.temperature == 0.0 and sent.sampling.seed == 7
    assert sent.request_id == "bench-0"


async def test_error_status_mid_stream_keeps_received_chunks(gateway: tuple[str, StreamingGateway]) -> None:
    address, _ = gateway
    records = await replay(GatewayTarget(address, KEY), requests(1, output_tokens=10), ["fail"], timeout_s=30)
    assert records[0].status == "RESOURCE_EXHAUSTED"
    assert records[0].error == "replica queue full"
    assert records[0].output_tokens == 4


async def test_wrong_key_is_unauthenticated(gateway: tuple[str, StreamingGateway]) -> None:
    address, _ = gateway
    records = await replay(GatewayTarget(address, "nope"), requests(2), ["a", "b"], timeout_s=30)
    assert [r.status for r in records] == ["UNAUTHENTICATED"] * 2


async def test_timeout_cancels_the_call_and_every_request_is_accounted_for(
        gateway: tuple[str, StreamingGateway]) -> None:
    address, servicer = gateway
    done: list[RequestRecord] = []
    prompts = ["a b", "hang", "fail", "c", "hang"]
    records = await replay(GatewayTarget(address, KEY), requests(5, output_tokens=6, gap=0.01), prompts,
                           timeout_s=0.5, on_done=done.append)
    assert [r.status for r in records] == ["ok", "timeout", "RESOURCE_EXHAUSTED", "ok", "timeout"]
    assert records[1].output_tokens == 1 and "cancelled" in records[1].error
    assert sorted(r.index for r in done) == [0, 1, 2, 3, 4]
    # The server saw the cancellation: the timed-out call did not keep running there.
    await asyncio.wait_for(servicer.cancelled.wait(), timeout=10)


async def test_unreachable_target_fails_every_request_without_hanging() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")  # reserve a port, then close it: nobody listens
    await server.start()
    await server.stop(0)
    records = await replay(GatewayTarget(f"127.0.0.1:{port}", KEY), requests(3), ["a", "b", "c"], timeout_s=30)
    assert [r.status for r in records] == ["UNAVAILABLE"] * 3


async def test_run_deadline_aborts_in_flight_and_counts_unsent(gateway: tuple[str, StreamingGateway]) -> None:
    address, _ = gateway
    reqs = [TraceRequest(0, 0.0, 3, 4), TraceRequest(1, 0.0, 3, 4), TraceRequest(2, 120.0, 3, 4)]
    records = await replay(GatewayTarget(address, KEY), reqs, ["a", "hang", "b"], timeout_s=60, run_deadline_s=1.0)
    assert [r.status for r in records] == ["ok", "aborted", "not_sent"]
    assert records[2].sent_s is None


async def test_warmup_requests_are_sent_first_and_not_recorded(gateway: tuple[str, StreamingGateway]) -> None:
    address, servicer = gateway
    records = await replay(GatewayTarget(address, KEY), requests(3, output_tokens=6), ["a", "b", "c"], timeout_s=30,
                           warmup_requests=2)
    assert [r.index for r in records] == [0, 1, 2] and all(r.status == "ok" for r in records)
    assert all(r.output_tokens == 6 for r in records)
    assert [(r.request_id, r.sampling.max_tokens) for r in servicer.requests[:2]] == [
        ("bench-warmup-1", 4), ("bench-warmup-2", 4)]
    assert sorted(r.request_id for r in servicer.requests[2:]) == ["bench-0", "bench-1", "bench-2"]


async def test_stop_event_ends_the_run_and_keeps_the_records(gateway: tuple[str, StreamingGateway]) -> None:
    address, _ = gateway
    stop = asyncio.Event()
    reqs = [TraceRequest(0, 0.0, 3, 4), TraceRequest(1, 0.0, 3, 4), TraceRequest(2, 120.0, 3, 4)]

    def on_done(record: RequestRecord) -> None:
        if record.index == 0:
            stop.set()  # as Ctrl-C does in `switchboard bench run`

    records = await replay(GatewayTarget(address, KEY), reqs, ["a", "hang", "b"], timeout_s=60, on_done=on_done,
                           stop=stop)
    assert [r.status for r in records] == ["ok", "aborted", "not_sent"]
