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
    }

    server: ServerSettings
    router_addr: str = setting("ROUTER_ADDR", "127.0.0.1:50052", "host:port of the router")
    keys_file: Path = setting(
        "GATEWAY_KEYS_FILE",
        Path("~/.cache/switchboard/gateway-keys.jsonl"),
        "API keys file: JSON lines {tenant, sha256 of the key}; re-read when it changes",
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
    channel_idle_seconds: float = setting(
        "GATEWAY_CHANNEL_IDLE_SECONDS",
        300.0,
        "a pooled channel to a replica with no call in flight is closed after this long unused "
        "(so replicas that left the cluster do not keep one)",
        minimum=1.0,
        maximum=86_400.0,
    )

    def __post_init__(self) -> None:
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
    if not settings.keys_file.expanduser().is_file():
        raise SettingsError(
            f"GATEWAY_KEYS_FILE: {settings.keys_file} does not exist; create a key with "
            "`python -m switchboard.gateway.keys add --tenant dev`"
        )
    return settings
