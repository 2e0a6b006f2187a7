"""Scheduler settings: one typed object read from the environment once at start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting
from switchboard.scheduler.policies import POLICY_NAMES, SELECTABLE_POLICY_NAMES, PolicyOptions

SERVER_PREFIX = "SCHEDULER"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103
DEFAULT_EXPERTS_CONFIG = Path("config/experts.yaml")


@dataclass(frozen=True)
class SchedulerSettings:
    """Everything the scheduler reads from its environment."""

    # Per-method bounds sized to each request's contract (the test_config contract test builds the
    # largest valid one of each): Place carries up to 131,072 prompt token ids and keeps the server
    # limit; Register and ReportLoad carry at most 4,096 KV events and 4,096 block hashes (about
    # 117 KB encoded); Deregister, Complete and GetCluster carry ids and counts.
    server_defaults: ClassVar[Mapping[str, Any]] = {
        "max_method_message_bytes": (
            "Scheduler/Register=262144",
            "Scheduler/ReportLoad=262144",
            "Scheduler/Deregister=4096",
            "Scheduler/Complete=8192",
            "Scheduler/GetCluster=4096",
        ),
    }

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
        "how Place ranks an expert's replicas: " + ", ".join(SELECTABLE_POLICY_NAMES),
        choices=SELECTABLE_POLICY_NAMES,
    )
    placement_seed: int = setting(
        "SCHEDULER_PLACEMENT_SEED",
        0,
        "seed of the power-of-two policy's random draws (same seed and calls, same placements)",
        minimum=0,
        maximum=2**63 - 1,
    )
    prefix_load_weight: float = setting(
        "SCHEDULER_PREFIX_LOAD_WEIGHT",
        0.5,
        "prefix-load: score penalty per token of extra work over the least-loaded replica, "
        "against 1 per cached prompt token",
        minimum=0.0,
        maximum=100.0,
    )
    prefix_balance_abs_tokens: float = setting(
        "SCHEDULER_PREFIX_BALANCE_ABS_TOKENS",
        8192.0,
        "prefix-load: a replica is overloaded (ranked after all others, by work) when its work exceeds "
        "the least-loaded one's by more than this many tokens and SCHEDULER_PREFIX_BALANCE_REL times",
        minimum=0.0,
        maximum=1e9,
    )
    prefix_balance_rel: float = setting(
        "SCHEDULER_PREFIX_BALANCE_REL",
        1.5,
        "prefix-load: the relative part of the overload rule: the replica's work is also more than this "
        "many times the least-loaded one's",
        minimum=1.0,
        maximum=1000.0,
    )
    latency_step_tokens: int = setting(
        "SCHEDULER_LATENCY_STEP_TOKENS",
        512,
        "predicted-latency: the replicas' token budget per engine step (their GENERATOR_MAX_TOKENS_PER_STEP)",
        minimum=1,
        maximum=1_000_000,
    )
    latency_tpot_weight: float = setting(
        "SCHEDULER_LATENCY_TPOT_WEIGHT",
        16.0,
        "predicted-latency, for an expert without an SLO: rank by predicted TTFT + this x predicted TPOT",
        minimum=0.0,
        maximum=100000.0,
    )
    policy_file: str = setting(
        "SCHEDULER_POLICY_FILE",
        "",
        "learned: the policy file (JSON, written by switchboard scheduler train), re-read when it changes; "
        "missing, corrupt or of another feature schema: ranks with prefix-load and counts "
        "switchboard_scheduler_learned_policy_fallbacks_total",
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
        # The bounds above let NaN through (it compares false with everything).
        for env, value in (
            ("SCHEDULER_PREFIX_LOAD_WEIGHT", self.prefix_load_weight),
            ("SCHEDULER_PREFIX_BALANCE_ABS_TOKENS", self.prefix_balance_abs_tokens),
            ("SCHEDULER_PREFIX_BALANCE_REL", self.prefix_balance_rel),
            ("SCHEDULER_LATENCY_TPOT_WEIGHT", self.latency_tpot_weight),
        ):
            if not math.isfinite(value):
                raise SettingsError(f"{env}: must be a finite number, got {value}")

    def policy_options(self) -> PolicyOptions:
        """The settings of the work-aware placement policies (prefix-load, predicted-latency)."""
        return PolicyOptions(
            prefix_load_weight=self.prefix_load_weight,
            prefix_balance_abs_tokens=self.prefix_balance_abs_tokens,
            prefix_balance_rel=self.prefix_balance_rel,
            latency_step_tokens=self.latency_step_tokens,
            latency_tpot_weight=self.latency_tpot_weight,
            policy_file=self.policy_file,
        )


def load_scheduler_settings() -> SchedulerSettings:
    """Read the scheduler's settings from the environment (raises SettingsError naming the variable)."""
    return load_settings(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
