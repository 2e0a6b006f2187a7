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
    assert settings.placement_policy == "least-loaded" and settings.placement_seed == 0


def test_placement_policy_and_seed_from_environment() -> None:
    settings = load({"SCHEDULER_PLACEMENT_POLICY": "Power-Of-Two", "SCHEDULER_PLACEMENT_SEED": "42"})
    assert settings.placement_policy == "power-of-two" and settings.placement_seed == 42


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
        ({"SCHEDULER_PLACEMENT_POLICY": "random"}, "SCHEDULER_PLACEMENT_POLICY"),
        ({"SCHEDULER_PLACEMENT_SEED": "-1"}, "SCHEDULER_PLACEMENT_SEED"),
        ({"SCHEDULER_PLACEMENT_SEED": "lucky"}, "SCHEDULER_PLACEMENT_SEED"),
        (
            {"SCHEDULER_EXPIRY_SECONDS": "1.0", "SCHEDULER_HEARTBEAT_SECONDS": "2.0"},
            "SCHEDULER_EXPIRY_SECONDS",
        ),
    ],
)
def test_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(environ)


def test_bad_policy_is_a_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `python -m switchboard.scheduler` reads at start refuses an unknown policy, naming the variable
    and the choices (run_service turns it into one line and exit code 2)."""
    from switchboard.scheduler.__main__ import load as load_at_start

    monkeypatch.setenv("SCHEDULER_PLACEMENT_POLICY", "fastest")
    with pytest.raises(SettingsError) as info:
        load_at_start()
    assert str(info.value).startswith("SCHEDULER_PLACEMENT_POLICY: must be one of least-loaded, ")
    assert "'fastest'" in str(info.value)


def test_readme_documents_every_variable() -> None:
    """The README's configuration table lists exactly the variables the settings read, with their defaults."""
    from switchboard.common.settings import reference_markdown, settings_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    docs = settings_reference(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    for doc in docs:
        assert f"| `{doc.env}` | `{doc.default}` |" in readme, doc.env
    # And the whole table, meanings and order included, is the one the settings generate.
    assert reference_markdown(docs) in readme
