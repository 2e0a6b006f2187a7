"""Tests of authentication: bearer parsing, API keys and signed tokens resolved to principals."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt
import pytest
from switchboard.gateway.auth import (
    Authenticator,
    AuthError,
    authorization_from_metadata,
    bearer_credential,
    narrow_scopes,
)
from switchboard.gateway.keys import add_key, new_key
from switchboard.gateway.principal import Priority
from switchboard.gateway.tenants import TenantDirectory, hash_key

SECRET = secrets.token_bytes(48)


def test_bearer_credential_extraction() -> None:
    assert bearer_credential("Bearer abc") == "abc"
    assert bearer_credential("bearer  xyz ") == "xyz"
    assert authorization_from_metadata([("x-other", "1"), ("Authorization", b"Bearer k")]) == "Bearer k"
    assert authorization_from_metadata([("x-other", "1")]) is None
    for value, reason in ((None, "API_KEY_MISSING"), ("Basic abc", "API_KEY_MALFORMED"), ("Bearer   ", "API_KEY_MALFORMED")):
        with pytest.raises(AuthError) as error:
            bearer_credential(value)
        assert error.value.reason == reason


def write_tenants(tmp_path: Path, jwt_section: str = "") -> Path:
    (tmp_path / "hs.secret").write_bytes(SECRET)
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"""
tenants:
  acme:
    keys: [{{id: acme-1, sha256: "{hash_key("acme-key")}"}}]
    scopes: ["experts:*"]
    priority: high
  narrow:
    scopes: ["experts:bard-small"]
{jwt_section}
"""
    )
    return path


JWT_SECTION = """
jwt:
  issuer: https://auth.example
  audience: switchboard
  keys:
    - {kid: k1, algorithm: HS256, secret_file: hs.secret}
"""


def token(claims: dict[str, object], key: bytes = SECRET, kid: str = "k1") -> str:
    now = int(time.time())
    body = {"iss": "https://auth.example", "aud": "switchboard", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="HS256", headers={"kid": kid})


def test_an_api_key_resolves_to_its_tenant(tmp_path: Path) -> None:
    auth = Authenticator(TenantDirectory(write_tenants(tmp_path)))
    principal = auth.authenticate("Bearer acme-key")
    assert (principal.tenant, principal.key_id, principal.priority) == ("acme", "acme-1", Priority.HIGH)
    with pytest.raises(AuthError) as error:
        auth.authenticate("Bearer not-a-key")
    assert error.value.reason == "API_KEY_INVALID" and "not-a-key" not in error.value.message
    assert auth.authenticate_metadata([("authorization", "Bearer acme-key")]).tenant == "acme"


def test_a_signed_token_resolves_to_its_tenant_with_narrowed_scopes(tmp_path: Path) -> None:
    auth = Authenticator(TenantDirectory(write_tenants(tmp_path, JWT_SECTION)))
    auth.check()
    principal = auth.authenticate("Bearer " + token({"tenant": "acme", "scope": "experts:bard-small admin"}))
    assert principal.tenant == "acme" and principal.priority is Priority.HIGH and principal.key_id.startswith("jwt:k1:")
    # admin is not the tenant's to give: the token can narrow scopes, never widen them.
    assert principal.scopes == frozenset({"experts:bard-small"})
    whole = auth.authenticate("Bearer " + token({"sub": "acme"}))
    assert whole.scopes == frozenset({"experts:*"})
    narrow = auth.authenticate("Bearer " + token({"tenant": "narrow", "scope": "experts:scribe-large"}))
    assert narrow.scopes == frozenset() and not narrow.may_use("scribe-large")


@pytest.mark.parametrize(
    ("claims", "key", "reason"),
    [
        ({"tenant": "ghost"}, SECRET, "TOKEN_TENANT_UNKNOWN"),
        ({"tenant": "acme"}, secrets.token_bytes(48), "TOKEN_SIGNATURE_INVALID"),
        ({"tenant": "acme", "exp": int(time.time()) - 3600}, SECRET, "TOKEN_EXPIRED"),
        ({"tenant": "acme", "aud": "someone-else"}, SECRET, "TOKEN_CLAIMS_INVALID"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(tmp_path: Path, claims: dict[str, object], key: bytes, reason: str) -> None:
    auth = Authenticator(TenantDirectory(write_tenants(tmp_path, JWT_SECTION)))
    credential = token(claims, key)
    with pytest.raises(AuthError) as error:
        auth.authenticate("Bearer " + credential)
    assert error.value.reason == reason
    assert credential not in error.value.message


def test_tokens_are_refused_when_no_jwt_keys_are_configured(tmp_path: Path) -> None:
    auth = Authenticator(TenantDirectory(write_tenants(tmp_path)))
    with pytest.raises(AuthError) as error:
        auth.authenticate("Bearer " + token({"tenant": "acme"}))
    assert error.value.reason == "TOKEN_NOT_ACCEPTED"


def test_unusable_jwt_keys_are_a_start_error_and_leave_api_keys_working(tmp_path: Path) -> None:
    path = write_tenants(tmp_path, JWT_SECTION.replace("hs.secret", "missing.secret"))
    auth = Authenticator(TenantDirectory(path))
    with pytest.raises(Exception, match=r"missing\.secret"):
        auth.check()
    assert auth.authenticate("Bearer acme-key").tenant == "acme"
    with pytest.raises(AuthError) as error:
        auth.authenticate("Bearer " + token({"tenant": "acme"}))
    assert error.value.reason == "TOKEN_NOT_ACCEPTED"


def test_a_reload_with_jwt_keys_starts_accepting_tokens(tmp_path: Path) -> None:
    path = write_tenants(tmp_path)
    auth = Authenticator(TenantDirectory(path))
    credential = "Bearer " + token({"tenant": "acme"})
    with pytest.raises(AuthError):
        auth.authenticate(credential)
    write_tenants(tmp_path, JWT_SECTION)
    assert auth.authenticate(credential).tenant == "acme"


def test_narrow_scopes() -> None:
    tenant = frozenset({"experts:*", "admin"})
    assert narrow_scopes(tenant, frozenset()) == tenant
    assert narrow_scopes(tenant, frozenset({"experts:a", "admin"})) == frozenset({"experts:a", "admin"})
    assert narrow_scopes(frozenset({"experts:a"}), frozenset({"experts:b", "admin"})) == frozenset()


def test_a_new_key_works_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    first = new_key()
    add_key(path, "alpha", first)
    auth = Authenticator(TenantDirectory(path))
    second = new_key()
    add_key(path, "beta", second)
    assert auth.authenticate(f"Bearer {second}").tenant == "beta"
    assert auth.authenticate(f"Bearer {first}").tenant == "alpha"
