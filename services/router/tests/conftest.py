"""Fixtures: a real scheduler and a real router, in-process on free ports, and a stub to the router."""

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
from switchboard.router.config import RouterSettings
from switchboard.router.server import serve
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.v1 import router_pb2_grpc, scheduler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
EXPERTS_CONFIG = REPO_ROOT / "config" / "experts.yaml"


@pytest.fixture
def repo_root() -> Path:
    """The repository root (where config/experts.yaml lives)."""
    return REPO_ROOT


@dataclass
class Stack:
    """A running scheduler + router pair."""

    scheduler: SchedulerApp
    scheduler_stub: scheduler_pb2_grpc.SchedulerStub
    router: router_pb2_grpc.RouterStub
    router_service: GrpcService


@asynccontextmanager
async def running_stack(
    max_alternates: int = 2,
    scheduler_alive: bool = True,
    experts_config: Path = EXPERTS_CONFIG,
    **router_settings: object,
) -> AsyncIterator[Stack]:
    """Scheduler and router on loopback; scheduler_alive=False stops the scheduler before yielding.

    router_settings: other RouterSettings fields (gate_path, load_poll_seconds, ...).
    """
    experts = [spec.name for spec in load_experts_config(experts_config)]
    scheduler = SchedulerApp(
        SchedulerSettings(server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2)), experts
    )
    scheduler_task = asyncio.create_task(scheduler.run(handle_signals=False))
    await wait_started(scheduler_task, scheduler.service.started)
    settings = RouterSettings(
        server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
        scheduler_addr=f"127.0.0.1:{scheduler.service.port}",
        experts_config=experts_config,
        max_alternates=max_alternates,
        **{"scheduler_timeout_seconds": 1.0, **router_settings},  # type: ignore[arg-type]
    )
    service = GrpcService("router", settings.server)
    router_task = asyncio.create_task(serve(settings, service, handle_signals=False))
    await wait_started(router_task, service.started)
    sched_channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    router_channel = open_channel(f"127.0.0.1:{service.port}")
    try:
        if not scheduler_alive:
            scheduler.service.stop()
            await scheduler_task
        yield Stack(
            scheduler,
            scheduler_pb2_grpc.SchedulerStub(sched_channel),
            router_pb2_grpc.RouterStub(router_channel),
            service,
        )
    finally:
        await router_channel.close()
        await sched_channel.close()
        service.stop()
        await router_task
        if not scheduler_task.done():
            scheduler.service.stop()
            await scheduler_task


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """Scheduler + router with default settings."""
    async with running_stack() as running:
        yield running
