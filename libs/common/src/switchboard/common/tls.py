"""Mutual TLS between services, and which service identity may call which RPC.

Every process has one identity on the internal hops: a certificate signed by the cluster's CA,
whose common name is `<role>` or `<role>/<instance>` (`router`, `scheduler`, `gateway`,
`generator/bard-small-0`, `operator` for people and tools), and whose subject alternative names
include the role as a DNS name. The three files come from `SWITCHBOARD_TLS_CA_FILE`,
`SWITCHBOARD_TLS_CERT_FILE` and `SWITCHBOARD_TLS_KEY_FILE` (all three, or none for plaintext).

- Servers of internal services require a client certificate signed by the CA (mutual TLS).
- Clients verify the server's certificate against the CA *and* that it was issued to the role
  they mean to call (the channel's target name is the role: a process holding a generator's
  certificate cannot pose as the router), and present their own certificate.
- `IdentityInterceptor` checks each call's peer role against the service's policy
  (method -> roles allowed), deny by default: an RPC missing from the policy is refused.

The gateway's public port is not an internal hop: it serves clients with its own certificate
(GATEWAY_PUBLIC_TLS_*), without client certificates, and authenticates API keys instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
from switchboard.common.errors import ServiceError, unauthenticated
from switchboard.common.interceptors import Behavior, Stage, is_infrastructure
from switchboard.common.logging import get_logger

log = get_logger(__name__)

CA_ENV, CERT_ENV, KEY_ENV = "SWITCHBOARD_TLS_CA_FILE", "SWITCHBOARD_TLS_CERT_FILE", "SWITCHBOARD_TLS_KEY_FILE"
OPERATOR_ROLE = "operator"
# Calls to health and reflection are allowed for any peer the transport verified (probes present
# the service's own certificate).
ANY_ROLE = "*"


class TlsError(Exception):
    """A TLS file is missing or unreadable; the message names the variable and the file."""


def _read(path: Path, variable: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{variable}: {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsIdentity:
    """The process's certificate, key and the CA that signs every service's certificate."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @cached_property
    def pem(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate chain, private key), read once; TlsError names a bad file."""
        return _read(self.ca_file, CA_ENV), _read(self.cert_file, CERT_ENV), _read(self.key_file, KEY_ENV)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side of mutual TLS: our certificate, client certificates required and checked against the CA.

        A client without one fails the handshake (its calls end UNAVAILABLE at the client): gRPC's
        Python API cannot ask for a certificate without requiring it, so no call without an identity
        reaches a handler; `IdentityInterceptor` still refuses one with UNAUTHENTICATED should it.
        """
        ca, cert, key = self.pem
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: verify the server against the CA, present our certificate."""
        ca, cert, key = self.pem
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def load_tls_identity(environ: Mapping[str, str]) -> TlsIdentity | None:
    """The identity from SWITCHBOARD_TLS_*: all three files, or None (plaintext) when none is set."""
    values = {name: environ.get(name, "").strip() for name in (CA_ENV, CERT_ENV, KEY_ENV)}
    given = [name for name, value in values.items() if value]
    if not given:
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise TlsError(f"{', '.join(missing)}: must be set with {', '.join(given)} (mutual TLS needs all three)")
    identity = TlsIdentity(*(Path(values[name]).expanduser() for name in (CA_ENV, CERT_ENV, KEY_ENV)))
    identity.pem  # noqa: B018 - read now, so a bad file is a start error naming it, not a failed call later
    return identity


def blocking_channel(address: str, tls: TlsIdentity | None = None, peer_role: str | None = None) -> grpc.Channel:
    """A synchronous channel for tools, probes and tests: mutual TLS to `peer_role` with `tls`, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address)
    if not peer_role:
        raise ValueError("a mutual-TLS channel needs the role of the service it calls (peer_role)")
    return grpc.secure_channel(address, tls.channel_credentials(), options=[("grpc.ssl_target_name_override", peer_role)])


def certificate_identity(cert_file: Path) -> str:
    """The common name of a PEM certificate (a process's own identity, e.g. for its health probe)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    certificate = x509.load_pem_x509_certificate(_read(cert_file, CERT_ENV))
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def public_server_credentials(cert_file: Path, key_file: Path, cert_variable: str, key_variable: str) -> grpc.ServerCredentials:
    """TLS for a public port: our certificate, no client certificate asked for."""
    cert, key = _read(cert_file, cert_variable), _read(key_file, key_variable)
    return grpc.ssl_server_credentials([(key, cert)], require_client_auth=False)


def role_of(common_name: str) -> str:
    """The role part of an identity: 'generator/bard-small-0' -> 'generator'."""
    return common_name.split("/", 1)[0]


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the peer's verified certificate, or None on a plaintext connection."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


def permission_denied(message: str) -> ServiceError:
    """PERMISSION_DENIED for a peer whose identity may not call the method."""
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, reason="IDENTITY_NOT_ALLOWED")


class IdentityInterceptor(Stage):
    """Refuse calls whose peer role the service's policy does not allow (deny by default).

    `policy` maps a full method name ('/switchboard.v1.Scheduler/Register') to the roles allowed.
    Installed only when the server runs mutual TLS: on a plaintext server there is no identity.
    """

    def __init__(self, policy: Mapping[str, frozenset[str]]) -> None:
        self._policy = dict(policy)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        allowed = frozenset({ANY_ROLE}) if is_infrastructure(method) else self._policy.get(method, frozenset())

        async def refuse(context: grpc.aio.ServicerContext, identity: str | None) -> None:
            log.warning("call refused for its identity", method=method, identity=identity, peer=context.peer())
            if identity is None:
                missing = unauthenticated(
                    "no client certificate: internal services need one issued by the cluster's CA",
                    reason="CLIENT_CERTIFICATE_MISSING",
                ).to_status()
                await context.abort(missing.code, missing.details, missing.trailing_metadata)
            status = permission_denied(
                f"identity {identity or 'none'} may not call {method.rsplit('/', 1)[-1]}"
                + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else " (no identity may)")
            ).to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)

        def permitted(context: grpc.aio.ServicerContext) -> str | None:
            identity = peer_identity(context)
            if identity is not None and (ANY_ROLE in allowed or role_of(identity) in allowed):
                return identity
            return None

        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if permitted(context) is None:
                    await refuse(context, peer_identity(context))
                    return
                async for item in behavior(request, context):
                    yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if permitted(context) is None:
                await refuse(context, peer_identity(context))
                return None
            return await behavior(request, context)

        return unary
