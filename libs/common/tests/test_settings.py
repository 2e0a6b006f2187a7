"""Settings: types, bounds, clear errors, generated reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from switchboard.common.settings import (
    ServerSettings,
    SettingsError,
    load_settings,
    reference_markdown,
    setting,
    settings_reference,
)


@dataclass(frozen=True)
class ExampleSettings:
    server: ServerSettings
    scheduler_addr: str = setting("SCHEDULER_ADDR", "127.0.0.1:50053", "scheduler address")
    alternates: int = setting("EXAMPLE_ALTERNATES", 2, "alternates", minimum=0, maximum=8)
    ratio: float = setting("EXAMPLE_RATIO", 0.5, "a ratio", minimum=0.0, maximum=1.0)
    enabled: bool = setting("EXAMPLE_ENABLED", False, "a flag")
    config: Path = setting("EXAMPLE_CONFIG", Path("config/experts.yaml"), "a file")
    names: tuple[str, ...] = setting("EXAMPLE_NAMES", (), "comma-separated names")
    mode: str = setting("EXAMPLE_MODE", "fast", "mode", choices=("fast", "slow"))
    limit: int | None = setting("EXAMPLE_LIMIT", None, "optional limit")


def load(environ: dict[str, str]) -> ExampleSettings:
    return load_settings(
        ExampleSettings, server_prefix="EXAMPLE", default_port=50099, default_metrics_port=9199, environ=environ
    )


def test_defaults() -> None:
    settings = load({})
    assert settings.server == ServerSettings(host="127.0.0.1", port=50099, metrics_port=9199)
    assert settings.alternates == 2 and settings.names == () and settings.limit is None


def test_every_type_parses() -> None:
    settings = load(
        {
            "EXAMPLE_PORT": "1234",
            "EXAMPLE_HOST": "0.0.0.0",
            "LOG_LEVEL": "DEBUG",
            "EXAMPLE_ALTERNATES": "3",
            "EXAMPLE_RATIO": "0.25",
            "EXAMPLE_ENABLED": "yes",
            "EXAMPLE_CONFIG": "/tmp/x.yaml",
            "EXAMPLE_NAMES": "a, b,,c",
            "EXAMPLE_MODE": "slow",
            "EXAMPLE_LIMIT": "7",
        }
    )
    assert settings.server.port == 1234 and settings.server.host == "0.0.0.0"
    assert settings.server.log_level == "debug"
    assert (settings.alternates, settings.ratio, settings.enabled) == (3, 0.25, True)
    assert settings.config == Path("/tmp/x.yaml")
    assert settings.names == ("a", "b", "c")
    assert settings.mode == "slow" and settings.limit == 7


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EXAMPLE_PORT": "http"}, "EXAMPLE_PORT: expected int"),
        ({"EXAMPLE_PORT": "70000"}, "EXAMPLE_PORT: must be <= 65535"),
        ({"EXAMPLE_ALTERNATES": "-1"}, "EXAMPLE_ALTERNATES: must be >= 0"),
        ({"EXAMPLE_RATIO": "x"}, "EXAMPLE_RATIO: expected float"),
        ({"EXAMPLE_ENABLED": "maybe"}, "EXAMPLE_ENABLED: expected bool"),
        ({"EXAMPLE_MODE": "medium"}, "EXAMPLE_MODE: must be one of fast, slow"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL: must be one of"),
    ],
)
def test_errors_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load(environ)


def test_reference_lists_every_variable() -> None:
    docs = settings_reference(ExampleSettings, server_prefix="EXAMPLE", default_port=50099, default_metrics_port=9199)
    names = [d.env for d in docs]
    assert names[:5] == ["EXAMPLE_HOST", "EXAMPLE_PORT", "EXAMPLE_METRICS_PORT", "EXAMPLE_DRAIN_SECONDS", "LOG_LEVEL"]
    assert "EXAMPLE_LIMIT" in names and len(names) == len(set(names))
    assert "| `EXAMPLE_PORT` | `50099` |" in reference_markdown(docs)
