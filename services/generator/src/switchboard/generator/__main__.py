"""Entry point: `python -m switchboard.generator` (or the `switchboard-generator` script)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools

from switchboard.common.logging import get_logger
from switchboard.common.service import run_service
from switchboard.generator.config import (
    GeneratorSettings,
    load_cost_profile,
    load_generator_settings,
    resolve_device,
    resolve_model_path,
)

log = get_logger("switchboard.generator.main")

MODEL_LOAD_EXIT_CODE = 1


def load() -> GeneratorSettings:
    """Settings plus the model folder and cost profile checks, so a wrong GENERATOR_MODEL or
    GENERATOR_COST_PROFILE fails at start with one clear line."""
    settings = load_generator_settings()
    if settings.backend == "local" or settings.model:
        resolve_model_path(settings.model)
    load_cost_profile(settings.cost_profile)
    return settings


async def serve(settings: GeneratorSettings) -> int:
    """Load the model, start the engine, serve until SIGTERM/SIGINT; returns the exit code."""
    if settings.backend == "remote":
        return await serve_remote(settings)
    # Imported here: torch is heavy and logging is configured by run_service before this runs.
    from switchboard.generator.app import GeneratorApp, engine_config
    from switchboard.generator.engine import Engine
    from switchboard.generator.engine.engine import model_fingerprint
    from switchboard.generator.loader import ModelLoadError, load_model

    path = resolve_model_path(settings.model)
    device = resolve_device(settings.device)
    log.info("loading model", path=str(path), device=device, dtype=settings.dtype, quantize=settings.quantize)
    # One thread does all of this replica's torch work (loading, engine setup, every step) while
    # the event loop stays free for gRPC: on CPU, steps on any thread but the one that loaded
    # the model ran 2-3x slower (see EngineConfig.step_in_thread).
    compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-compute")
    loop = asyncio.get_running_loop()
    try:
        try:
            loaded = await loop.run_in_executor(
                compute, load_model, path, device, settings.dtype, settings.quantize
            )
        except ModelLoadError as exc:
            log.error("cannot load model", error=str(exc))
            return MODEL_LOAD_EXIT_CODE
        config = engine_config(settings, model_identity=model_fingerprint(loaded))
        build = functools.partial(Engine, loaded, config, step_executor=compute)
        engine = await loop.run_in_executor(compute, build)
        return await GeneratorApp(settings, engine).run()
    finally:
        compute.shutdown(wait=False)


async def serve_remote(settings: GeneratorSettings) -> int:
    """Front the remote engine server (no model, no torch); returns the exit code."""
    from switchboard.generator.app import GeneratorApp
    from switchboard.generator.remote import remote_engine

    engine = remote_engine(settings)
    log.info("fronting a remote engine", url=settings.remote_url, model=engine.remote.model)
    return await GeneratorApp(settings, engine).run()  # type: ignore[arg-type]


def main() -> None:
    """Console entry point."""
    run_service("generator", load, serve)


if __name__ == "__main__":
    main()
