"""Router settings: one typed object read from the environment once at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switchboard.common.experts_config import ExpertsConfigError, load_experts_config
from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting

SERVER_PREFIX = "ROUTER"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclass(frozen=True)
class RouterSettings:
    """Everything the router reads from its environment."""

    server: ServerSettings
    scheduler_addr: str = setting("SCHEDULER_ADDR", "127.0.0.1:50053", "host:port of the scheduler")
    experts_config: Path = setting(
        "SWITCHBOARD_EXPERTS_CONFIG", Path("config/experts.yaml"), "experts config file (declares the expert pools)"
    )
    max_alternates: int = setting(
        "ROUTER_MAX_ALTERNATES", 2, "failover candidates returned besides the primary", minimum=0, maximum=8
    )
    max_k: int = setting("ROUTER_MAX_K", 2, "most experts the gate selects for one request", minimum=1, maximum=16)
    relative_threshold: float = setting(
        "ROUTER_RELATIVE_THRESHOLD",
        0.5,
        "an expert is selected while its score is at least this fraction of the best score",
        minimum=0.0,
        maximum=1.0,
    )
    gate_temperature: float = setting(
        "ROUTER_GATE_TEMPERATURE", 0.05, "softmax temperature over n-gram similarities", minimum=0.001, maximum=10.0
    )
    scheduler_timeout_seconds: float = setting(
        "ROUTER_SCHEDULER_TIMEOUT_SECONDS", 2.0, "deadline of each call to the scheduler", minimum=0.05, maximum=60.0
    )
    retry_after_seconds: float = setting(
        "ROUTER_RETRY_AFTER_SECONDS",
        1.0,
        "RetryInfo delay sent with UNAVAILABLE when no expert has a replica",
        minimum=0.0,
        maximum=600.0,
    )


def load_router_settings() -> RouterSettings:
    """Read the router's settings from the environment (raises SettingsError naming the variable).

    The experts config is read here too, so a missing or bad file stops the process at start
    with one line instead of a running router that cannot route.
    """
    settings = load_settings(
        RouterSettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT
    )
    try:
        load_experts_config(settings.experts_config)
    except ExpertsConfigError as exc:
        raise SettingsError(f"SWITCHBOARD_EXPERTS_CONFIG: {exc}") from None
    return settings
