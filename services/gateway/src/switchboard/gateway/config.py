"""Gateway settings: one typed object read from the environment once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting
from switchboard.gateway.validation import maximal_request_bytes

SERVER_PREFIX = "GATEWAY"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway reads from its environment."""

    # The public front's server limits: a request message just above the largest valid request
    # (a GATEWAY_MAX_PROMPT_CHARS prompt of 4-byte characters, every other field at its limit:
    # about 131 KB at the default 32,000 characters), so a 16 MiB message is refused by gRPC
    # before auth or any handler runs; small metadata (an API key and trace headers) and
    # answers (a CompleteResponse of GATEWAY_MAX_TOKENS_LIMIT tokens).
    server_defaults: ClassVar[Mapping[str, Any]] = {
        "max_receive_message_bytes": 160 * 1024,
        "max_send_message_bytes": 1024 * 1024,
        "max_metadata_bytes": 8 * 1024,
        "max_concurrent_streams": 256,
        # Generate and Complete take the message limit above (sized to the prompt limit); the
        # other RPCs carry a tenant name at most, so their bound is a few KiB.
        "max_method_message_bytes": ("Gateway/ListModels=4096", "Gateway/Usage=4096"),
    }

    server: ServerSettings
    router_addr: str = setting("ROUTER_ADDR", "127.0.0.1:50052", "host:port of the router")
    tenants_file: Path = setting(
        "GATEWAY_TENANTS_FILE",
        Path("~/.cache/switchboard/gateway-tenants.yaml"),
        "tenants file (YAML): per tenant the SHA-256 of its API keys, scopes, priority and limits, and the JWT "
        "signing keys; re-read when it changes (a malformed file keeps the last good one)",
    )
    prices_file: Path | None = setting(
        "GATEWAY_PRICES_FILE",
        None,
        "price table (YAML): per expert (and revision) the price of 1,000 prompt and 1,000 output tokens in one "
        "currency, for switchboard_gateway_cost_total, the Usage RPC's cost and the tenants' monthly_cost_budget; "
        "re-read when it changes (a malformed file keeps the last good one); unset: every expert is free",
    )
    redis_url: str = setting(
        "REDIS_URL",
        "",
        "Redis holding the tenants' rate-limit, stream and budget state shared by every gateway replica "
        "(redis://host:port/db); empty: kept in this process (one gateway)",
    )
    limit_store_timeout_seconds: float = setting(
        "GATEWAY_LIMIT_STORE_TIMEOUT_SECONDS",
        0.25,
        "deadline of each call to the limits store (and to a Redis response cache); past it the tenant's "
        "on_store_unavailable rule applies (a cache call past it is a miss)",
        minimum=0.01,
        maximum=10.0,
    )
    cache: str = setting(
        "GATEWAY_CACHE",
        "off",
        "response cache of deterministic requests (temperature 0 or a seed): off, memory (this process, "
        "GATEWAY_CACHE_MAX_BYTES) or redis (REDIS_URL, shared by every gateway; bounded by Redis' maxmemory)",
        choices=("off", "memory", "redis"),
    )
    cache_ttl_seconds: float = setting(
        "GATEWAY_CACHE_TTL_SECONDS", 3600.0, "how long a cached answer is served", minimum=1.0, maximum=30 * 86_400.0
    )
    cache_max_bytes: int = setting(
        "GATEWAY_CACHE_MAX_BYTES",
        64 * 1024 * 1024,
        "bytes the memory response cache holds (least recently used evicted first)",
        minimum=1024,
        maximum=64 * 1024**3,
    )
    budget_report_seconds: float = setting(
        "GATEWAY_BUDGET_REPORT_SECONDS",
        30.0,
        "how often the budgeted tenants' budgets and this month's use are exported as gauges "
        "(switchboard_gateway_tenant_budget_tokens, switchboard_gateway_tenant_month_tokens, and for cost budgets "
        "switchboard_gateway_tenant_cost_budget, switchboard_gateway_tenant_month_cost)",
        minimum=1.0,
        maximum=86_400.0,
    )
    max_inflight: int = setting(
        "GATEWAY_MAX_INFLIGHT",
        256,
        "requests this gateway runs at once (past the router); more wait in the admission queue",
        minimum=1,
        maximum=100_000,
    )
    max_queued: int = setting(
        "GATEWAY_MAX_QUEUED",
        1024,
        "requests that may wait for admission; past it the lowest priority is shed with RESOURCE_EXHAUSTED",
        minimum=0,
        maximum=1_000_000,
    )
    fair_quantum_tokens: int = setting(
        "GATEWAY_FAIR_QUANTUM_TOKENS",
        512,
        "tokens each waiting tenant is credited per deficit-round-robin round within a priority band",
        minimum=1,
        maximum=1_000_000,
    )
    public_tls_cert_file: Path | None = setting(
        "GATEWAY_PUBLIC_TLS_CERT_FILE",
        None,
        "certificate (PEM chain) of the public gRPC port and the HTTP front; unset: plaintext (the local default "
        "on loopback). Clients are not asked for certificates: they authenticate with API keys or tokens",
    )
    public_tls_key_file: Path | None = setting(
        "GATEWAY_PUBLIC_TLS_KEY_FILE", None, "private key (PEM) of GATEWAY_PUBLIC_TLS_CERT_FILE"
    )
    http_port: int = setting(
        "GATEWAY_HTTP_PORT",
        8080,
        "port of the OpenAI-compatible HTTP front (/v1/completions, /v1/chat/completions, /v1/models) on "
        "GATEWAY_HOST; 0 disables it",
        minimum=0,
        maximum=65535,
    )
    model_folders: tuple[str, ...] = setting(
        "GATEWAY_MODEL_FOLDERS",
        (),
        "expert=folder pairs, comma-separated: a folder's tokenizer_config.json chat_template renders chat requests "
        "pinned to that expert (others use the plain default template)",
    )
    log_text: bool = setting(
        "GATEWAY_LOG_TEXT",
        False,
        "also log each request's prompt and output on its audit line, through the redaction filter (e-mail "
        "addresses, phone and card numbers, keys and tokens masked); off: only lengths and ids are logged",
    )
    max_prompt_chars: int = setting(
        "GATEWAY_MAX_PROMPT_CHARS", 32_000, "longest accepted prompt, in characters", minimum=1, maximum=10_000_000
    )
    default_max_tokens: int = setting(
        "GATEWAY_DEFAULT_MAX_TOKENS", 64, "max_tokens used when a request sets 0", minimum=1, maximum=1_000_000
    )
    max_tokens_limit: int = setting(
        "GATEWAY_MAX_TOKENS_LIMIT", 4096, "largest max_tokens a request may ask for", minimum=1, maximum=1_000_000
    )
    default_timeout_seconds: float = setting(
        "GATEWAY_DEFAULT_TIMEOUT_SECONDS",
        120.0,
        "request deadline when the client sets none (a client deadline always wins)",
        minimum=0.1,
        maximum=86_400.0,
    )
    router_timeout_seconds: float = setting(
        "GATEWAY_ROUTER_TIMEOUT_SECONDS", 5.0, "deadline of each call to the router", minimum=0.05, maximum=600.0
    )
    attempt_first_token_seconds: float = setting(
        "GATEWAY_ATTEMPT_FIRST_TOKEN_SECONDS",
        30.0,
        "time a replica has to send its first token before the gateway cancels the attempt and tries the next "
        "candidate (a hung replica does not eat the whole deadline; the last candidate gets the whole deadline); "
        "0: only the request's deadline",
        minimum=0.0,
        maximum=86_400.0,
    )
    channel_idle_seconds: float = setting(
        "GATEWAY_CHANNEL_IDLE_SECONDS",
        300.0,
        "a pooled channel to a replica with no call in flight is closed after this long unused "
        "(so replicas that left the cluster do not keep one)",
        minimum=1.0,
        maximum=86_400.0,
    )

    def __post_init__(self) -> None:
        if self.cache == "redis" and not self.redis_url:
            raise SettingsError("GATEWAY_CACHE: redis needs REDIS_URL")
        if (self.public_tls_cert_file is None) != (self.public_tls_key_file is None):
            raise SettingsError("GATEWAY_PUBLIC_TLS_CERT_FILE and GATEWAY_PUBLIC_TLS_KEY_FILE: set both or neither")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SettingsError(
                "GATEWAY_DEFAULT_MAX_TOKENS: must be <= GATEWAY_MAX_TOKENS_LIMIT "
                f"({self.default_max_tokens} > {self.max_tokens_limit})"
            )
        needed = maximal_request_bytes(self.max_prompt_chars)
        if self.server.max_receive_message_bytes < needed:
            raise SettingsError(
                f"{SERVER_PREFIX}_MAX_RECEIVE_MESSAGE_BYTES: must be >= {needed} (the largest valid request with "
                f"GATEWAY_MAX_PROMPT_CHARS={self.max_prompt_chars}), got {self.server.max_receive_message_bytes}"
            )


def load_gateway_settings() -> GatewaySettings:
    """Read the gateway's settings from the environment (raises SettingsError naming the variable)."""
    settings = load_settings(
        GatewaySettings, server_prefix=SERVER_PREFIX, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT
    )
    if not settings.tenants_file.expanduser().is_file():
        raise SettingsError(
            f"GATEWAY_TENANTS_FILE: {settings.tenants_file} does not exist; create a key with "
            "`python -m switchboard.gateway.keys add --tenant dev`"
        )
    return settings
