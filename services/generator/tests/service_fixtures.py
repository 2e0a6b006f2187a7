"""Helpers for the generator service tests: a tiny model folder and an in-process generator server.

Reuses the engine tests' tiny random Llama (`engine_fixtures.build_llama`, built with transformers)
so every test talks to the real loader, engine and gRPC server over a real channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.generator.app import GeneratorApp, engine_config
from switchboard.generator.config import GeneratorSettings
from switchboard.generator.engine import Engine
from switchboard.generator.loader import LoadedModel


def generator_settings(model: str, **overrides: Any) -> GeneratorSettings:
    """Settings for a test replica on a free loopback port, no metrics port, 4 MiB of KV cache."""
    base = GeneratorSettings(
        server=ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0.5),
        model=model,
        expert="bard-small",
        kv_cache_mb=4,
        max_num_seqs=8,
        default_max_tokens=8,
        scheduler_addr="",
    )
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def running_generator(loaded: LoadedModel, settings: GeneratorSettings) -> AsyncIterator[GeneratorApp]:
    """Start a generator app (engine + server) and stop it (drain) on exit."""
    app = GeneratorApp(settings, Engine(loaded, engine_config(settings)))
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.ready)
    app.run_task = task  # type: ignore[attr-defined]
    try:
        yield app
    finally:
        if not task.done():
            app.service.stop()
        await task


async def wait_for(predicate: Any, attempts: int = 200, interval: float = 0.05) -> bool:
    """Poll an (async or sync) predicate a bounded number of times; True once it holds."""
    for _ in range(attempts):
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        await asyncio.sleep(interval)
    return False
