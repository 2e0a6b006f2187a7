"""The router's token ids reach each candidate's replica: the gateway sends every candidate the
tokenization its expert's tokenizer made (on failover too) along with the prompt text.

The router and the replicas are stand-ins served in-process over real channels, so the test
sees exactly what the gateway sent each replica; the real router and generators are exercised
together in tests/test_tokenize_upstream.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from switchboard.common.channels import open_channel
from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.core import generator_requests
from switchboard.gateway.keys import add_key, new_key
from switchboard.gateway.server import gateway_service, serve
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

FP_A, FP_B = "a" * 64, "b" * 64
SAMPLING = common_pb2.SamplingParams(max_tokens=4)


def decision(*candidates: tuple[str, str, str]) -> router_pb2.RouteResponse:
    """A routing answer: candidates (expert, address, fingerprint) and tokenizations for A and B."""
    return router_pb2.RouteResponse(
        request_id="r1",
        candidates=[
            router_pb2.RouteCandidate(expert=e, replica_id=f"{e}-1", address=a, tokenizer_fingerprint=f)
            for e, a, f in candidates
        ],
        tokenizations=[
            router_pb2.PromptTokenization(tokenizer_fingerprint=FP_A, token_ids=[1, 2, 3]),
            router_pb2.PromptTokenization(tokenizer_fingerprint=FP_B, token_ids=[7, 8]),
        ],
    )


def test_one_request_per_tokenizer_each_with_its_ids_and_the_text() -> None:
    answer = decision(("a", "h:1", FP_A), ("b", "h:2", FP_B), ("a2", "h:3", FP_A), ("c", "h:4", ""), ("d", "h:5", "c" * 64))
    requests = generator_requests("r1", "the prompt", SAMPLING, answer)
    assert set(requests) == {"", FP_A, FP_B, "c" * 64}
    assert list(requests[FP_A].prompt_token_ids) == [1, 2, 3] and requests[FP_A].tokenizer_fingerprint == FP_A
    assert list(requests[FP_B].prompt_token_ids) == [7, 8] and requests[FP_B].tokenizer_fingerprint == FP_B
    # No tokenizer, or a fingerprint the answer has no tokenization for: the text only.
    for fingerprint in ("", "c" * 64):
        assert list(requests[fingerprint].prompt_token_ids) == [] and requests[fingerprint].tokenizer_fingerprint == ""
    assert all(r.prompt == "the prompt" and r.request_id == "r1" and r.sampling == SAMPLING for r in requests.values())


class FakeRouter(router_pb2_grpc.RouterServicer):
    """Answers every Route with a fixed decision."""

    def __init__(self, answer: router_pb2.RouteResponse) -> None:
        self.answer = answer

    async def Route(self, request, context):
        return self.answer

    async def Feedback(self, request, context):
        return router_pb2.FeedbackResponse()


class FakeReplica(generator_pb2_grpc.GeneratorServicer):
    """Records what it was sent; fails before the first token when `fail` is set, else streams one token."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.requests: list[generator_pb2.GeneratorGenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica is draining")
        yield generator_pb2.GeneratorGenerateResponse(
            text="x", token_ids=[5], finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=common_pb2.Usage(completion_tokens=1)
        )


@asynccontextmanager
async def started_gateway(settings: GatewaySettings, channel_options: Sequence[tuple[str, Any]] = ()) -> AsyncIterator[grpc.aio.Channel]:
    """A real gateway serving `settings` (port 0: the OS picks), and a channel to it; stopped after."""
    service = gateway_service(settings.server)
    task = asyncio.create_task(serve(settings, service, False))
    await wait_started(task, service.started)
    address = f"127.0.0.1:{service.port}"
    channel = grpc.aio.insecure_channel(address, options=list(channel_options)) if channel_options else open_channel(address)
    try:
        yield channel
    finally:
        await channel.close()
        service.stop()
        await task


@asynccontextmanager
async def grpc_server(add) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_failover_sends_the_next_candidate_its_own_experts_ids(tmp_path: Path) -> None:
    failing, serving = FakeReplica(fail=True), FakeReplica(fail=False)
    router = FakeRouter(router_pb2.RouteResponse())
    keys_file, key = tmp_path / "tenants.yaml", new_key()
    add_key(keys_file, "tenant", key)
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(failing, s)) as first,
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(serving, s)) as second,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        router.answer = decision(("a", first, FP_A), ("b", second, FP_B))
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2), router_addr=router_addr, tenants_file=keys_file, http_port=0
        )
        async with started_gateway(settings) as channel:
            reply = await gateway_pb2_grpc.GatewayStub(channel).Complete(
                gateway_pb2.CompleteRequest(prompt="To be", sampling=SAMPLING),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=20,
            )
    assert reply.text == "x" and reply.model == "b"
    (sent_first,) = failing.requests
    (sent_second,) = serving.requests
    assert (list(sent_first.prompt_token_ids), sent_first.tokenizer_fingerprint, sent_first.prompt) == ([1, 2, 3], FP_A, "To be")
    assert (list(sent_second.prompt_token_ids), sent_second.tokenizer_fingerprint, sent_second.prompt) == ([7, 8], FP_B, "To be")
