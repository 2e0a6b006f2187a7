"""Authentication: a bearer credential (an API key or a signed JWT) resolved to a `Principal`.

`Authenticator.authenticate(authorization)` takes the value of the `authorization` header (gRPC
metadata or HTTP), so the gRPC interceptor and the HTTP front share one rule:

- `Bearer <api key>`: the key's SHA-256 is looked up in the tenants file; the principal is that
  key's tenant with its scopes, priority and limits.
- `Bearer <JWT>` (when the tenants file has a `jwt` section): the token's signature and claims are
  checked by `JwtVerifier`; its tenant must be in the tenants file (limits and priority come from
  there), and its scopes can only narrow the tenant's, never widen them.

Every failure is an `AuthError` with a stable reason and a message that says what to send, never
the credential itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from switchboard.common.logging import get_logger
from switchboard.gateway.jwt_tokens import (
    JwtConfig,
    JwtConfigError,
    JwtKey,
    JwtVerifier,
    TokenInvalid,
    looks_like_jwt,
)
from switchboard.gateway.principal import ALL_EXPERTS_SCOPE, Principal
from switchboard.gateway.tenants import JwtSpec, TenantDirectory

log = get_logger(__name__)

BEARER_PREFIX = "bearer "


class AuthError(Exception):
    """The request carries no usable credential; `reason` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def bearer_credential(authorization: str | None) -> str:
    """The credential of an `authorization: Bearer <credential>` value, or AuthError."""
    if authorization is None:
        raise AuthError("API_KEY_MISSING", "missing API key: send 'authorization: Bearer <key>'")
    if not authorization.lower().startswith(BEARER_PREFIX) or not authorization[len(BEARER_PREFIX) :].strip():
        raise AuthError("API_KEY_MALFORMED", "malformed authorization: expected 'Bearer <api key or token>'")
    return authorization[len(BEARER_PREFIX) :].strip()


def authorization_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` value of gRPC metadata (the first one), or None."""
    for name, value in metadata or ():
        if name.lower() == "authorization":
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def narrow_scopes(tenant_scopes: frozenset[str], token_scopes: frozenset[str]) -> frozenset[str]:
    """The token's scopes that the tenant holds (experts:* in the tenant covers every experts:<name>)."""
    if not token_scopes:
        return tenant_scopes
    allowed = set()
    for scope in token_scopes:
        if scope in tenant_scopes or (scope.startswith("experts:") and ALL_EXPERTS_SCOPE in tenant_scopes):
            allowed.add(scope)
    return frozenset(allowed)


class Authenticator:
    """Resolves credentials against the tenants file (reloaded when it changes)."""

    def __init__(self, tenants: TenantDirectory) -> None:
        self._tenants = tenants
        self._jwt_spec: JwtSpec | None = None
        self._jwt: JwtVerifier | None = None
        self._jwt_error: str | None = None

    @property
    def tenants(self) -> TenantDirectory:
        """The tenants directory this authenticator reads."""
        return self._tenants

    def _verifier(self) -> JwtVerifier | None:
        spec = self._tenants.config.jwt
        if spec is not self._jwt_spec:  # the tenants file changed: rebuild from its jwt section
            self._jwt_spec, self._jwt, self._jwt_error = spec, None, None
            if spec is not None:
                try:
                    self._jwt = JwtVerifier(jwt_config(spec))
                except JwtConfigError as exc:  # a bad key file after a reload: tokens refused, API keys work
                    self._jwt_error = str(exc)
                    log.error("JWT keys unusable; bearer tokens are refused until fixed", error=str(exc))
        return self._jwt

    def check(self) -> None:
        """Raise JwtConfigError if the tenants file's JWT keys are unusable (a start error)."""
        self._verifier()
        if self._jwt_error:
            raise JwtConfigError(self._jwt_error)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `authorization` header value, or AuthError."""
        credential = bearer_credential(authorization)
        if looks_like_jwt(credential):
            return self._from_token(credential)
        principal = self._tenants.principal_for_key(credential)
        if principal is None:
            raise AuthError("API_KEY_INVALID", "invalid API key")
        return principal

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of gRPC invocation metadata, or AuthError."""
        return self.authenticate(authorization_from_metadata(metadata))

    def _from_token(self, token: str) -> Principal:
        verifier = self._verifier()
        if verifier is None:
            detail = "bearer tokens are not accepted by this gateway (no jwt section in its tenants file)"
            if self._jwt_error:
                detail = "bearer tokens cannot be checked: the gateway's JWT keys are misconfigured"
            raise AuthError("TOKEN_NOT_ACCEPTED", detail)
        try:
            claims = verifier.verify(token)
        except TokenInvalid as exc:
            raise AuthError(exc.reason, exc.message) from None
        except Exception:
            # A verifier bug must not become an error status that names an exception: refuse the token.
            log.exception("token verification failed unexpectedly")
            raise AuthError("TOKEN_MALFORMED", "the token cannot be read") from None
        tenant = self._tenants.tenant(claims.tenant)
        if tenant is None:
            raise AuthError("TOKEN_TENANT_UNKNOWN", "the token's tenant is not configured on this gateway")
        return replace(tenant, key_id=claims.key_id, scopes=narrow_scopes(tenant.scopes, claims.scopes))


def jwt_config(spec: JwtSpec) -> JwtConfig:
    """The verifier's configuration from the tenants file's jwt section (reads the key files)."""
    keys = [
        JwtKey(kid=k.kid, algorithm=k.algorithm, secret_file=k.secret_file, public_key_file=k.public_key_file)  # type: ignore[arg-type]
        for k in spec.keys
    ]
    return JwtConfig(keys=keys, issuer=spec.issuer, audience=spec.audience)
