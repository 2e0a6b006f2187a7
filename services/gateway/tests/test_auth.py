"""Tests of API-key parsing, hashing and authentication."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from switchboard.gateway.auth import AuthError, KeysFileError, KeyStore, bearer_key, hash_key, parse_keys
from switchboard.gateway.keys import append_key, main, new_key


def test_bearer_key_extraction() -> None:
    assert bearer_key([("authorization", "Bearer abc")]) == "abc"
    assert bearer_key([("x-other", "1"), ("Authorization", b"bearer  xyz ")]) == "xyz"
    with pytest.raises(AuthError) as missing:
        bearer_key([("x-other", "1")])
    assert missing.value.reason == "API_KEY_MISSING"
    with pytest.raises(AuthError) as malformed:
        bearer_key([("authorization", "Basic abc")])
    assert malformed.value.reason == "API_KEY_MALFORMED"
    with pytest.raises(AuthError):
        bearer_key([("authorization", "Bearer   ")])


def test_parse_keys_names_the_bad_line() -> None:
    good = json.dumps({"tenant": "a", "sha256": hash_key("k")})
    records = parse_keys(["# comment", "", good])
    assert [r.tenant for r in records] == ["a"]
    with pytest.raises(KeysFileError, match="keys:2"):
        parse_keys([good, "not json"], "keys")
    with pytest.raises(KeysFileError, match="64 hex"):
        parse_keys([json.dumps({"tenant": "a", "sha256": "abcd"})])
    with pytest.raises(KeysFileError):
        parse_keys([json.dumps({"tenant": "", "sha256": hash_key("k")})])


def test_keystore_authenticates_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    first = new_key()
    append_key(path, "alpha", first)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    store = KeyStore(path)
    assert store.authenticate([("authorization", f"Bearer {first}")]) == "alpha"
    with pytest.raises(AuthError) as wrong:
        store.authenticate([("authorization", "Bearer sb-wrong")])
    assert wrong.value.reason == "API_KEY_INVALID"
    second = new_key()
    append_key(path, "beta", second)
    # Force a visible mtime change even on coarse-grained filesystems.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert store.tenant_for(second) == "beta"
    assert store.tenant_for(first) == "alpha"
    assert len(store) == 2


def test_keystore_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read keys file"):
        KeyStore(tmp_path / "absent.jsonl")


def test_keys_command_prints_a_working_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sub" / "keys.jsonl"
    assert main(["add", "--tenant", "dev", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sb-") and len(key) > 40
    assert key not in path.read_text()  # only the hash is stored
    assert KeyStore(path).tenant_for(key) == "dev"


def test_keys_command_default_is_the_gateways_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from switchboard.common.settings import load_settings
    from switchboard.gateway.config import GatewaySettings
    from switchboard.gateway.keys import default_keys_file

    monkeypatch.delenv("GATEWAY_KEYS_FILE", raising=False)
    settings = load_settings(GatewaySettings, server_prefix="GATEWAY", environ={})
    assert default_keys_file() == settings.keys_file.expanduser()
    monkeypatch.setenv("GATEWAY_KEYS_FILE", "/tmp/some/keys.jsonl")
    assert default_keys_file() == Path("/tmp/some/keys.jsonl")
