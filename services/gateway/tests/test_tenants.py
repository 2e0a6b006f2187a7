"""Tests of the tenants file: parsing (every bad value named), keys hashed at rest, reload, the keys tool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from switchboard.gateway.keys import add_key, main, new_key, revoke_key
from switchboard.gateway.principal import FailMode, Priority
from switchboard.gateway.tenants import TenantDirectory, TenantsFileError, hash_key, parse_tenants

FULL = f"""
defaults:
  limits: {{requests_per_second: 20, on_store_unavailable: closed}}
tenants:
  acme:
    keys:
      - {{id: acme-ci, sha256: {hash_key("acme-key")}}}
      - {{id: acme-dev, sha256: {hash_key("acme-key-2")}}}
    scopes: ["experts:bard-small", admin]
    priority: high
    limits:
      tokens_per_second: 2000
      token_burst: 8000
      max_concurrent_streams: 8
      max_prompt_tokens: 4096
      max_output_tokens: 1024
      monthly_token_budget: 50000000
      on_store_unavailable: open
  batch:
    keys: [{{id: batch-1, sha256: {hash_key("batch-key")}}}]
    priority: low
    limits: {{requests_per_second: null}}
jwt:
  issuer: https://auth.example.com
  keys:
    - {{kid: k1, algorithm: HS256, secret_file: secrets/k1}}
"""


def reloads_failed() -> float:
    return REGISTRY.get_sample_value("switchboard_gateway_tenants_reload_failures_total") or 0.0


def test_a_full_file_parses_with_defaults_inherited_and_overridden(tmp_path: Path) -> None:
    config = parse_tenants(FULL, base=tmp_path)
    acme = config.by_key_hash[bytes.fromhex(hash_key("acme-key"))]
    assert (acme.tenant, acme.key_id, acme.priority) == ("acme", "acme-ci", Priority.HIGH)
    assert acme.scopes == frozenset({"experts:bard-small", "admin"}) and acme.is_admin
    assert acme.may_use("bard-small") and not acme.may_use("scribe-large")
    assert acme.allowed_experts() == frozenset({"bard-small"})
    limits = acme.limits
    assert (limits.requests_per_second, limits.request_burst) == (20, 20)  # the default's rate, a one-second burst
    assert (limits.tokens_per_second, limits.token_burst, limits.max_concurrent_streams) == (2000, 8000, 8)
    assert (limits.max_prompt_tokens, limits.max_output_tokens, limits.monthly_token_budget) == (4096, 1024, 50_000_000)
    assert limits.on_store_unavailable is FailMode.OPEN
    assert config.by_key_hash[bytes.fromhex(hash_key("acme-key-2"))].key_id == "acme-dev"
    batch = config.tenants["batch"]
    assert batch.priority is Priority.LOW and batch.may_use("anything") and not batch.is_admin
    assert batch.limits.requests_per_second is None  # null overrides the default: unlimited
    assert batch.limits.on_store_unavailable is FailMode.CLOSED  # inherited
    assert config.jwt is not None and config.jwt.issuer == "https://auth.example.com"
    assert config.jwt.keys[0].secret_file == tmp_path / "secrets" / "k1"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("tenants: [a, b]", "tenants: expected a mapping"),
        ("tenant: {}", "unknown field(s) tenant"),
        ("tenants: {a: {limit: {}}}", "tenants.a: unknown field(s) limit"),
        ("tenants: {a: {limits: {tokens_per_second: -1}}}", "tenants.a.limits.tokens_per_second: must be > 0"),
        ("tenants: {a: {limits: {tokens_per_secnd: 5}}}", "tenants.a.limits: unknown field(s) tokens_per_secnd"),
        ("tenants: {a: {limits: {max_concurrent_streams: 2.5}}}", "max_concurrent_streams: must be an integer"),
        ("tenants: {a: {limits: {max_prompt_tokens: true}}}", "max_prompt_tokens: must be an integer"),
        ("tenants: {a: {limits: {requests_per_second: .nan}}}", "requests_per_second: must be > 0"),
        ("tenants: {a: {limits: {on_store_unavailable: maybe}}}", "on_store_unavailable: must be 'open' or 'closed'"),
        ("tenants: {a: {priority: urgent}}", "tenants.a.priority: priority must be one of low, normal, high"),
        ("tenants: {a: {scopes: [everything]}}", "tenants.a.scopes: unknown scope 'everything'"),
        ("tenants: {a: {keys: [{id: k, sha256: abcd}]}}", "tenants.a.keys[0].sha256: must be the 64-hex-character"),
        ("tenants: {a: {keys: [{id: k, key: sb-123}]}}", "tenants.a.keys[0]: unknown field(s) key"),
        (f"tenants: {{a: {{keys: [{{sha256: '{'0' * 64}'}}]}}}}", "tenants.a.keys[0].id: must be a non-empty string"),
        (f"tenants: {{a: {{keys: [{{id: k, sha256: {'1' * 64}}}]}}}}", "tenants.a.keys[0].sha256: must be a quoted string"),
        (
            f"tenants: {{a: {{keys: [{{id: k, sha256: '{'0' * 64}'}}]}}, b: {{keys: [{{id: k, sha256: '{'1' * 64}'}}]}}}}",
            "tenants.b.keys[0].id: key id 'k' is used twice",
        ),
        (
            f"tenants: {{a: {{keys: [{{id: k, sha256: '{'a' * 64}'}}]}}, b: {{keys: [{{id: j, sha256: '{'a' * 64}'}}]}}}}",
            "already belongs to another entry",
        ),
        ("jwt: {keys: [{algorithm: none}]}", "jwt.keys[0].algorithm: must be HS256 or RS256"),
        ("jwt: {keys: [{algorithm: RS256}]}", "jwt.keys[0].public_key_file: an RS256 key needs public_key_file"),
        ("tenants: {a: [", "not valid YAML"),
    ],
)
def test_every_bad_value_is_named(text: str, names: str) -> None:
    with pytest.raises(TenantsFileError) as error:
        parse_tenants(text)
    assert names in str(error.value)


def test_keys_are_stored_hashed_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    key = new_key()
    key_id = add_key(path, "acme", key)
    text = path.read_text()
    assert key not in text and key[3:] not in text and hash_key(key) in text
    assert path.stat().st_mode & 0o777 == 0o600
    directory = TenantDirectory(path)
    principal = directory.principal_for_key(key)
    assert principal is not None and (principal.tenant, principal.key_id) == ("acme", key_id)
    assert directory.principal_for_key(hash_key(key)) is None  # the stored hash is not a key
    assert directory.principal_for_key(key + "x") is None


def test_the_keys_tool_adds_to_existing_tenants_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(FULL.replace("secrets/k1", str(tmp_path / "k1")))
    assert main(["add", "--tenant", "acme", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    directory = TenantDirectory(path)
    principal = directory.principal_for_key(key)
    assert principal is not None and principal.tenant == "acme" and principal.priority is Priority.HIGH  # kept
    assert main(["revoke", "--id", principal.key_id, "--file", str(path)]) == 0
    assert directory.principal_for_key(key) is None
    assert main(["revoke", "--id", "nope", "--file", str(path)]) == 2
    assert "no key with id 'nope'" in capsys.readouterr().err
    with pytest.raises(KeyError):
        revoke_key(path, "nope")
    path.write_text("tenants: {a: {limits: {tokens_per_second: -1}}}")
    assert main(["add", "--tenant", "a", "--file", str(path)]) == 2  # never edits a file the gateway would refuse
    assert "tokens_per_second: must be > 0" in capsys.readouterr().err


def test_atomic_replace_and_in_place_edits_are_both_seen(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    first, second = new_key(), new_key()
    add_key(path, "acme", first)
    directory = TenantDirectory(path)
    assert directory.principal_for_key(first) is not None
    # An atomic replace (a new inode), as the keys tool and Kubernetes secret volumes do.
    add_key(path, "beta", second)
    assert directory.principal_for_key(second) is not None
    # An in-place edit (the same inode): an editor saving over the file.
    document = yaml.safe_load(path.read_text())
    document["tenants"]["beta"]["priority"] = "low"
    inode = path.stat().st_ino
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(yaml.safe_dump(document))
    assert path.stat().st_ino == inode
    principal = directory.principal_for_key(second)
    assert principal is not None and principal.priority is Priority.LOW


def test_a_malformed_file_keeps_the_last_good_config_and_counts_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    key = new_key()
    add_key(path, "acme", key)
    directory = TenantDirectory(path)
    before = reloads_failed()
    path.write_text("tenants: {acme: {keys: [{id: x, sha256: short}]}}")
    assert directory.principal_for_key(key) is not None  # still the last good configuration
    assert directory.principal_for_key(key) is not None
    assert reloads_failed() == before + 1  # reported once, not on every request
    os.unlink(path)
    assert directory.principal_for_key(key) is not None  # a vanished file keeps the last good one too
    assert reloads_failed() == before + 2


def test_a_revoked_key_stops_working_on_the_next_request_after_a_good_reload(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    kept, revoked = new_key(), new_key()
    add_key(path, "acme", kept, key_id="kept")
    add_key(path, "acme", revoked, key_id="revoked")
    directory = TenantDirectory(path)
    assert directory.principal_for_key(revoked) is not None
    revoke_key(path, "revoked")
    assert directory.principal_for_key(revoked) is None
    assert directory.principal_for_key(kept) is not None


def test_a_missing_or_broken_file_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="keys add --tenant dev"):
        TenantDirectory(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tenants: {a: {priority: urgent}}")
    with pytest.raises(TenantsFileError, match=r"tenants\.a\.priority"):
        TenantDirectory(broken)
