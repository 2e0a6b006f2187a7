"""Scheduler settings: one typed object read from the environment once at start."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting
from switchboard.scheduler.actuators import ACTUATOR_NAMES
from switchboard.scheduler.allocation import ALLOCATOR_NAMES, AllocationConfig
from switchboard.scheduler.policies import POLICY_NAMES, SELECTABLE_POLICY_NAMES, PolicyOptions
from switchboard.scheduler.revisions import DEPLOYER_NAMES

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
            # A rollout spec: 32 steps, gates and a quality probe's prompts.
            "Scheduler/StartRollout=262144",
            "Scheduler/GetRollout=4096",
            "Scheduler/ListRollouts=4096",
            "Scheduler/PauseRollout=8192",
            "Scheduler/ResumeRollout=8192",
            "Scheduler/AbortRollout=8192",
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
    rollout_state_file: Path | None = setting(
        "SCHEDULER_ROLLOUT_STATE_FILE",
        None,
        "JSON file the rollouts are saved to at every transition (atomically) and read back at start, so a restarted scheduler continues them; unset: rollouts live in memory only",
    )
    rollout_deployer: str = setting(
        "SCHEDULER_ROLLOUT_DEPLOYER",
        "none",
        "what starts a rollout's new revision when its spec has `deploy`, and retires the revision that lost: none (a rollout with deploy is refused), local (generator processes from SCHEDULER_LOCAL_GENERATORS_FILE's template, as switchboard up starts them), kubernetes (a copy of the pool's Deployment, SCHEDULER_K8S_DEPLOYMENT, per revision; needs the compose/k8s/rollouts Role)",
        choices=DEPLOYER_NAMES,
    )
    rollout_tick_seconds: float = setting(
        "SCHEDULER_ROLLOUT_TICK_SECONDS",
        1.0,
        "how often running rollouts are judged against their gates",
        minimum=0.05,
        maximum=60.0,
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
    allocator: str = setting(
        "SCHEDULER_ALLOCATOR",
        "off",
        "allocation across expert pools (opt-in): off, or the allocator run every control period: "
        + ", ".join(ALLOCATOR_NAMES),
        choices=("off", *ALLOCATOR_NAMES),
    )
    actuator: str = setting(
        "SCHEDULER_ACTUATOR",
        "dry-run",
        "what acts on the allocation: dry-run (logs and prints the decisions), local (generator processes on this "
        "machine), kubernetes (each pool's Deployment scale)",
        choices=ACTUATOR_NAMES,
    )
    allocation_budget: int = setting(
        "SCHEDULER_ALLOCATION_BUDGET",
        0,
        "most replicas of all pools together (required when SCHEDULER_ALLOCATOR is not off)",
        minimum=0,
        maximum=100000,
    )
    allocation_bounds: str = setting(
        "SCHEDULER_ALLOCATION_BOUNDS",
        "",
        "per-pool bounds as expert=min:max pairs, comma-separated; unlisted pools: 1 to the budget",
    )
    allocation_period_seconds: float = setting(
        "SCHEDULER_ALLOCATION_PERIOD_SECONDS",
        10.0,
        "control period of the allocation controller",
        minimum=0.1,
        maximum=3600.0,
    )
    allocation_cooldown_seconds: float = setting(
        "SCHEDULER_ALLOCATION_COOLDOWN_SECONDS",
        60.0,
        "a pool scales down only when its last change is at least this old (scale-up is never delayed)",
        minimum=0.0,
        maximum=86400.0,
    )
    allocation_hpa_target_tokens: float = setting(
        "SCHEDULER_ALLOCATION_HPA_TARGET_TOKENS",
        1000.0,
        "hpa: target demand tokens/s (prompt + output budget placed) per replica (tolerance 0.1); also the learned allocator's fallback",
        minimum=0.001,
        maximum=1e9,
    )
    allocation_keda_target_queue: float = setting(
        "SCHEDULER_ALLOCATION_KEDA_TARGET_QUEUE",
        4.0,
        "keda: target sequences waiting or running per replica",
        minimum=0.001,
        maximum=1e6,
    )
    allocation_policy_file: str = setting(
        "SCHEDULER_ALLOCATION_POLICY_FILE",
        "",
        "learned allocator: its policy file (written by switchboard scheduler alloc-train), re-read when it changes; "
        "missing, corrupt or of another schema: the hpa heuristic allocates (last good weights kept on a bad change)",
    )
    allocation_kill_switch_file: str = setting(
        "SCHEDULER_ALLOCATION_KILL_SWITCH_FILE",
        "",
        "while this file exists the learned allocator is off and the hpa heuristic allocates (checked every period)",
    )
    allocation_start_timeout_seconds: float = setting(
        "SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS",
        300.0,
        "a started replica counts as the pool's (pending) until it registers or this long has passed",
        minimum=1.0,
        maximum=86400.0,
    )
    actuator_timeout_seconds: float = setting(
        "SCHEDULER_ACTUATOR_TIMEOUT_SECONDS",
        30.0,
        "longest wait for one actuator call (the local actuator's stop waits up to its grace period); a slower or "
        "failing one is counted as a fault and retried next period",
        minimum=0.1,
        maximum=600.0,
    )
    local_generators_file: str = setting(
        "SCHEDULER_LOCAL_GENERATORS_FILE",
        "",
        "local actuator: the generator template (JSON written by the tools' LocalStack: command line, each "
        "expert's generator environment, log and CA folders)",
    )
    k8s_namespace: str = setting(
        "SCHEDULER_K8S_NAMESPACE",
        "",
        "kubernetes actuator: namespace of the generator Deployments (empty: the scheduler pod's own)",
    )
    k8s_deployment: str = setting(
        "SCHEDULER_K8S_DEPLOYMENT",
        "generator-{expert}",
        "kubernetes actuator: the Deployment name of each pool ({expert} is replaced)",
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
            ("SCHEDULER_ALLOCATION_PERIOD_SECONDS", self.allocation_period_seconds),
            ("SCHEDULER_ALLOCATION_COOLDOWN_SECONDS", self.allocation_cooldown_seconds),
            ("SCHEDULER_ALLOCATION_HPA_TARGET_TOKENS", self.allocation_hpa_target_tokens),
            ("SCHEDULER_ALLOCATION_KEDA_TARGET_QUEUE", self.allocation_keda_target_queue),
            ("SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS", self.allocation_start_timeout_seconds),
            ("SCHEDULER_ACTUATOR_TIMEOUT_SECONDS", self.actuator_timeout_seconds),
        ):
            if not math.isfinite(value):
                raise SettingsError(f"{env}: must be a finite number, got {value}")
        if self.allocator != "off" and self.allocation_budget < 1:
            raise SettingsError(
                f"SCHEDULER_ALLOCATION_BUDGET: must be at least 1 when SCHEDULER_ALLOCATOR={self.allocator}"
            )
        if self.allocator != "off" and self.actuator == "local" and not self.local_generators_file:
            raise SettingsError(
                "SCHEDULER_LOCAL_GENERATORS_FILE: required by SCHEDULER_ACTUATOR=local (the generator template "
                "that switchboard up writes)"
            )
        if self.rollout_deployer == "local" and not self.local_generators_file:
            raise SettingsError(
                "SCHEDULER_LOCAL_GENERATORS_FILE: required by SCHEDULER_ROLLOUT_DEPLOYER=local (the generator template "
                "that switchboard up writes)"
            )
        if "{expert}" not in self.k8s_deployment:
            raise SettingsError(f"SCHEDULER_K8S_DEPLOYMENT: must contain {{expert}}, got {self.k8s_deployment!r}")

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


    def allocation_config(self, experts: Collection[str]) -> AllocationConfig:
        """The allocation controller's budget, bounds, period, cool-down and targets (SettingsError naming
        the variable when they do not fit together)."""
        from switchboard.scheduler.controller import parse_bounds

        try:
            bounds = parse_bounds(self.allocation_bounds, sorted(experts), self.allocation_budget)
        except ValueError as exc:
            raise SettingsError(f"SCHEDULER_ALLOCATION_BOUNDS: {exc}") from None
        try:
            return AllocationConfig(
                budget=self.allocation_budget,
                bounds=bounds,
                period_seconds=self.allocation_period_seconds,
                scale_down_cooldown_seconds=self.allocation_cooldown_seconds,
                hpa_target_tokens_per_replica=self.allocation_hpa_target_tokens,
                keda_target_queue=self.allocation_keda_target_queue,
            )
        except ValueError as exc:
            raise SettingsError(f"SCHEDULER_ALLOCATION_BUDGET / SCHEDULER_ALLOCATION_BOUNDS: {exc}") from None


def load_scheduler_settings() -> SchedulerSettings:
    """Read the scheduler's settings from the environment (raises SettingsError naming the variable)."""
    return load_settings(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
