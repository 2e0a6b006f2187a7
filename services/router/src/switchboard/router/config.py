"""Router settings: one typed object read from the environment once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from switchboard.common.experts_config import ExpertsConfigError, load_experts_config
from switchboard.common.settings import (
    ServerSettings,
    SettingsError,
    load_settings,
    parse_expert_folders,
    setting,
)

SERVER_PREFIX = "ROUTER"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclass(frozen=True)
class RouterSettings:
    """Everything the router reads from its environment."""

    # Route carries the prompt (and its token ids) and keeps the server limit; Feedback carries ids
    # and counts, ListExperts nothing (the contract test builds the largest valid Feedback).
    server_defaults: ClassVar[Mapping[str, Any]] = {
        "max_method_message_bytes": ("Router/Feedback=8192", "Router/ListExperts=4096"),
    }

    server: ServerSettings
    scheduler_addr: str = setting("SCHEDULER_ADDR", "127.0.0.1:50053", "host:port of the scheduler")
    experts_config: Path = setting(
        "SWITCHBOARD_EXPERTS_CONFIG", Path("config/experts.yaml"), "experts config file (declares the expert pools)"
    )
    max_prompt_chars: int = setting(
        "ROUTER_MAX_PROMPT_CHARS",
        200_000,
        "longest prompt the router scores and tokenizes, in characters (the gateway's own limit is usually far "
        "lower; this bounds the CPU one call can cost whoever reaches the router)",
        minimum=1,
        maximum=100_000_000,
    )
    max_alternates: int = setting(
        "ROUTER_MAX_ALTERNATES", 2, "failover candidates returned besides the primary", minimum=0, maximum=8
    )
    gate_path: Path | None = setting(
        "ROUTER_GATE_PATH",
        None,
        "folder of a trained gate artifact (`switchboard router train`); unset: the built-in n-gram rule",
    )
    max_k: int = setting("ROUTER_MAX_K", 2, "most experts the gate selects for one request", minimum=1, maximum=16)
    cumulative_threshold: float = setting(
        "ROUTER_CUMULATIVE_THRESHOLD",
        0.9,
        "experts are selected until their probabilities add up to this (dynamic k)",
        minimum=0.01,
        maximum=1.0,
    )
    cost_weight: float | None = setting(
        "ROUTER_COST_WEIGHT",
        None,
        "lambda: quality (nats per token) one unit of relative cost is worth; unset: the gate's default",
        minimum=0.0,
        maximum=100.0,
    )
    tenant_cost_weights: tuple[str, ...] = setting(
        "ROUTER_TENANT_COST_WEIGHTS", (), "per-tenant lambda as tenant=value pairs, comma-separated"
    )
    model_folders: tuple[str, ...] = setting(
        "ROUTER_MODEL_FOLDERS",
        (),
        "each expert's model folder as expert=folder pairs, comma-separated, used instead of the experts config's `model` to load its tokenizer",
    )
    gate_temperature: float = setting(
        "ROUTER_GATE_TEMPERATURE", 0.05, "softmax temperature of the built-in n-gram rule", minimum=0.001, maximum=10.0
    )
    ttft_slo_seconds: float = setting(
        "ROUTER_TTFT_SLO_SECONDS",
        1.0,
        "time-to-first-token objective of an expert whose `slo.ttft_seconds` is not set: a pool above it sheds traffic, a miss costs reward",
        minimum=0.001,
        maximum=600.0,
    )
    load_poll_seconds: float = setting(
        "ROUTER_LOAD_POLL_SECONDS", 0.5, "how often the router reads the pools' load from the scheduler", minimum=0.05, maximum=60.0
    )
    load_bias_step: float = setting(
        "ROUTER_LOAD_BIAS_STEP", 0.2, "largest load-bias change per look at the pools (nats)", minimum=0.0, maximum=10.0
    )
    load_bias_max: float = setting(
        "ROUTER_LOAD_BIAS_MAX", 2.0, "largest load penalty of one expert (nats)", minimum=0.0, maximum=100.0
    )
    saturation_waiting: float = setting(
        "ROUTER_SATURATION_WAITING",
        2.0,
        "waiting sequences per ready replica at which a pool counts as saturated",
        minimum=0.1,
        maximum=10000.0,
    )
    online_learning: bool = setting(
        "ROUTER_ONLINE_LEARNING", True, "learn a correction of the gate from Feedback (learned gate only)"
    )
    exploration: float = setting(
        "ROUTER_EXPLORATION", 0.0, "probability of a random eligible primary (online learning)", minimum=0.0, maximum=0.2
    )
    online_state_path: Path | None = setting(
        "ROUTER_ONLINE_STATE_PATH", None, "file the online head is snapshotted to and restored from"
    )
    outcomes_path: Path | None = setting(
        "ROUTER_OUTCOMES_PATH", None, "append every joined decision and outcome as a JSON line (no prompt text)"
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


def parse_tenant_cost_weights(pairs: tuple[str, ...]) -> dict[str, float]:
    """`("acme=0.2", "free=1")` -> {"acme": 0.2, "free": 1.0}; raises SettingsError naming the variable."""
    out: dict[str, float] = {}
    for pair in pairs:
        tenant, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not tenant.strip() or weight < 0:
            raise SettingsError(f"ROUTER_TENANT_COST_WEIGHTS: expected tenant=value with value >= 0, got {pair!r}")
        out[tenant.strip()] = weight
    return out


def parse_model_folders(pairs: tuple[str, ...]) -> dict[str, Path]:
    """ROUTER_MODEL_FOLDERS as {expert: folder}; SettingsError naming the variable on a bad pair."""
    return parse_expert_folders("ROUTER_MODEL_FOLDERS", pairs)


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
    parse_tenant_cost_weights(settings.tenant_cost_weights)
    parse_model_folders(settings.model_folders)
    return settings
