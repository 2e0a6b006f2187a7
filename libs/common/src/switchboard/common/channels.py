"""Client channels between services, traced, with shared keepalive settings."""

from __future__ import annotations

from typing import Any

import grpc
from switchboard.common.telemetry import client_interceptors

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Fail fast when a peer is gone instead of waiting out long reconnect backoffs:
    # the caller (gateway failover, scheduler expiry) decides what to do next.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
]


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `address` (host:port) that propagates trace context."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=client_interceptors())
