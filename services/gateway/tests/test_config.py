"""Gateway settings: defaults, bounds, the keys-file check, and the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.common.settings import SettingsError, load_settings, settings_reference
from switchboard.gateway.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    SERVER_PREFIX,
    GatewaySettings,
    load_gateway_settings,
)


def load(env: dict[str, str]) -> GatewaySettings:
    return load_settings(
        GatewaySettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT, environ=env
    )


def test_defaults() -> None:
    settings = load({})
    assert settings.server.port == 50051 and settings.server.metrics_port == 9101
    assert settings.router_addr == "127.0.0.1:50052"
    assert (settings.default_max_tokens, settings.max_tokens_limit) == (64, 4096)


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_MAX_PROMPT_CHARS"):
        load({"GATEWAY_MAX_PROMPT_CHARS": "0"})
    with pytest.raises(SettingsError, match="GATEWAY_DEFAULT_MAX_TOKENS"):
        load({"GATEWAY_DEFAULT_MAX_TOKENS": "100", "GATEWAY_MAX_TOKENS_LIMIT": "50"})


def test_missing_keys_file_is_a_start_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TENANTS_FILE", str(tmp_path / "absent.jsonl"))
    with pytest.raises(SettingsError, match=r"GATEWAY_TENANTS_FILE.*keys add"):
        load_gateway_settings()


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for doc in settings_reference(
        GatewaySettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT
    ):
        assert f"| `{doc.env}` | `{doc.default}` | {doc.doc} |" in readme, doc.env
