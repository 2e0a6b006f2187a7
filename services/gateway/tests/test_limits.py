"""The public gateway's limits before work, and clean statuses for malformed input.

A real gateway (its own settings' server limits, from `load_settings`) in-process, a stand-in
router and replica over real channels, and a spy on the key check: a 16 MiB message is refused
with RESOURCE_EXHAUSTED by gRPC before the servicer or auth runs; the largest valid request is
served; undecodable bytes answer INVALID_ARGUMENT naming the message type, auth not consulted;
a replica's finish reason this build does not know (a newer generator) is no INTERNAL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.common.errors import error_details
from switchboard.common.settings import SettingsError, load_settings, method_message_limits
from switchboard.gateway.auth import Authenticator
from switchboard.gateway.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, GatewaySettings
from switchboard.gateway.keys import add_key, new_key
from switchboard.gateway.principal import Principal
from switchboard.gateway.validation import (
    MAX_MODEL_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    maximal_request_bytes,
)
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    generator_pb2,
    generator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

from .test_token_ids import grpc_server, started_gateway

WIDE = "\U0001f600"  # 4 bytes in UTF-8


def load(env: dict[str, str]) -> GatewaySettings:
    return load_settings(
        GatewaySettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT, environ=env
    )


def test_receive_limit_is_sized_to_the_prompt_limit() -> None:
    settings = load({})
    needed = maximal_request_bytes(settings.max_prompt_chars)
    assert needed < settings.server.max_receive_message_bytes <= needed + 64 * 1024
    assert settings.server.max_receive_message_bytes < 16 * 1024 * 1024
    assert settings.server.max_metadata_bytes == 8 * 1024 and settings.server.max_concurrent_streams == 256
    # Raising the prompt limit without the message limit is a start error naming the variable.
    with pytest.raises(SettingsError, match=r"GATEWAY_MAX_RECEIVE_MESSAGE_BYTES.*GATEWAY_MAX_PROMPT_CHARS=100000"):
        load({"GATEWAY_MAX_PROMPT_CHARS": "100000"})
    assert load({"GATEWAY_MAX_PROMPT_CHARS": "100000", "GATEWAY_MAX_RECEIVE_MESSAGE_BYTES": "500000"}).max_prompt_chars == 100_000
    with pytest.raises(SettingsError, match="GATEWAY_MAX_RECEIVE_MESSAGE_BYTES"):
        load({"GATEWAY_MAX_RECEIVE_MESSAGE_BYTES": "huge"})


class FakeRouter(router_pb2_grpc.RouterServicer):
    def __init__(self) -> None:
        self.address = ""

    async def Route(self, request: Any, context: Any) -> router_pb2.RouteResponse:
        candidate = router_pb2.RouteCandidate(expert="e", replica_id="e-1", address=self.address)
        return router_pb2.RouteResponse(request_id=request.request_id or "r1", candidates=[candidate])

    async def Feedback(self, request: Any, context: Any) -> router_pb2.FeedbackResponse:
        return router_pb2.FeedbackResponse()


class FakeReplica(generator_pb2_grpc.GeneratorServicer):
    """Streams one token that ends with a finish reason newer than this build (99)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[generator_pb2.GeneratorGenerateResponse]:
        self.prompts.append(request.prompt)
        yield generator_pb2.GeneratorGenerateResponse(text="x", token_ids=[5], finish_reason=99, usage=common_pb2.Usage(completion_tokens=1))


@asynccontextmanager
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[grpc.aio.Channel, str, list[Any], FakeReplica]]:
    """A real gateway with its default limits; yields a raw channel, a valid key, the auth calls, the replica."""
    keys_file, key = tmp_path / "tenants.yaml", new_key()
    add_key(keys_file, "tenant", key)
    consulted: list[Any] = []
    authenticate = Authenticator.authenticate_metadata

    def spy(self: Authenticator, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        consulted.append(metadata)
        return authenticate(self, metadata)

    monkeypatch.setattr(Authenticator, "authenticate_metadata", spy)
    router, replica = FakeRouter(), FakeReplica()
    async with (
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
    ):
        router.address = replica_addr
        settings = load({"GATEWAY_PORT": "0", "GATEWAY_METRICS_PORT": "0", "GATEWAY_HTTP_PORT": "0", "GATEWAY_DRAIN_SECONDS": "0.2", "ROUTER_ADDR": router_addr, "GATEWAY_TENANTS_FILE": str(keys_file)})
        # The client may send far more than the gateway accepts: the refusal must be the gateway's.
        async with started_gateway(settings, [("grpc.max_send_message_length", 32 * 1024 * 1024)]) as channel:
            yield channel, key, consulted, replica


def largest_valid_request(settings: GatewaySettings) -> gateway_pb2.CompleteRequest:
    return gateway_pb2.CompleteRequest(
        prompt=WIDE * settings.max_prompt_chars,
        sampling=common_pb2.SamplingParams(max_tokens=4, stop=[WIDE * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES),
        model=WIDE * MAX_MODEL_CHARS,
        request_id=WIDE * MAX_REQUEST_ID_CHARS,
        cost_weight=1.0,
    )


async def test_oversized_message_is_refused_before_auth_and_the_largest_valid_one_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load({})
    async with gateway(tmp_path, monkeypatch) as (channel, key, consulted, replica):
        auth = [("authorization", f"Bearer {key}")]
        complete = channel.unary_unary("/switchboard.v1.Gateway/Complete")
        generate = channel.unary_stream("/switchboard.v1.Gateway/Generate")
        huge = gateway_pb2.CompleteRequest(prompt="a" * (16 * 1024 * 1024)).SerializeToString()
        for call in (complete, generate):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                reply = call(huge, metadata=auth, timeout=20)
                if call is complete:
                    await reply
                else:
                    async for _ in reply:
                        pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert consulted == [] and replica.prompts == []
        # The largest valid request passes the transport, auth and validation, and is served.
        largest = largest_valid_request(settings)
        assert largest.ByteSize() <= settings.server.max_receive_message_bytes
        reply = gateway_pb2.CompleteResponse.FromString(await complete(largest.SerializeToString(), metadata=auth, timeout=20))
        assert reply.text == "x" and len(consulted) == 1 and replica.prompts == [largest.prompt]
        # The replica's finish reason 99 (unknown to this build) is carried, not an INTERNAL.
        assert reply.finish_reason == 99


async def test_undecodable_bytes_answer_invalid_argument_without_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway(tmp_path, monkeypatch) as (channel, key, consulted, replica):
        auth = [("authorization", f"Bearer {key}")]
        for method, kind, message_type in (
            ("Complete", channel.unary_unary, "switchboard.v1.CompleteRequest"),
            ("Generate", channel.unary_stream, "switchboard.v1.GenerateRequest"),
            ("ListModels", channel.unary_unary, "switchboard.v1.ListModelsRequest"),
        ):
            call = kind(f"/switchboard.v1.Gateway/{method}", request_serializer=None, response_deserializer=None)
            # Corrupt wire format; and (for messages with a string field 1) a prompt that is not UTF-8.
            utf8 = () if method == "ListModels" else (b"\x0a\x02\xc3\x28",)
            for garbage in (b"\xff\xff\xff", b"\x0a\x05ab", *utf8):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    reply = call(garbage, metadata=auth, timeout=10)
                    if method == "Generate":
                        async for _ in reply:
                            pass
                    else:
                        await reply
                error = caught.value
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
                assert message_type in (error.details() or "")
                assert not any(leak in (error.details() or "") for leak in ("DecodeError", "Error parsing", "<class", "Unexpected"))
                assert error_details(error)["reason"] == "MALFORMED_REQUEST"
        assert consulted == [] and replica.prompts == []


async def test_a_small_rpc_over_its_method_bound_is_refused_before_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ListModels and Usage carry a tenant name at most: their bound (GATEWAY_MAX_METHOD_MESSAGE_BYTES)
    is a few KiB, far below the prompt-sized message limit, and is checked before decoding or auth."""
    limits = method_message_limits(load({}).server)
    assert "Gateway/Generate" not in limits and "Gateway/Complete" not in limits  # sized to the prompt limit
    async with gateway(tmp_path, monkeypatch) as (channel, key, consulted, replica):
        auth = [("authorization", f"Bearer {key}")]
        for method in ("ListModels", "Usage"):
            bound = limits[f"Gateway/{method}"]
            call = channel.unary_unary(f"/switchboard.v1.Gateway/{method}", request_serializer=None, response_deserializer=None)
            oversized = gateway_pb2.UsageRequest(tenant="t" * bound).SerializeToString()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(oversized, metadata=auth, timeout=10)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, error.code(), error.details())
            assert f"{bound}-byte bound of Gateway/{method}" in (error.details() or "")
            assert "GATEWAY_MAX_METHOD_MESSAGE_BYTES" in (error.details() or "")
            assert error_details(error)["reason"] == "MESSAGE_TOO_LARGE"
        assert consulted == [] and replica.prompts == []
        # Within the bound the call reaches auth and the servicer (whose stand-in router has no ListExperts).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/switchboard.v1.Gateway/ListModels")(b"", metadata=auth, timeout=10)
        assert error_details(caught.value)["reason"] != "MESSAGE_TOO_LARGE" and len(consulted) == 1
