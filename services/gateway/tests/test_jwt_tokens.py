"""Tests of JWT bearer-token verification: algorithms, key selection, claims, key files, messages."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from switchboard.gateway.jwt_tokens import (
    Claims,
    JwtConfig,
    JwtConfigError,
    JwtKey,
    JwtVerifier,
    TokenInvalid,
    load_jwt_keys,
    looks_like_jwt,
)

NOW = 1_800_000_000.0
ISSUER = "https://idp.example"
AUDIENCE = "switchboard"


@dataclass
class KeyFiles:
    """Throwaway key material and the files the verifier reads it from."""

    secret: bytes
    secret_file: Path
    private_pem: bytes
    public_pem: bytes
    public_key_file: Path
    other_private_pem: bytes


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Two RSA key pairs (generation is slow, so once per module)."""
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
def keys(tmp_path: Path, rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> KeyFiles:
    private, other = rsa_keys
    secret = secrets.token_urlsafe(48).encode()
    secret_file = tmp_path / "hs256.secret"
    secret_file.write_bytes(secret + b"\n")  # trailing newline, as `echo` writes it
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_key_file = tmp_path / "rs256.pem"
    public_key_file.write_bytes(public_pem)
    return KeyFiles(secret, secret_file, _private_pem(private), public_pem, public_key_file, _private_pem(other))


def _verifier(
    keys: KeyFiles, *, kids: bool = False, key_list: list[JwtKey] | None = None, **overrides: Any
) -> JwtVerifier:
    """A verifier with both keys (kids "hs" and "rs" when `kids`, else only the RS256 key, kid-less)."""
    if key_list is None and kids:
        key_list = [
            JwtKey("hs", "HS256", secret_file=keys.secret_file),
            JwtKey("rs", "RS256", public_key_file=keys.public_key_file),
        ]
    elif key_list is None:
        key_list = [JwtKey(None, "RS256", public_key_file=keys.public_key_file)]
    config = JwtConfig(keys=key_list, issuer=ISSUER, audience=AUDIENCE, **overrides)
    return JwtVerifier(config, clock=lambda: NOW)


def _payload(**claims: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "tenant": "acme",
        "scope": "experts:chat admin",
        "iat": int(NOW) - 60,
        "exp": int(NOW) + 3600,
    }
    base.update(claims)
    return {name: value for name, value in base.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def _hs256_by_hand(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HS256 without PyJWT's guards, as an attacker would sign (PyJWT refuses a PEM as HMAC key)."""
    signing_input = _unsigned(header, payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def _refused(verifier: JwtVerifier, token: str, reason: str) -> TokenInvalid:
    with pytest.raises(TokenInvalid) as caught:
        verifier.verify(token)
    assert caught.value.reason == reason, caught.value.message
    # Messages go to logs and clients: never the token, nor any of its segments.
    for part in [p for p in [token, *token.split(".")] if len(p) >= 8]:
        assert part not in caught.value.message
        assert part not in str(caught.value)
    return caught.value


def test_valid_rs256_token(keys: KeyFiles) -> None:
    token = jwt.encode(_payload(jti="abc-123"), keys.private_pem, algorithm="RS256")
    assert looks_like_jwt(token)
    claims = _verifier(keys).verify(token)
    expected_hash = hashlib.sha256(b"abc-123").hexdigest()[:12]
    assert claims == Claims(
        tenant="acme",
        scopes=frozenset({"experts:chat", "admin"}),
        key_id=f"jwt:default:{expected_hash}",
        expires_at=NOW + 3600,
    )


def test_valid_hs256_token_and_kid_selection(keys: KeyFiles) -> None:
    verifier = _verifier(keys, kids=True)
    hs = jwt.encode(_payload(), keys.secret, algorithm="HS256", headers={"kid": "hs"})
    rs = jwt.encode(_payload(tenant="beta"), keys.private_pem, algorithm="RS256", headers={"kid": "rs"})
    hs_claims = verifier.verify(hs)
    rs_claims = verifier.verify(rs)
    assert hs_claims.tenant == "acme" and hs_claims.key_id.startswith("jwt:hs:")
    assert rs_claims.tenant == "beta" and rs_claims.key_id.startswith("jwt:rs:")
    # Without jti the audit id hashes the token: stable per token, different across tokens, never the token.
    assert verifier.verify(hs).key_id == hs_claims.key_id != rs_claims.key_id
    assert hs not in hs_claims.key_id


def test_kid_selects_the_key_and_is_not_a_fallback(keys: KeyFiles) -> None:
    verifier = _verifier(keys, kids=True)
    # Signed with the RS256 key but naming the HS256 key's kid: the kid's algorithm is enforced.
    mislabeled = jwt.encode(_payload(), keys.private_pem, algorithm="RS256", headers={"kid": "hs"})
    _refused(verifier, mislabeled, "TOKEN_ALGORITHM_REFUSED")
    unknown = jwt.encode(_payload(), keys.secret, algorithm="HS256", headers={"kid": "nope"})
    _refused(verifier, unknown, "TOKEN_KEY_UNKNOWN")
    # Several keys, none kid-less: a token without kid cannot pick one.
    no_kid = jwt.encode(_payload(), keys.secret, algorithm="HS256")
    _refused(verifier, no_kid, "TOKEN_KEY_UNKNOWN")
    # A single configured key with a kid also serves tokens without a kid.
    single = _verifier(keys, key_list=[JwtKey("only", "HS256", secret_file=keys.secret_file)])
    assert single.verify(no_kid).key_id.startswith("jwt:only:")


def test_expired_and_not_yet_valid(keys: KeyFiles) -> None:
    verifier = _verifier(keys)

    def sign(**claims: Any) -> str:
        return jwt.encode(_payload(**claims), keys.private_pem, algorithm="RS256")

    _refused(verifier, sign(iat=int(NOW) - 7200, exp=int(NOW) - 31), "TOKEN_EXPIRED")
    # Inside the 30 s leeway: still accepted (clock skew between issuer and gateway).
    assert verifier.verify(sign(iat=int(NOW) - 7200, exp=int(NOW) - 29)).tenant == "acme"
    message = _refused(verifier, sign(nbf=int(NOW) + 120), "TOKEN_CLAIMS_INVALID").message
    assert "not valid yet" in message
    assert verifier.verify(sign(nbf=int(NOW) + 20)).tenant == "acme"
    _refused(verifier, sign(iat=int(NOW) + 600), "TOKEN_CLAIMS_INVALID")
    assert "exp" in _refused(verifier, sign(exp=None), "TOKEN_CLAIMS_INVALID").message
    _refused(verifier, sign(exp="tomorrow"), "TOKEN_CLAIMS_INVALID")


def test_wrong_signature(keys: KeyFiles) -> None:
    verifier = _verifier(keys, kids=True)
    other_key = jwt.encode(_payload(), keys.other_private_pem, algorithm="RS256", headers={"kid": "rs"})
    _refused(verifier, other_key, "TOKEN_SIGNATURE_INVALID")
    wrong_secret = jwt.encode(_payload(), secrets.token_bytes(32), algorithm="HS256", headers={"kid": "hs"})
    _refused(verifier, wrong_secret, "TOKEN_SIGNATURE_INVALID")
    # A valid token whose payload was swapped for another tenant's.
    header, _, signature = jwt.encode(_payload(), keys.secret, algorithm="HS256", headers={"kid": "hs"}).split(".")
    forged_payload = _b64(json.dumps(_payload(tenant="victim")).encode())
    _refused(verifier, f"{header}.{forged_payload}.{signature}", "TOKEN_SIGNATURE_INVALID")


def test_wrong_issuer_and_audience(keys: KeyFiles) -> None:
    verifier = _verifier(keys)

    def sign(**claims: Any) -> str:
        return jwt.encode(_payload(**claims), keys.private_pem, algorithm="RS256")

    assert "iss" in _refused(verifier, sign(iss="https://evil.example"), "TOKEN_CLAIMS_INVALID").message
    _refused(verifier, sign(iss=None), "TOKEN_CLAIMS_INVALID")
    assert "aud" in _refused(verifier, sign(aud="other-service"), "TOKEN_CLAIMS_INVALID").message
    _refused(verifier, sign(aud=None), "TOKEN_CLAIMS_INVALID")
    assert verifier.verify(sign(aud=["other-service", AUDIENCE])).tenant == "acme"
    # No audience configured: a token minted for some audience is refused, one without aud accepted.
    open_verifier = JwtVerifier(
        JwtConfig(keys=[JwtKey(None, "RS256", public_key_file=keys.public_key_file)], issuer=None, audience=None),
        clock=lambda: NOW,
    )
    _refused(open_verifier, sign(aud="other-service"), "TOKEN_CLAIMS_INVALID")
    assert open_verifier.verify(sign(aud=None, iss="anyone")).tenant == "acme"


def test_alg_none_is_refused(keys: KeyFiles) -> None:
    for alg in ("none", "None", "NONE"):
        token = _unsigned({"alg": alg, "typ": "JWT"}, _payload()) + "."
        assert looks_like_jwt(token)
        _refused(_verifier(keys), token, "TOKEN_ALGORITHM_REFUSED")
        _refused(_verifier(keys, kids=True), token, "TOKEN_ALGORITHM_REFUSED")
        with_kid = _unsigned({"alg": alg, "kid": "rs"}, _payload()) + "."
        _refused(_verifier(keys, kids=True), with_kid, "TOKEN_ALGORITHM_REFUSED")
    # An unregistered algorithm name chosen by the caller is not echoed into the message.
    odd = _unsigned({"alg": "x<script>"}, _payload()) + ".c2ln"
    assert "script" not in _refused(_verifier(keys), odd, "TOKEN_ALGORITHM_REFUSED").message


def test_hs256_with_rsa_public_key_as_secret_is_refused(keys: KeyFiles) -> None:
    """The algorithm confusion attack: the public key is public, so an attacker can HMAC with it."""
    for public in (keys.public_pem, keys.public_pem.strip()):
        # RS256-only gateway: HS256 is not an accepted algorithm at all.
        token = _hs256_by_hand({"alg": "HS256", "typ": "JWT"}, _payload(tenant="victim"), public)
        _refused(_verifier(keys), token, "TOKEN_ALGORITHM_REFUSED")
        # Gateway with both algorithms: the kid of the RSA key pins RS256.
        token = _hs256_by_hand({"alg": "HS256", "kid": "rs"}, _payload(tenant="victim"), public)
        _refused(_verifier(keys, kids=True), token, "TOKEN_ALGORITHM_REFUSED")
        # ... and under the HS256 kid it is just a wrong signature.
        token = _hs256_by_hand({"alg": "HS256", "kid": "hs"}, _payload(tenant="victim"), public)
        _refused(_verifier(keys, kids=True), token, "TOKEN_SIGNATURE_INVALID")


def test_tenant_claim_and_sub_fallback(keys: KeyFiles) -> None:
    verifier = _verifier(keys)

    def sign(**claims: Any) -> str:
        return jwt.encode(_payload(**claims), keys.private_pem, algorithm="RS256")

    assert verifier.verify(sign(tenant=None, sub="from-sub")).tenant == "from-sub"
    assert verifier.verify(sign(tenant="explicit", sub="user-1")).tenant == "explicit"
    assert "tenant" in _refused(verifier, sign(tenant=None), "TOKEN_CLAIMS_INVALID").message
    for bad in ("", "has space", 42, ["a"], "x" * 129):
        _refused(verifier, sign(tenant=bad), "TOKEN_CLAIMS_INVALID")


def test_scopes_in_both_forms(keys: KeyFiles) -> None:
    verifier = _verifier(keys)

    def sign(**claims: Any) -> str:
        return jwt.encode(_payload(**claims), keys.private_pem, algorithm="RS256")

    assert verifier.verify(sign(scope="  experts:a   experts:b ")).scopes == {"experts:a", "experts:b"}
    assert verifier.verify(sign(scope=None, scopes=["experts:*", "admin"])).scopes == {"experts:*", "admin"}
    assert verifier.verify(sign(scope="a", scopes=["b"])).scopes == {"a", "b"}
    assert verifier.verify(sign(scope=None)).scopes == frozenset()
    _refused(verifier, sign(scope=["a"]), "TOKEN_CLAIMS_INVALID")
    _refused(verifier, sign(scope=None, scopes="a b"), "TOKEN_CLAIMS_INVALID")
    _refused(verifier, sign(scope=None, scopes=["a", 3]), "TOKEN_CLAIMS_INVALID")


def test_lifetime_is_bounded(keys: KeyFiles) -> None:
    verifier = _verifier(keys, max_lifetime_seconds=3600)

    def sign(**claims: Any) -> str:
        return jwt.encode(_payload(**claims), keys.private_pem, algorithm="RS256")

    assert verifier.verify(sign(iat=int(NOW) - 60, exp=int(NOW) + 3540)).tenant == "acme"
    message = _refused(verifier, sign(iat=int(NOW) - 60, exp=int(NOW) + 3600), "TOKEN_CLAIMS_INVALID").message
    assert "lifetime" in message
    # Without iat the lifetime counts from now, so a far-future exp cannot slip through.
    _refused(verifier, sign(iat=None, exp=int(NOW) + 365 * 86400), "TOKEN_CLAIMS_INVALID")
    unbounded = _verifier(keys, max_lifetime_seconds=None)
    assert unbounded.verify(sign(iat=None, exp=int(NOW) + 365 * 86400)).tenant == "acme"


def test_malformed_strings(keys: KeyFiles) -> None:
    verifier = _verifier(keys)
    valid = jwt.encode(_payload(), keys.private_pem, algorithm="RS256")
    header, payload, signature = valid.split(".")
    non_json_header = _b64(b"not json") + "." + payload + "." + signature
    header_without_alg = _b64(b'{"typ": "JWT"}') + "." + payload + "." + signature
    header_is_list = _b64(b'["alg"]') + "." + payload + "." + signature
    deeply_nested_header = _b64(b"[" * 10_000) + "." + payload + "." + signature
    cases = [
        "",
        base64.b64encode(os.urandom(48)).decode(),
        os.urandom(32).hex(),
        os.urandom(24).decode("latin-1"),
        f"{header}.{payload}",
        f"{header}.{payload}.{signature}.{signature}",
        f"{header}..{signature}",
        f"{header}.{payload}.sig+with/plain=base64",
        non_json_header,
        header_without_alg,
        header_is_list,
        deeply_nested_header,
        "sb-" + secrets.token_urlsafe(32),
        valid + "A" * 20_000,
    ]
    for token in cases:
        assert not looks_like_jwt(token), token
        _refused(verifier, token, "TOKEN_MALFORMED")
    # Well-formed header and valid signature segment shape, but the payload is not JSON.
    not_json_payload = jwt.api_jws.encode(b"not json", keys.private_pem, algorithm="RS256")
    assert looks_like_jwt(not_json_payload)
    _refused(verifier, not_json_payload, "TOKEN_MALFORMED")
    _refused(verifier, _unsigned({"alg": "RS256", "kid": 7}, _payload()) + ".c2ln", "TOKEN_MALFORMED")
    with pytest.raises(TokenInvalid):
        verifier.verify(None)  # type: ignore[arg-type]


def test_no_message_contains_the_token_or_key(keys: KeyFiles) -> None:
    verifier = _verifier(keys, kids=True)
    failures: list[Callable[[], str]] = [
        lambda: jwt.encode(_payload(exp=int(NOW) - 3600, iat=int(NOW) - 7200), keys.secret, "HS256", {"kid": "hs"}),
        lambda: jwt.encode(_payload(tenant=None), keys.secret, algorithm="HS256", headers={"kid": "hs"}),
        lambda: jwt.encode(_payload(), keys.other_private_pem, algorithm="RS256", headers={"kid": "rs"}),
        lambda: jwt.encode(_payload(), keys.secret, algorithm="HS256", headers={"kid": "secret-kid-x"}),
    ]
    for make in failures:
        token = make()
        with pytest.raises(TokenInvalid) as caught:
            verifier.verify(token)
        text = f"{caught.value} {caught.value.message} {caught.value!r}"
        assert token not in text and keys.secret.decode() not in text and "secret-kid-x" not in text
        for segment in token.split("."):
            assert segment not in text


def test_key_files_are_validated(tmp_path: Path, keys: KeyFiles) -> None:
    missing = tmp_path / "missing.secret"
    with pytest.raises(JwtConfigError, match=re.escape(str(missing))):
        load_jwt_keys([JwtKey(None, "HS256", secret_file=missing)])
    with pytest.raises(JwtConfigError, match=r"missing\.pem"):
        load_jwt_keys([JwtKey(None, "RS256", public_key_file=tmp_path / "missing.pem")])
    short = tmp_path / "short.secret"
    short.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(JwtConfigError, match=r"short\.secret.*31 bytes") as short_error:
        load_jwt_keys([JwtKey(None, "HS256", secret_file=short)])
    assert "x" * 31 not in str(short_error.value)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello, I am not a key\n")
    with pytest.raises(JwtConfigError, match=r"not\.pem.*PEM public key"):
        load_jwt_keys([JwtKey(None, "RS256", public_key_file=not_pem)])
    private = tmp_path / "private.pem"
    private.write_bytes(keys.private_pem)
    with pytest.raises(JwtConfigError, match=r"private\.pem.*private key"):
        load_jwt_keys([JwtKey(None, "RS256", public_key_file=private)])
    # A public key configured as an HS256 secret is the confusion setup: refused at load time.
    with pytest.raises(JwtConfigError, match="PEM key"):
        load_jwt_keys([JwtKey(None, "HS256", secret_file=keys.public_key_file)])
    small = tmp_path / "small.pem"
    small.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(JwtConfigError, match="1024-bit"):
        load_jwt_keys([JwtKey(None, "RS256", public_key_file=small)])
    with pytest.raises(JwtConfigError, match="needs secret_file"):
        load_jwt_keys([JwtKey(None, "HS256", public_key_file=keys.public_key_file)])
    with pytest.raises(JwtConfigError, match="needs public_key_file"):
        load_jwt_keys([JwtKey(None, "RS256", secret_file=keys.secret_file)])
    with pytest.raises(JwtConfigError, match="at least one key"):
        load_jwt_keys([])
    with pytest.raises(JwtConfigError, match="twice"):
        load_jwt_keys([JwtKey("a", "HS256", secret_file=keys.secret_file)] * 2)
    with pytest.raises(JwtConfigError, match="at most one"):
        load_jwt_keys([JwtKey(None, "HS256", secret_file=keys.secret_file)] * 2)
    loaded = load_jwt_keys([JwtKey("hs", "HS256", secret_file=keys.secret_file)])
    assert loaded[0].material == keys.secret  # the trailing newline is not part of the secret
    assert keys.secret.decode() not in repr(loaded)
    with pytest.raises(JwtConfigError, match="leeway"):
        _verifier(keys, leeway_seconds=-1)
