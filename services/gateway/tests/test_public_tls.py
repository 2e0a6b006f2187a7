"""The gateway's public ports over TLS (GATEWAY_PUBLIC_TLS_*), and its internal calls with mutual TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from switchboard.common.pki import LocalCA
from switchboard.common.service import GrpcService, wait_started
from switchboard.common.settings import ServerSettings, SettingsError
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.server import gateway_service, public_tls_files, serve
from switchboard.gateway.tenants import hash_key
from switchboard.router.server import IDENTITY_POLICY as ROUTER_POLICY
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2_grpc, router_pb2_grpc

from .redis_server import free_port
from .test_http_front import TENANTS, ListingRouter, StreamingReplica
from .test_tenant_rules import Replica
from .test_token_ids import FP_A, decision, grpc_server


async def test_public_grpc_and_http_ports_serve_tls(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path / "pki")
    public = ca.issue("gateway")  # a certificate for localhost and 127.0.0.1 from a CA the client trusts
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS.format(main=hash_key("main-key"), scoped=hash_key("s"), slow=hash_key("t")))
    replica, router = StreamingReplica(), ListingRouter(None)
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        router.answer = decision(("a", replica_addr, FP_A))
        http_port = free_port()
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr,
            tenants_file=tenants,
            http_port=http_port,
            public_tls_cert_file=public.cert_file,
            public_tls_key_file=public.key_file,
        )
        service = gateway_service(settings.server, public_tls_files(settings))
        task = asyncio.create_task(serve(settings, service, False))
        await wait_started(task, service.started)
        try:
            ca_pem = ca.ca_file.read_bytes()
            async with grpc.aio.secure_channel(f"localhost:{service.port}", grpc.ssl_channel_credentials(ca_pem)) as channel:
                reply = await gateway_pb2_grpc.GatewayStub(channel).Complete(
                    gateway_pb2.CompleteRequest(prompt="To be", sampling=common_pb2.SamplingParams(max_tokens=2)),
                    metadata=[("authorization", "Bearer main-key")],
                    timeout=10,
                )
                assert reply.text == "To be"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await gateway_pb2_grpc.GatewayStub(plain).Complete(gateway_pb2.CompleteRequest(prompt="x"), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            client = openai.AsyncOpenAI(
                base_url=f"https://localhost:{http_port}/v1",
                api_key="main-key",
                max_retries=0,
                http_client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca.ca_file))),
            )
            completion = await client.completions.create(model="auto", prompt="To be", max_tokens=2)
            assert completion.choices[0].text == "To be"
        finally:
            service.stop()
            await task


async def test_the_gateway_calls_the_router_with_its_own_identity(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path / "pki")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS.format(main=hash_key("main-key"), scoped=hash_key("s"), slow=hash_key("t")))
    replica, router = Replica(), ListingRouter(None)
    # The router runs mutual TLS with its policy: only the gateway's certificate may Route.
    router_service = GrpcService(
        "router", ServerSettings(port=0, drain_seconds=0.1, tls=ca.issue("router")), identity_policy=ROUTER_POLICY
    )
    router_pb2_grpc.add_RouterServicer_to_server(router, router_service.server)
    router_task = asyncio.create_task(router_service.run(["switchboard.v1.Router"], handle_signals=False))
    await wait_started(router_task, router_service.started)
    generator = GrpcService(
        "generator",
        ServerSettings(port=0, drain_seconds=0.1, tls=ca.issue("generator/g-0")),
        identity_policy={"/switchboard.v1.Generator/Generate": frozenset({"gateway"})},
    )
    generator_pb2_grpc.add_GeneratorServicer_to_server(replica, generator.server)
    generator_task = asyncio.create_task(generator.run(["switchboard.v1.Generator"], handle_signals=False))
    await wait_started(generator_task, generator.started)
    try:
        router.answer = decision(("a", f"127.0.0.1:{generator.port}", FP_A))
        for identity, expected in (("gateway", grpc.StatusCode.OK), ("operator", grpc.StatusCode.UNAVAILABLE)):
            settings = GatewaySettings(
                server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.1, tls=ca.issue(identity)),
                router_addr=f"127.0.0.1:{router_service.port}",
                tenants_file=tenants,
                http_port=0,
            )
            service = gateway_service(settings.server)
            task = asyncio.create_task(serve(settings, service, False))
            await wait_started(task, service.started)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                    call = gateway_pb2_grpc.GatewayStub(channel).Complete(
                        gateway_pb2.CompleteRequest(prompt="x", sampling=common_pb2.SamplingParams(max_tokens=2)),
                        metadata=[("authorization", "Bearer main-key")],
                        timeout=10,
                    )
                    if expected == grpc.StatusCode.OK:
                        assert (await call).text == "ww"
                    else:
                        # A gateway with another role's certificate is refused by the router: the caller
                        # sees the router as unusable, never a leak of the refusal's details.
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await call
                        assert refused.value.code() == expected
            finally:
                service.stop()
                await task
    finally:
        router_service.stop()
        generator.stop()
        await router_task
        await generator_task


def test_public_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="set both or neither"):
        GatewaySettings(server=ServerSettings(), tenants_file=tmp_path, public_tls_cert_file=tmp_path / "c.pem")
