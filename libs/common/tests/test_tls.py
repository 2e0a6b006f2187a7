"""Mutual TLS and identity checks on a real server on loopback, with a throwaway CA."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.pki import LocalCA, identity_env
from switchboard.common.service import GrpcService, wait_started
from switchboard.common.settings import ServerSettings, SettingsError, load_server_settings
from switchboard.common.tls import TlsError, TlsIdentity, load_tls_identity, peer_identity, role_of

PING = "/test.Echo/Ping"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsIdentity]:
    folder = tmp_path_factory.mktemp("pki")
    ca = LocalCA.create(folder / "ca")
    other = LocalCA.create(folder / "other")
    identities = {name: ca.issue(name) for name in ("scheduler", "router", "operator", "generator/g-0")}
    identities["impostor"] = other.issue("router")  # the right name from the wrong CA
    return identities


@asynccontextmanager
async def server(identity: TlsIdentity, policy: dict[str, frozenset[str]]) -> AsyncIterator[str]:
    service = GrpcService("scheduler", ServerSettings(port=0, drain_seconds=0.1, tls=identity), identity_policy=policy)
    seen: list[str | None] = []

    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(peer_identity(context))
        return b"pong:" + (seen[-1] or "").encode()

    service.server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)})]
    )
    task = asyncio.create_task(service.run(["test.Echo"], handle_signals=False))
    await wait_started(task, service.started)
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        service.stop()
        await task


async def call(channel: grpc.aio.Channel) -> bytes:
    return await channel.unary_unary(PING)(b"", timeout=5)


async def test_the_allowed_role_is_served_and_others_are_refused(pki: dict[str, TlsIdentity]) -> None:
    async with server(pki["scheduler"], {PING: frozenset({"generator"})}) as address:
        async with open_channel(address, pki["generator/g-0"], peer_role="scheduler") as channel:
            assert await call(channel) == b"pong:generator/g-0"
        async with open_channel(address, pki["operator"], peer_role="scheduler") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_details(refused.value)["reason"] == "IDENTITY_NOT_ALLOWED"
            assert "identity operator may not call Ping (allowed: generator)" in (refused.value.details() or "")
            # Health and reflection answer any peer the transport verified (probes use the service's own).
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_method_missing_from_the_policy_is_refused(pki: dict[str, TlsIdentity]) -> None:
    async with server(pki["scheduler"], {}) as address:
        async with open_channel(address, pki["router"], peer_role="scheduler") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "no identity may" in (refused.value.details() or "")


async def test_no_certificate_a_foreign_ca_or_plaintext_never_reach_a_handler(pki: dict[str, TlsIdentity]) -> None:
    async with server(pki["scheduler"], {PING: frozenset({"router"})}) as address:
        ca, _, _ = pki["router"].pem
        anonymous = grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=ca), options=[("grpc.ssl_target_name_override", "scheduler")]
        )
        for channel in (
            anonymous,
            open_channel(address, pki["impostor"], peer_role="scheduler"),
            grpc.aio.insecure_channel(address),
        ):
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_only_accepts_the_role_it_means_to_call(pki: dict[str, TlsIdentity]) -> None:
    # A process holding a generator's certificate cannot pose as the scheduler.
    async with server(pki["generator/g-0"], {PING: frozenset({"router"})}) as address:
        async with open_channel(address, pki["router"], peer_role="scheduler") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with open_channel(address, pki["router"], peer_role="generator") as channel:
            assert await call(channel) == b"pong:router"


def test_mutual_tls_without_a_policy_is_refused(pki: dict[str, TlsIdentity]) -> None:
    with pytest.raises(ValueError, match="identity policy"):
        GrpcService("router", ServerSettings(tls=pki["router"]))
    with pytest.raises(ValueError, match="peer_role"):
        open_channel("127.0.0.1:1", pki["router"])


def test_the_identity_comes_from_the_environment_and_bad_files_are_named(pki: dict[str, TlsIdentity], tmp_path: Path) -> None:
    env = identity_env(pki["router"])
    settings = load_server_settings("ROUTER", 50052, 9102, env)
    assert settings.tls == pki["router"]
    assert load_server_settings("ROUTER", 50052, 9102, {}).tls is None
    with pytest.raises(TlsError, match="SWITCHBOARD_TLS_KEY_FILE: must be set"):
        load_tls_identity({k: v for k, v in env.items() if not k.endswith("KEY_FILE")})
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(SettingsError, match=r"SWITCHBOARD_TLS_CERT_FILE: .*not\.pem is not a PEM file"):
        load_server_settings("ROUTER", 50052, 9102, {**env, "SWITCHBOARD_TLS_CERT_FILE": str(tmp_path / "not.pem")})
    with pytest.raises(SettingsError, match="cannot read"):
        load_server_settings("ROUTER", 50052, 9102, {**env, "SWITCHBOARD_TLS_CA_FILE": str(tmp_path / "absent.pem")})


def test_roles_and_private_keys() -> None:
    assert role_of("generator/bard-small-0") == "generator" and role_of("router") == "router"


def test_private_keys_are_not_readable_by_others(pki: dict[str, TlsIdentity]) -> None:
    assert pki["router"].key_file.stat().st_mode & 0o077 == 0
