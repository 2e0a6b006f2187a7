"""Signed bearer tokens (JWTs) as an alternative to API keys: `authorization: Bearer <jwt>`.

A deployment with an identity provider issues short-lived JWTs carrying the tenant and its
scopes; the gateway verifies them offline against keys read from files (an HS256 shared secret
or an RS256 PEM public key), so it never needs the provider online per request.

Verification is deliberately strict, following RFC 8725 (JWT best current practices):

* the accepted algorithm comes from the configured key, never from the token: `alg: none` and
  "HS256 signed with the RSA public key as the secret" (algorithm confusion) are refused before
  any signature check;
* `kid` in the header selects the key; a token naming an unknown kid is refused rather than tried
  against every key;
* `exp` is required, `nbf`/`iat` are honoured with a small leeway for clock skew, and the lifetime
  is bounded so a leaked long-lived token cannot be used for months;
* claims are read only after the signature has been verified.

Every failure raises `TokenInvalid` with a stable `reason` (for metrics and clients) and a
message that says what to fix. Messages never contain the token, header values chosen by the
caller, or key material: they end up in logs and in gRPC error details.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

__all__ = [
    "MAX_TOKEN_CHARS",
    "MIN_HS256_SECRET_BYTES",
    "MIN_RSA_KEY_BITS",
    "Algorithm",
    "Claims",
    "JwtConfig",
    "JwtConfigError",
    "JwtKey",
    "JwtVerifier",
    "LoadedJwtKey",
    "TokenInvalid",
    "load_jwt_keys",
    "looks_like_jwt",
]

Algorithm = Literal["HS256", "RS256"]
SUPPORTED_ALGORITHMS: tuple[str, ...] = ("HS256", "RS256")

# HS256 with a secret shorter than the hash output is brute-forceable offline (RFC 7518 section 3.2).
MIN_HS256_SECRET_BYTES = 32
# NIST deprecates RSA moduli below 2048 bits.
MIN_RSA_KEY_BITS = 2048
# Far above any legitimate token; bounds the work an unauthenticated caller can make us do.
MAX_TOKEN_CHARS = 16 * 1024
# Longest tenant name accepted from a token; tenants end up in metric labels and Redis keys.
MAX_TENANT_CHARS = 128

# Reasons (stable, machine readable).
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_SIGNATURE_INVALID = "TOKEN_SIGNATURE_INVALID"
TOKEN_MALFORMED = "TOKEN_MALFORMED"
TOKEN_ALGORITHM_REFUSED = "TOKEN_ALGORITHM_REFUSED"
TOKEN_CLAIMS_INVALID = "TOKEN_CLAIMS_INVALID"
TOKEN_KEY_UNKNOWN = "TOKEN_KEY_UNKNOWN"

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")  # empty for unsigned (`alg: none`) tokens
# Registered JWA names (RFC 7518) may be echoed in messages; anything else a caller put in `alg` is not.
_KNOWN_ALGORITHMS = frozenset(
    "none HS256 HS384 HS512 RS256 RS384 RS512 ES256 ES384 ES512 ES256K PS256 PS384 PS512 EdDSA".split()
)
_TENANT = re.compile(r"[!-~]+")  # printable ASCII, no whitespace
_API_KEY_PREFIX = "sb-"


class JwtConfigError(Exception):
    """The JWT configuration or a key file is unusable; the message names the file and what is wrong."""


class TokenInvalid(Exception):
    """A bearer token was refused; `reason` is a stable code, `message` says what to fix.

    Same shape as `auth.AuthError`, so the gateway maps both to UNAUTHENTICATED the same way.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class JwtKey:
    """One configured verification key: an HS256 secret file or an RS256 PEM public key file.

    `kid` is matched against the token header's `kid`; at most one key may leave it None (the key
    used for tokens without a kid).
    """

    kid: str | None
    algorithm: Algorithm
    secret_file: Path | None = None
    public_key_file: Path | None = None


@dataclass(frozen=True)
class JwtConfig:
    """How tokens are verified.

    `issuer`/`audience` are checked when set. With `audience` unset a token carrying `aud` is
    refused (RFC 7519 section 4.1.3): a token minted for another service must not be accepted here.
    `max_lifetime_seconds` bounds exp - iat (None: unbounded).
    """

    keys: list[JwtKey]
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = 30
    max_lifetime_seconds: float | None = 86400


@dataclass(frozen=True)
class LoadedJwtKey:
    """A key read from its file: the HS256 secret bytes or the RS256 public key object."""

    kid: str | None
    algorithm: Algorithm
    material: bytes | RSAPublicKey
    source: Path

    def __repr__(self) -> str:
        # The default repr would print the shared secret into logs and tracebacks.
        return f"LoadedJwtKey(kid={self.kid!r}, algorithm={self.algorithm!r}, source={str(self.source)!r})"


@dataclass(frozen=True)
class Claims:
    """What a verified token says: the tenant, its scopes, an audit id and when it expires (epoch s)."""

    tenant: str
    scopes: frozenset[str]
    key_id: str
    expires_at: float


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise JwtConfigError(f"cannot read JWT {what} file {path}: {exc.strerror or exc}") from exc


def _load_secret(path: Path) -> bytes:
    # Trailing newlines are what `echo`/editors add; they are not part of the secret the issuer uses.
    secret = _read_file(path, "secret").rstrip(b"\r\n")
    if secret.lstrip().startswith(b"-----BEGIN"):
        # A PEM key used as an HMAC secret is exactly the algorithm-confusion setup; refuse it outright.
        raise JwtConfigError(
            f"JWT secret file {path} holds a PEM key; an HS256 secret must be random bytes "
            "(e.g. `openssl rand -base64 48`), a public key belongs in public_key_file with algorithm RS256"
        )
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise JwtConfigError(
            f"JWT secret file {path} holds {len(secret)} bytes; an HS256 secret needs at least "
            f"{MIN_HS256_SECRET_BYTES} (e.g. `openssl rand -base64 48`)"
        )
    return secret


def _load_public_key(path: Path) -> RSAPublicKey:
    data = _read_file(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise JwtConfigError(
            f"JWT public key file {path} holds a private key; give the gateway only the public key "
            "(`openssl rsa -in private.pem -pubout`)"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise JwtConfigError(
            f"JWT public key file {path} is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise JwtConfigError(f"JWT public key file {path} holds an unsupported key type") from exc
    if not isinstance(key, RSAPublicKey):
        raise JwtConfigError(f"JWT public key file {path} is not an RSA key; RS256 needs an RSA public key")
    if key.key_size < MIN_RSA_KEY_BITS:
        raise JwtConfigError(
            f"JWT public key file {path} is a {key.key_size}-bit RSA key; at least {MIN_RSA_KEY_BITS} bits needed"
        )
    return key


def load_jwt_keys(keys: Sequence[JwtKey]) -> tuple[LoadedJwtKey, ...]:
    """Read every key file; raise JwtConfigError naming the file (or key) that is missing or malformed.

    Also refuses configurations that would make key selection ambiguous (duplicate kids, more than
    one key without a kid), since an ambiguous choice would mean trying several keys per token.
    """
    if not keys:
        raise JwtConfigError("JWT verification needs at least one key")
    loaded: list[LoadedJwtKey] = []
    seen: set[str | None] = set()
    for key in keys:
        label = f"JWT key {key.kid!r}" if key.kid is not None else "JWT key without kid"
        if key.kid is not None and (not isinstance(key.kid, str) or not key.kid):
            raise JwtConfigError("JWT key kid must be a non-empty string or None")
        if key.kid in seen:
            if key.kid is None:
                raise JwtConfigError("at most one JWT key may omit its kid (it is used for tokens without a kid)")
            raise JwtConfigError(f"{label} is configured twice; kids must be unique")
        seen.add(key.kid)
        if key.algorithm == "HS256":
            if key.secret_file is None or key.public_key_file is not None:
                raise JwtConfigError(f"{label}: algorithm HS256 needs secret_file (and no public_key_file)")
            loaded.append(LoadedJwtKey(key.kid, "HS256", _load_secret(Path(key.secret_file)), Path(key.secret_file)))
        elif key.algorithm == "RS256":
            if key.public_key_file is None or key.secret_file is not None:
                raise JwtConfigError(f"{label}: algorithm RS256 needs public_key_file (and no secret_file)")
            path = Path(key.public_key_file)
            loaded.append(LoadedJwtKey(key.kid, "RS256", _load_public_key(path), path))
        else:
            raise JwtConfigError(f"{label}: algorithm must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
    return tuple(loaded)


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _unverified_header(token: str) -> dict[str, Any] | None:
    """The decoded JOSE header if `token` has the compact JWS shape, else None (no signature check)."""
    if len(token) > MAX_TOKEN_CHARS or token.startswith(_API_KEY_PREFIX):
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header, payload, signature = parts
    if not _SEGMENT.fullmatch(header) or not _SEGMENT.fullmatch(payload) or not _SIGNATURE_SEGMENT.fullmatch(signature):
        return None
    try:
        decoded = json.loads(_b64url_decode(header))
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError comes from a header of
    # thousands of nested brackets, which an unauthenticated caller can send.
    except (binascii.Error, ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("alg"), str):
        return None
    return decoded


def looks_like_jwt(token: str) -> bool:
    """Whether `token` is shaped like a JWT (three base64url segments, JSON header with `alg`).

    Lets the gateway route a bearer value to JWT verification or to the API-key store (our keys
    start with `sb-`) without trying both. Says nothing about validity.
    """
    return isinstance(token, str) and _unverified_header(token) is not None


def _is_number(value: object) -> bool:
    # bool is an int subclass; `"exp": true` is not a time.
    # The bounds, not math.isfinite: an int too large for a float would raise OverflowError there.
    return isinstance(value, int | float) and not isinstance(value, bool) and -sys.float_info.max <= value <= sys.float_info.max


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _claims_error(message: str) -> TokenInvalid:
    return TokenInvalid(TOKEN_CLAIMS_INVALID, message)


class JwtVerifier:
    """Verifies bearer JWTs against the configured keys and returns their `Claims`."""

    def __init__(self, config: JwtConfig, *, clock: Callable[[], float] = time.time) -> None:
        """Load the key files; raise JwtConfigError if one is unusable. `clock` is injectable for tests."""
        if not _is_number(config.leeway_seconds) or config.leeway_seconds < 0:
            raise JwtConfigError("JWT leeway_seconds must be a non-negative number")
        if config.max_lifetime_seconds is not None and (
            not _is_number(config.max_lifetime_seconds) or config.max_lifetime_seconds <= 0
        ):
            raise JwtConfigError("JWT max_lifetime_seconds must be a positive number or None")
        self._config = config
        self._clock = clock
        self._keys = load_jwt_keys(config.keys)
        self._by_kid = {key.kid: key for key in self._keys if key.kid is not None}
        without_kid = [key for key in self._keys if key.kid is None]
        # A token without kid uses the kid-less key, or the only key when just one is configured.
        self._default: LoadedJwtKey | None = (
            without_kid[0] if without_kid else (self._keys[0] if len(self._keys) == 1 else None)
        )
        self._algorithms = frozenset(key.algorithm for key in self._keys)

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms of the configured keys: the only ones a token may use."""
        return self._algorithms

    def _refuse_algorithm(self, alg: str) -> TokenInvalid:
        named = f"algorithm {alg!r}" if alg in _KNOWN_ALGORITHMS else "its algorithm"
        accepted = ", ".join(sorted(self._algorithms))
        return TokenInvalid(TOKEN_ALGORITHM_REFUSED, f"token {named} is not accepted; sign it with {accepted}")

    def _select_key(self, header: dict[str, Any]) -> LoadedJwtKey:
        alg = header["alg"]
        if alg not in self._algorithms:
            raise self._refuse_algorithm(alg)
        kid = header.get("kid")
        if kid is not None:
            if not isinstance(kid, str):
                raise TokenInvalid(TOKEN_MALFORMED, "malformed token: the header kid must be a string")
            key = self._by_kid.get(kid)
            if key is None:
                raise TokenInvalid(
                    TOKEN_KEY_UNKNOWN, "token kid does not match any configured key; sign with a configured key id"
                )
        elif self._default is not None:
            key = self._default
        else:
            raise TokenInvalid(
                TOKEN_KEY_UNKNOWN, "token has no kid and several keys are configured; put the key id in the kid header"
            )
        if alg != key.algorithm:
            # The key decides the algorithm: this is what stops HS256 tokens "signed" with an RSA public key.
            raise TokenInvalid(
                TOKEN_ALGORITHM_REFUSED,
                f"token algorithm does not match its key; tokens for this key must be signed with {key.algorithm}",
            )
        return key

    def verify(self, token: str) -> Claims:
        """Verify signature and claims of `token`; raise TokenInvalid (never anything else) on failure."""
        if not isinstance(token, str) or not token:
            raise TokenInvalid(TOKEN_MALFORMED, "malformed token: expected a JWT (header.payload.signature)")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenInvalid(TOKEN_MALFORMED, f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
        header = _unverified_header(token)
        if header is None:
            raise TokenInvalid(
                TOKEN_MALFORMED,
                "malformed token: expected three base64url segments (header.payload.signature) "
                "with a JSON header naming alg",
            )
        key = self._select_key(header)
        try:
            payload = jwt.decode(
                token,
                key.material,
                algorithms=[key.algorithm],
                # Only the signature here; claims are checked below so every failure gets our reason and message.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenInvalid(
                TOKEN_SIGNATURE_INVALID, "token signature is invalid; sign it with the key its kid names"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise self._refuse_algorithm(str(header.get("alg"))) from None
        except jwt.PyJWTError:
            # `from None`: PyJWT's messages may quote parts of the token.
            raise TokenInvalid(
                TOKEN_MALFORMED, "malformed token: the payload is not a base64url JSON object"
            ) from None
        if not isinstance(payload, dict):
            raise TokenInvalid(TOKEN_MALFORMED, "malformed token: the payload is not a JSON object")
        return self._claims(token, key, payload)

    def _claims(self, token: str, key: LoadedJwtKey, payload: dict[str, Any]) -> Claims:
        config = self._config
        now = self._clock()
        leeway = config.leeway_seconds
        exp = payload.get("exp")
        if exp is None:
            raise _claims_error("token has no exp claim; tokens must expire")
        if not _is_number(exp):
            raise _claims_error("token exp claim must be a number (seconds since the epoch)")
        if now > exp + leeway:
            raise TokenInvalid(TOKEN_EXPIRED, "token has expired; obtain a new token")
        nbf = payload.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise _claims_error("token nbf claim must be a number (seconds since the epoch)")
            if now + leeway < nbf:
                raise _claims_error("token is not valid yet (nbf is in the future); check the issuer's clock")
        iat = payload.get("iat")
        if iat is not None:
            if not _is_number(iat):
                raise _claims_error("token iat claim must be a number (seconds since the epoch)")
            if iat > now + leeway:
                raise _claims_error("token was issued in the future (iat); check the issuer's clock")
        if config.max_lifetime_seconds is not None:
            # Without iat, count from nbf or from now: an exp years ahead must not slip through.
            start = iat if iat is not None else (nbf if nbf is not None else now)
            if exp - start > config.max_lifetime_seconds:
                raise _claims_error(
                    f"token lifetime (exp - iat) exceeds {config.max_lifetime_seconds:g} seconds; "
                    "issue shorter-lived tokens"
                )
        if config.issuer is not None and payload.get("iss") != config.issuer:
            raise _claims_error("token iss claim does not match the configured issuer")
        aud = payload.get("aud")
        if config.audience is not None:
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or config.audience not in audiences:
                raise _claims_error("token aud claim does not include the configured audience")
        elif aud is not None:
            raise _claims_error(
                "token has an aud claim but no audience is configured; configure the audience or omit aud"
            )
        tenant = payload.get("tenant", payload.get("sub"))
        if tenant is None:
            raise _claims_error("token names no tenant; put it in the tenant (or sub) claim")
        if not isinstance(tenant, str) or len(tenant) > MAX_TENANT_CHARS or not _TENANT.fullmatch(tenant):
            raise _claims_error(
                f"token tenant must be 1-{MAX_TENANT_CHARS} printable ASCII characters without spaces"
            )
        scopes = self._scopes(payload)
        jti = payload.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise _claims_error("token jti claim must be a string")
        # The audit id identifies the token without being usable as one: a hash of its jti, else of the token.
        key_id = f"jwt:{key.kid or 'default'}:{_short_hash(jti if jti else token)}"
        return Claims(tenant=tenant, scopes=scopes, key_id=key_id, expires_at=float(exp))

    @staticmethod
    def _scopes(payload: dict[str, Any]) -> frozenset[str]:
        """Scopes from `scope` (OAuth 2 style, space separated) and/or `scopes` (a list); their union."""
        scopes: set[str] = set()
        scope = payload.get("scope")
        if scope is not None:
            if not isinstance(scope, str):
                raise _claims_error("token scope claim must be a space-separated string")
            scopes.update(scope.split())
        listed = payload.get("scopes")
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(item, str) and item for item in listed):
                raise _claims_error("token scopes claim must be a list of non-empty strings")
            scopes.update(listed)
        return frozenset(scopes)
