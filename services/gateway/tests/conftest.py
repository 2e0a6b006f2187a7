"""Fixtures: a real scheduler, router and gateway in-process on free ports, with a keys file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from switchboard.common.channels import open_channel
from switchboard.common.experts_config import load_experts_config
from switchboard.common.service import GrpcService, wait_started
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.keys import add_key, new_key
from switchboard.gateway.server import gateway_service as make_gateway_service
from switchboard.gateway.server import serve as serve_gateway
from switchboard.router.config import RouterSettings
from switchboard.router.server import serve as serve_router
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.v1 import gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
EXPERTS_CONFIG = REPO_ROOT / "config" / "experts.yaml"


@dataclass
class Stack:
    """A running scheduler + router + gateway, a valid key and stubs."""

    gateway: gateway_pb2_grpc.GatewayStub
    scheduler: scheduler_pb2_grpc.SchedulerStub
    key: str
    keys_file: Path

    def auth(self, key: str | None = None) -> list[tuple[str, str]]:
        """Metadata carrying `key` (the valid key by default)."""
        return [("authorization", f"Bearer {key or self.key}")]

    async def register(self, replica_id: str, expert: str, address: str) -> None:
        """Register a replica with the scheduler (as a generator would)."""
        await self.scheduler.Register(
            scheduler_pb2.RegisterRequest(
                replica_id=replica_id, expert=expert, address=address, device="cpu", model_name=expert, max_model_len=256
            )
        )


@asynccontextmanager
async def running_stack(tmp_path: Path, **gateway_overrides: object) -> AsyncIterator[Stack]:
    """Scheduler, router and gateway on loopback; everything stopped on exit."""
    keys_file = tmp_path / "tenants.yaml"
    key = new_key()
    add_key(keys_file, "test-tenant", key)
    tasks: list[tuple[asyncio.Task[int], GrpcService]] = []
    channels = []
    try:
        experts = [spec.name for spec in load_experts_config(EXPERTS_CONFIG)]
        scheduler = SchedulerApp(SchedulerSettings(server=ServerSettings(port=0, drain_seconds=0.2)), experts)
        tasks.append((asyncio.create_task(scheduler.run(handle_signals=False)), scheduler.service))
        await wait_started(tasks[-1][0], tasks[-1][1].started)
        router_service = GrpcService("router", ServerSettings(port=0, drain_seconds=0.2))
        router_settings = RouterSettings(
            server=router_service.settings,
            scheduler_addr=f"127.0.0.1:{scheduler.service.port}",
            experts_config=EXPERTS_CONFIG,
        )
        tasks.append((asyncio.create_task(serve_router(router_settings, router_service, False)), router_service))
        await wait_started(tasks[-1][0], tasks[-1][1].started)
        gateway_service = make_gateway_service(ServerSettings(port=0, drain_seconds=0.2))
        settings = GatewaySettings(
            server=gateway_service.settings,
            router_addr=f"127.0.0.1:{router_service.port}",
            tenants_file=keys_file,
            **{"max_prompt_chars": 200, "default_max_tokens": 8, "max_tokens_limit": 64, "http_port": 0, **gateway_overrides},  # type: ignore[arg-type]
        )
        tasks.append((asyncio.create_task(serve_gateway(settings, gateway_service, False)), gateway_service))
        await wait_started(tasks[-1][0], tasks[-1][1].started)
        gateway_channel = open_channel(f"127.0.0.1:{gateway_service.port}")
        scheduler_channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
        channels += [gateway_channel, scheduler_channel]
        yield Stack(
            gateway_pb2_grpc.GatewayStub(gateway_channel),
            scheduler_pb2_grpc.SchedulerStub(scheduler_channel),
            key,
            keys_file,
        )
    finally:
        for channel in channels:
            await channel.close()
        for task, service in reversed(tasks):
            service.stop()
            await task


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Scheduler + router + gateway with test limits (prompt 200 chars, max_tokens 64)."""
    async with running_stack(tmp_path) as running:
        yield running
