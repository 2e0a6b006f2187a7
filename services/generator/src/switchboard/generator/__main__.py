"""Entry point: `python -m switchboard.generator` (or the `switchboard-generator` script)."""

from __future__ import annotations

import asyncio

from switchboard.common.logging import get_logger
from switchboard.common.service import run_service
from switchboard.generator.config import (
    GeneratorSettings,
    load_generator_settings,
    resolve_device,
    resolve_model_path,
)

log = get_logger("switchboard.generator.main")

MODEL_LOAD_EXIT_CODE = 1


def load() -> GeneratorSettings:
    """Settings plus the model folder check, so a wrong GENERATOR_MODEL fails at start with one clear line."""
    settings = load_generator_settings()
    resolve_model_path(settings.model)
    return settings


async def serve(settings: GeneratorSettings) -> int:
    """Load the model, start the engine, serve until SIGTERM/SIGINT; returns the exit code."""
    # Imported here: torch is heavy and logging is configured by run_service before this runs.
    from switchboard.generator.app import GeneratorApp, engine_config
    from switchboard.generator.engine import Engine
    from switchboard.generator.loader import ModelLoadError, load_model

    path = resolve_model_path(settings.model)
    device = resolve_device(settings.device)
    log.info("loading model", path=str(path), device=device, dtype=settings.dtype)
    try:
        loaded = await asyncio.to_thread(load_model, path, device, settings.dtype)
    except ModelLoadError as exc:
        log.error("cannot load model", error=str(exc))
        return MODEL_LOAD_EXIT_CODE
    engine = Engine(loaded, engine_config(settings))
    return await GeneratorApp(settings, engine).run()


def main() -> None:
    """Console entry point."""
    run_service("generator", load, serve)


if __name__ == "__main__":
    main()
