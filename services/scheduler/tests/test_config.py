"""Scheduler settings from the environment: defaults and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.common.settings import SettingsError, load_settings
from switchboard.scheduler.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, SchedulerSettings


def load(environ: dict[str, str]) -> SchedulerSettings:
    return load_settings(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        environ=environ,
    )


def test_defaults() -> None:
    settings = load({})
    assert settings.server.port == 50053 and settings.server.metrics_port == 9103
    assert settings.heartbeat_seconds == 1.0 and settings.expiry_seconds == 5.0
    assert settings.experts_config == Path("config/experts.yaml")


def test_values_from_environment() -> None:
    settings = load(
        {"SCHEDULER_PORT": "6000", "SCHEDULER_EXPIRY_SECONDS": "2.5", "SCHEDULER_HEARTBEAT_SECONDS": "0.5"}
    )
    assert (
        settings.server.port == 6000 and settings.expiry_seconds == 2.5 and settings.heartbeat_seconds == 0.5
    )


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"SCHEDULER_EXPIRY_SECONDS": "soon"}, "SCHEDULER_EXPIRY_SECONDS"),
        ({"SCHEDULER_HEARTBEAT_SECONDS": "0"}, "SCHEDULER_HEARTBEAT_SECONDS"),
        (
            {"SCHEDULER_EXPIRY_SECONDS": "1.0", "SCHEDULER_HEARTBEAT_SECONDS": "2.0"},
            "SCHEDULER_EXPIRY_SECONDS",
        ),
    ],
)
def test_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(environ)


def test_readme_documents_every_variable() -> None:
    """The README's configuration table lists exactly the variables the settings read, with their defaults."""
    from switchboard.common.settings import settings_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    docs = settings_reference(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    for doc in docs:
        assert f"| `{doc.env}` | `{doc.default}` |" in readme, doc.env
