"""The tenants file: who may call the gateway, with which keys, scopes, priority and limits.

One YAML file (GATEWAY_TENANTS_FILE) holds, per tenant, the SHA-256 hashes of its API keys (never a
key in clear), its scopes, priority class and limits; an optional `defaults` section gives limits
that every tenant inherits, and an optional `jwt` section the keys that sign bearer tokens:

    defaults:
      limits: {requests_per_second: 20, request_burst: 40}
    tenants:
      acme:
        keys:
          - {id: acme-ci, sha256: 9f86d08...}
        scopes: ["experts:*"]          # or experts:<name>; "admin" for the Usage RPC
        priority: high                 # low | normal | high
        limits:
          tokens_per_second: 2000
          token_burst: 8000
          max_concurrent_streams: 8
          max_prompt_tokens: 4096
          max_output_tokens: 1024
          monthly_token_budget: 50000000
          monthly_cost_budget: 250.0     # in the price table's currency (GATEWAY_PRICES_FILE)
          cost_alert_thresholds: [0.5, 0.8]  # alert when this share of the cost budget is used
          on_store_unavailable: closed # open | closed: when Redis cannot be reached
        share_cache: false             # true: use the response cache namespace shared with other such tenants
    jwt:
      issuer: https://auth.example.com
      audience: switchboard
      keys:
        - {kid: k1, algorithm: RS256, public_key_file: /etc/switchboard/jwt/k1.pem}

Every field is checked when the file is read and an error names the path of the bad value, since
a typo in a limit would otherwise silently mean "unlimited". The file is watched by its identity
(inode, size, modification and change times): both an atomic replace (a new inode) and an in-place
edit are seen on the next request. A malformed file keeps the last good configuration, logs why
and counts `switchboard_gateway_tenants_reload_failures_total`, so a bad edit never locks every
tenant out; a revoked key stops working on the first request after a good reload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Gauge
from switchboard.common.logging import get_logger
from switchboard.gateway.config_files import FieldErrors, WatchedFile, file_identity
from switchboard.gateway.principal import ALL_EXPERTS_SCOPE, FailMode, Principal, Priority, TenantLimits

log = get_logger(__name__)

RELOADS = Counter("switchboard_gateway_tenants_reloads_total", "Tenants file reloads that took effect.")
RELOAD_FAILURES = Counter(
    "switchboard_gateway_tenants_reload_failures_total",
    "Tenants file reloads refused (malformed or unreadable file); the last good configuration stays.",
)
TENANTS = Gauge("switchboard_gateway_tenants", "Tenants in the configuration in effect.")

SHA256_HEX_CHARS = 64
_LIMIT_FIELDS = {f.name: f for f in fields(TenantLimits)}
_TENANT_KEYS = {"keys", "scopes", "priority", "limits", "share_cache"}
_TOP_KEYS = {"defaults", "tenants", "jwt"}


class TenantsFileError(Exception):
    """The tenants file cannot be read or holds a bad value; the message names its path in the file."""


@dataclass(frozen=True)
class JwtKeySpec:
    """One key that signs bearer tokens, as the tenants file names it (the file itself is read by the verifier)."""

    kid: str | None
    algorithm: str
    secret_file: Path | None
    public_key_file: Path | None


@dataclass(frozen=True)
class JwtSpec:
    """The `jwt` section: who issues tokens, for whom, and the keys that sign them."""

    keys: tuple[JwtKeySpec, ...]
    issuer: str | None = None
    audience: str | None = None


@dataclass(frozen=True)
class TenantsConfig:
    """A parsed tenants file: principals by the SHA-256 of their key, tenants by name, JWT settings."""

    by_key_hash: Mapping[bytes, Principal]
    tenants: Mapping[str, Principal]
    jwt: JwtSpec | None = None


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key, as the tenants file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_fields = FieldErrors(TenantsFileError)
_fail, _mapping, _check_keys = _fields.fail, _fields.mapping, _fields.check_keys


def _parse_limits(raw: Any, path: str, base: TenantLimits) -> TenantLimits:
    mapping = _mapping(raw, path)
    _check_keys(mapping, set(_LIMIT_FIELDS), path)
    values: dict[str, Any] = {}
    for name, value in mapping.items():
        where = f"{path}.{name}"
        if name == "on_store_unavailable":
            try:
                values[name] = FailMode(str(value).lower())
            except ValueError:
                raise _fail(where, f"must be 'open' or 'closed', got {value!r}") from None
            continue
        if name == "cost_alert_thresholds":
            values[name] = _parse_thresholds(value, where)
            continue
        if value is None:
            values[name] = None  # explicitly unlimited, overriding a default
            continue
        integral = _LIMIT_FIELDS[name].type in ("int | None", int)
        if isinstance(value, bool) or not isinstance(value, int | float) or (integral and not isinstance(value, int)):
            kind = "an integer" if integral else "a number"
            raise _fail(where, f"must be {kind} (or null for unlimited), got {value!r}")
        if not value > 0:  # also refuses NaN
            raise _fail(where, f"must be > 0 (or null for unlimited), got {value!r}")
        values[name] = value
    limits = replace(base, **values)
    # Defaults may name thresholds for the tenants that set a budget; thresholds a tenant names need one.
    named = "cost_alert_thresholds" in mapping and path != "defaults.limits"
    if named and limits.cost_alert_thresholds and limits.monthly_cost_budget is None:
        raise _fail(f"{path}.cost_alert_thresholds", "needs monthly_cost_budget (the thresholds are shares of it)")
    for rate, burst in (("requests_per_second", "request_burst"), ("tokens_per_second", "token_burst")):
        if getattr(limits, rate) is not None and getattr(limits, burst) is None:
            # A rate without a burst: one second's worth, the least surprising capacity.
            limits = replace(limits, **{burst: max(float(getattr(limits, rate)), 1.0)})
    return limits


def _parse_thresholds(raw: Any, path: str) -> tuple[float, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in raw
    ):
        raise _fail(path, f"must be a list of fractions in (0, 1] of monthly_cost_budget, got {raw!r}")
    return tuple(sorted({float(v) for v in raw}))


def _parse_scopes(raw: Any, path: str) -> frozenset[str]:
    if raw is None:
        return frozenset({ALL_EXPERTS_SCOPE})
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        raise _fail(path, "must be a list of non-empty strings such as experts:*, experts:<name>, admin")
    for scope in raw:
        if scope != "admin" and not scope.startswith("experts:"):
            raise _fail(path, f"unknown scope {scope!r}; expected experts:*, experts:<name> or admin")
    return frozenset(raw)


def _parse_key(raw: Any, path: str) -> tuple[str, bytes]:
    entry = _mapping(raw, path)
    _check_keys(entry, {"id", "sha256"}, path)
    key_id, digest = entry.get("id"), entry.get("sha256")
    if not isinstance(key_id, str) or not key_id:
        raise _fail(f"{path}.id", "must be a non-empty string (it names the key in audit lines)")
    if digest is not None and not isinstance(digest, str):
        # YAML reads an unquoted all-digit hash as a number.
        raise _fail(f"{path}.sha256", "must be a quoted string of 64 hex characters")
    if not isinstance(digest, str) or len(digest) != SHA256_HEX_CHARS:
        raise _fail(f"{path}.sha256", f"must be the {SHA256_HEX_CHARS}-hex-character SHA-256 of the key, never the key")
    try:
        return key_id, bytes.fromhex(digest)
    except ValueError:
        raise _fail(f"{path}.sha256", "must be hexadecimal") from None


def _parse_jwt(raw: Any, path: str, base: Path) -> JwtSpec | None:
    if raw is None:
        return None
    section = _mapping(raw, path)
    _check_keys(section, {"issuer", "audience", "keys"}, path)
    keys = section.get("keys")
    if not isinstance(keys, list) or not keys:
        raise _fail(f"{path}.keys", "must list at least one signing key")
    specs = []
    for index, raw_key in enumerate(keys):
        where = f"{path}.keys[{index}]"
        entry = _mapping(raw_key, where)
        _check_keys(entry, {"kid", "algorithm", "secret_file", "public_key_file"}, where)
        algorithm = entry.get("algorithm")
        if algorithm not in ("HS256", "RS256"):
            raise _fail(f"{where}.algorithm", f"must be HS256 or RS256, got {algorithm!r}")
        file_field = "secret_file" if algorithm == "HS256" else "public_key_file"
        if not isinstance(entry.get(file_field), str):
            raise _fail(f"{where}.{file_field}", f"an {algorithm} key needs {file_field}")
        file = base / Path(entry[file_field]).expanduser()
        kid = entry.get("kid")
        specs.append(
            JwtKeySpec(
                kid=str(kid) if kid is not None else None,
                algorithm=algorithm,
                secret_file=file if algorithm == "HS256" else None,
                public_key_file=file if algorithm == "RS256" else None,
            )
        )
    issuer, audience = section.get("issuer"), section.get("audience")
    return JwtSpec(tuple(specs), str(issuer) if issuer else None, str(audience) if audience else None)


def parse_tenants(text: str, source: str = "tenants file", base: Path = Path(".")) -> TenantsConfig:
    """Parse the tenants file's text; TenantsFileError names the first bad value. `base` resolves relative paths."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantsFileError(f"{source}: not valid YAML ({exc})") from None
    top = _mapping(document, source)
    _check_keys(top, _TOP_KEYS, source)
    defaults_section = _mapping(top.get("defaults"), "defaults")
    _check_keys(defaults_section, {"limits"}, "defaults")
    defaults = _parse_limits(defaults_section.get("limits"), "defaults.limits", TenantLimits())
    by_hash: dict[bytes, Principal] = {}
    tenants: dict[str, Principal] = {}
    key_ids: set[str] = set()
    for name, raw in _mapping(top.get("tenants"), "tenants").items():
        where = f"tenants.{name}"
        if not isinstance(name, str) or not name:
            raise _fail(where, "a tenant name must be a non-empty string")
        entry = _mapping(raw, where)
        _check_keys(entry, _TENANT_KEYS, where)
        try:
            priority = Priority.parse(str(entry.get("priority", "normal")))
        except ValueError as exc:
            raise _fail(f"{where}.priority", str(exc)) from None
        share_cache = entry.get("share_cache", False)
        if not isinstance(share_cache, bool):
            raise _fail(f"{where}.share_cache", f"must be true or false, got {share_cache!r}")
        tenant = Principal(
            tenant=name,
            key_id="",
            scopes=_parse_scopes(entry.get("scopes"), f"{where}.scopes"),
            priority=priority,
            limits=_parse_limits(entry.get("limits"), f"{where}.limits", defaults),
            share_cache=share_cache,
        )
        tenants[name] = tenant
        raw_keys = entry.get("keys") or []
        if not isinstance(raw_keys, list):
            raise _fail(f"{where}.keys", "must be a list of {id, sha256}")
        for index, raw_key in enumerate(raw_keys):
            key_id, digest = _parse_key(raw_key, f"{where}.keys[{index}]")
            if key_id in key_ids:
                raise _fail(f"{where}.keys[{index}].id", f"key id {key_id!r} is used twice")
            if digest in by_hash:
                raise _fail(f"{where}.keys[{index}].sha256", "this key already belongs to another entry")
            key_ids.add(key_id)
            by_hash[digest] = replace(tenant, key_id=key_id)
    return TenantsConfig(by_hash, tenants, _parse_jwt(top.get("jwt"), "jwt", base))


class TenantDirectory:
    """The tenants configuration in effect, reloaded from its file when the file changes."""

    def __init__(self, path: Path) -> None:
        """Load the file; raise TenantsFileError if it is missing or malformed (a start error)."""
        identity = _identity_or_fail(path)
        config = parse_tenants(path.read_text(encoding="utf-8"), str(path), path.parent)
        self._file = WatchedFile(
            path,
            config,
            identity,
            lambda text: parse_tenants(text, str(path), path.parent),
            (TenantsFileError,),
            "tenants file",
            RELOAD_FAILURES,
        )
        TENANTS.set(len(config.tenants))

    @property
    def path(self) -> Path:
        """The tenants file."""
        return self._file.path

    @property
    def config(self) -> TenantsConfig:
        """The configuration in effect (after a reload when the file changed)."""
        self.reload_if_changed()
        return self._file.value

    def reload_if_changed(self) -> bool:
        """Re-read the file if its identity changed; return whether a new configuration took effect."""
        config = self._file.reload_if_changed()
        if config is None:
            return False
        RELOADS.inc()
        TENANTS.set(len(config.tenants))
        log.info("tenants reloaded", tenants=len(config.tenants), keys=len(config.by_key_hash))
        return True

    def principal_for_key(self, key: str) -> Principal | None:
        """The principal owning an API key, or None.

        Looking up the key's SHA-256 in a dict is safe against timing attacks: the time depends on
        the digest, which an attacker cannot steer toward a stored one without knowing its key.
        """
        return self.config.by_key_hash.get(hashlib.sha256(key.encode("utf-8")).digest())

    def tenant(self, name: str) -> Principal | None:
        """The tenant's principal template (key_id empty), or None."""
        return self.config.tenants.get(name)


def _identity_or_fail(path: Path) -> tuple[int, int, int, int]:
    try:
        return file_identity(path)
    except OSError as exc:
        raise TenantsFileError(
            f"cannot read tenants file {path}: {exc.strerror}; create a key with "
            "`python -m switchboard.gateway.keys add --tenant dev`"
        ) from None
