"""Scheduler settings: one typed object read from the environment once at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting
from switchboard.scheduler.policies import POLICY_NAMES

SERVER_PREFIX = "SCHEDULER"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103
DEFAULT_EXPERTS_CONFIG = Path("config/experts.yaml")


@dataclass(frozen=True)
class SchedulerSettings:
    """Everything the scheduler reads from its environment."""

    server: ServerSettings
    heartbeat_seconds: float = setting(
        "SCHEDULER_HEARTBEAT_SECONDS",
        1.0,
        "how often replicas are told to send ReportLoad",
        minimum=0.05,
        maximum=60.0,
    )
    expiry_seconds: float = setting(
        "SCHEDULER_EXPIRY_SECONDS",
        5.0,
        "a replica silent for longer than this is dropped",
        minimum=0.1,
        maximum=3600.0,
    )
    placement_ttl_seconds: float = setting(
        "SCHEDULER_PLACEMENT_TTL_SECONDS",
        600.0,
        "a placement never reported complete stops counting as in-flight after this long",
        minimum=1.0,
        maximum=86400.0,
    )
    retry_after_seconds: float = setting(
        "SCHEDULER_RETRY_AFTER_SECONDS",
        1.0,
        "RetryInfo delay sent with UNAVAILABLE when an expert has no healthy replica",
        minimum=0.0,
        maximum=600.0,
    )
    placement_policy: str = setting(
        "SCHEDULER_PLACEMENT_POLICY",
        POLICY_NAMES[0],
        "how Place ranks an expert's replicas: " + ", ".join(POLICY_NAMES),
        choices=POLICY_NAMES,
    )
    placement_seed: int = setting(
        "SCHEDULER_PLACEMENT_SEED",
        0,
        "seed of the power-of-two policy's random draws (same seed and calls, same placements)",
        minimum=0,
        maximum=2**63 - 1,
    )
    experts_config: Path = setting(
        "SWITCHBOARD_EXPERTS_CONFIG",
        DEFAULT_EXPERTS_CONFIG,
        "experts config file (declares the expert pools)",
    )

    def __post_init__(self) -> None:
        # A replica must get several heartbeats in before it can expire, or healthy replicas flap.
        if self.expiry_seconds <= self.heartbeat_seconds:
            raise SettingsError(
                "SCHEDULER_EXPIRY_SECONDS: must be greater than SCHEDULER_HEARTBEAT_SECONDS "
                f"({self.expiry_seconds} <= {self.heartbeat_seconds})"
            )


def load_scheduler_settings() -> SchedulerSettings:
    """Read the scheduler's settings from the environment (raises SettingsError naming the variable)."""
    return load_settings(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
