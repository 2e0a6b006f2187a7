"""Client channels between services, traced, with shared keepalive settings, plaintext or mutual TLS."""

from __future__ import annotations

from typing import Any

import grpc
from switchboard.common.rpc_tracing import TracedChannel
from switchboard.common.tls import TlsIdentity

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Fail fast when a peer is gone instead of waiting out long reconnect backoffs:
    # the caller (gateway failover, scheduler expiry) decides what to do next. The longest backoff
    # stays under the router's default 2 s Place deadline, so a Place that waits for a restarted
    # scheduler's connection (router/scheduler_client.py) gets it within the deadline.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
]


def open_channel(address: str, tls: TlsIdentity | None = None, peer_role: str | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` (host:port) that propagates trace context.

    With `tls` (the caller's identity) the channel runs mutual TLS and accepts only a server whose
    certificate the CA issued to `peer_role` (the role is the name checked, whatever the address:
    replicas are reached by IP). Without it, plaintext.
    """
    if tls is None:
        return TracedChannel(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
    if not peer_role:
        raise ValueError("a mutual-TLS channel needs the role of the service it calls (peer_role)")
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer_role)]
    return TracedChannel(grpc.aio.secure_channel(address, tls.channel_credentials(), options=options))
