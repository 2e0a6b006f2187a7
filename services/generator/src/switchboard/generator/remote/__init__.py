"""The remote backend (GENERATOR_BACKEND=remote): a replica that fronts an OpenAI-compatible engine
server (vLLM, SGLang, TGI, `transformers serve`) instead of loading a model.

`core` is pure (SSE framing, completion chunks, finish reasons, Prometheus text into load), `client`
the HTTP adapter (httpx), `engine.RemoteEngine` the engine API the servicer and registrar use.
"""

from __future__ import annotations

import json
from pathlib import Path

from switchboard.generator.config import GeneratorSettings
from switchboard.generator.remote.client import EngineRefused, EngineUnavailable, RemoteClient
from switchboard.generator.remote.engine import RemoteConfig, RemoteEngine

__all__ = [
    "EngineRefused",
    "EngineUnavailable",
    "RemoteClient",
    "RemoteConfig",
    "RemoteEngine",
    "remote_engine",
]


def remote_engine(settings: GeneratorSettings) -> RemoteEngine:
    """The RemoteEngine GeneratorSettings ask for. GENERATOR_MODEL, when it names a folder, gives
    the context length (config.json `max_position_embeddings`) when neither the setting nor the
    engine's /v1/models states one, and, with token ids
    on, the tokenizer fingerprint announced (so the router's ids are sent to the engine as they are)."""
    from switchboard.common.tokenizer_fingerprint import tokenizer_fingerprint

    model = settings.model
    folder = Path(model).expanduser() if model else None
    fallback = 0
    fingerprint = ""
    if folder is not None and folder.is_dir():
        config = folder / "config.json"
        if config.is_file():
            value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
            fallback = value if isinstance(value, int) and value > 0 else 0
        tokenizer = folder / "tokenizer.json"
        if settings.remote_token_ids and tokenizer.is_file():
            fingerprint = tokenizer_fingerprint(tokenizer.read_bytes())
    config = RemoteConfig(
        url=settings.remote_url,
        model=settings.remote_model or model,
        max_model_len=settings.remote_max_model_len,
        fallback_max_model_len=fallback,
        token_ids=settings.remote_token_ids,
        engine=settings.remote_engine,
        poll_seconds=settings.remote_poll_seconds,
        max_waiting=settings.max_waiting,
    )
    return RemoteEngine(config, tokenizer_fingerprint=fingerprint)
