"""Fixtures: a real scheduler server in-process on a free port, and a channel to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from switchboard.common.channels import open_channel
from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.v1 import scheduler_pb2_grpc

# Declared experts; a test leaves one without replicas to see it reported unavailable.
EXPERTS = ("bard-small", "milton-small", "scribe-large")


@asynccontextmanager
async def running_scheduler(
    heartbeat_seconds: float = 1.0,
    expiry_seconds: float = 5.0,
    port: int = 0,
    slos: dict[str, Any] | None = None,
    **settings_fields: Any,
) -> AsyncIterator[SchedulerApp]:
    """Start a scheduler on loopback (port 0 = a free one) and stop it on exit; `settings_fields`
    are further SchedulerSettings fields (placement_policy=...), `slos` the experts' objectives."""
    settings = SchedulerSettings(
        server=ServerSettings(host="127.0.0.1", port=port, metrics_port=0, drain_seconds=0.5),
        heartbeat_seconds=heartbeat_seconds,
        expiry_seconds=expiry_seconds,
        **settings_fields,
    )
    app = SchedulerApp(settings, EXPERTS, slos=slos)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.service.started)
    try:
        yield app
    finally:
        app.service.stop()
        await task


@pytest.fixture
def scheduler_factory() -> Callable[..., object]:
    """`async with scheduler_factory(expiry_seconds=...) as app:` for tests that need their own settings."""
    return running_scheduler


@pytest.fixture
async def scheduler() -> AsyncIterator[SchedulerApp]:
    """A scheduler with the default settings."""
    async with running_scheduler() as app:
        yield app


@pytest.fixture
async def stub(scheduler: SchedulerApp) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
    """A client stub over a real channel to `scheduler`."""
    channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    try:
        yield scheduler_pb2_grpc.SchedulerStub(channel)
    finally:
        await channel.close()
