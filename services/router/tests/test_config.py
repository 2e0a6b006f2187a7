"""Router settings: defaults, bounds, and the README's table kept in step with them."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.common.settings import SettingsError, load_settings, settings_reference
from switchboard.router.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, RouterSettings


def load(env: dict[str, str]) -> RouterSettings:
    return load_settings(
        RouterSettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT, environ=env
    )


def test_defaults_and_overrides() -> None:
    settings = load({})
    assert settings.server.port == 50052 and settings.server.metrics_port == 9102
    assert settings.scheduler_addr == "127.0.0.1:50053" and settings.max_alternates == 2
    assert load({"ROUTER_MAX_ALTERNATES": "5"}).max_alternates == 5


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="ROUTER_MAX_ALTERNATES"):
        load({"ROUTER_MAX_ALTERNATES": "12"})
    with pytest.raises(SettingsError, match="ROUTER_CUMULATIVE_THRESHOLD"):
        load({"ROUTER_CUMULATIVE_THRESHOLD": "abc"})
    with pytest.raises(SettingsError, match="ROUTER_EXPLORATION"):
        load({"ROUTER_EXPLORATION": "0.5"})  # exploration is capped


def test_tenant_cost_weights_parse_or_name_the_variable() -> None:
    from switchboard.router.config import parse_tenant_cost_weights

    assert parse_tenant_cost_weights(load({"ROUTER_TENANT_COST_WEIGHTS": "acme=0.2, free=1"}).tenant_cost_weights) == {
        "acme": 0.2,
        "free": 1.0,
    }
    for bad in ("acme", "acme=-1", "=0.3", "acme=cheap"):
        with pytest.raises(SettingsError, match="ROUTER_TENANT_COST_WEIGHTS"):
            parse_tenant_cost_weights((bad,))


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for doc in settings_reference(
        RouterSettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT
    ):
        assert f"| `{doc.env}` | `{doc.default}` | {doc.doc} |" in readme, doc.env


def test_missing_experts_config_is_a_start_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from switchboard.router.config import load_router_settings

    monkeypatch.setenv("SWITCHBOARD_EXPERTS_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(SettingsError, match=r"SWITCHBOARD_EXPERTS_CONFIG: .*not found"):
        load_router_settings()
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  - name: Bad Name\n    model: x\n")
    monkeypatch.setenv("SWITCHBOARD_EXPERTS_CONFIG", str(bad))
    with pytest.raises(SettingsError, match=r"experts\[0\]\.name"):
        load_router_settings()
