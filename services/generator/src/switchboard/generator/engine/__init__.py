"""The generator's inference engine: paged KV cache, continuous batching, prefix caching.

Public API (what the gRPC servicer uses)::

    engine = Engine(loaded_model, EngineConfig(...))
    await engine.start()
    async for out in engine.generate(EngineRequest(...)): ...
    engine.load(); engine.info; await engine.stop()
"""

from switchboard.generator.engine.types import (
    EngineConfig,
    EngineInfo,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    QueueFull,
    RequestFailedInEngine,
    RequestRejected,
    Usage,
)


def __getattr__(name: str) -> object:
    # Engine is imported on first use: it imports torch, which the remote backend never loads.
    if name == "Engine":
        from switchboard.generator.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "EngineLoad",
    "EngineOutput",
    "EngineRequest",
    "QueueFull",
    "RequestFailedInEngine",
    "RequestRejected",
    "Usage",
]
