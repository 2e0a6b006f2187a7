"""Manage API keys in the tenants file: `python -m switchboard.gateway.keys add --tenant dev`.

`add` prints a new random key once and stores only its SHA-256 under the tenant in the tenants
file (GATEWAY_TENANTS_FILE, or --file), creating the file (mode 0600) or the tenant (every expert
allowed, no limits) when missing. `revoke --id KEY_ID` removes a key. The file is rewritten
atomically (a temporary file renamed over it), so a gateway never reads half a file; it picks the
change up on its next request. Comments in the file are not kept by a rewrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from switchboard.gateway.tenants import TenantsFileError, hash_key, parse_tenants

KEY_PREFIX = "sb-"


def new_key() -> str:
    """A fresh random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"tenants": {}}
    text = path.read_text(encoding="utf-8")
    parse_tenants(text, str(path), path.parent)  # refuse to edit a file the gateway would refuse
    return yaml.safe_load(text) or {"tenants": {}}


def _write_document(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(document, sort_keys=False)
    parse_tenants(text, str(path), path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_key(
    path: Path, tenant: str, key: str, key_id: str | None = None, scopes: list[str] | None = None
) -> str:
    """Store the hash of `key` under `tenant` (created, with `scopes` if given, when missing); return the key's id."""
    if not tenant:
        raise ValueError("tenant must not be empty")
    document = _read_document(path)
    tenants = document.setdefault("tenants", {}) or {}
    document["tenants"] = tenants
    entry = tenants.get(tenant) or ({"scopes": list(scopes)} if scopes else {})
    tenants[tenant] = entry
    keys = entry.setdefault("keys", []) or []
    entry["keys"] = keys
    taken = {k.get("id") for t in tenants.values() for k in ((t or {}).get("keys") or [])}
    key_id = key_id or next(f"{tenant}-{n}" for n in range(1, len(taken) + 2) if f"{tenant}-{n}" not in taken)
    if key_id in taken:
        raise ValueError(f"key id {key_id!r} is already used")
    keys.append({"id": key_id, "sha256": hash_key(key)})
    _write_document(path, document)
    return key_id


def revoke_key(path: Path, key_id: str) -> str:
    """Remove the key with this id; return its tenant. KeyError if no key has it."""
    document = _read_document(path)
    for name, entry in (document.get("tenants") or {}).items():
        keys = (entry or {}).get("keys") or []
        kept = [k for k in keys if k.get("id") != key_id]
        if len(kept) != len(keys):
            entry["keys"] = kept
            _write_document(path, document)
            return str(name)
    raise KeyError(key_id)


def default_tenants_file() -> Path:
    """GATEWAY_TENANTS_FILE, else the gateway's documented default (the file the gateway reads)."""
    configured = os.environ.get("GATEWAY_TENANTS_FILE")
    if configured:
        return Path(configured).expanduser()
    from switchboard.gateway.config import GatewaySettings

    default = next(f.default for f in dataclasses.fields(GatewaySettings) if f.name == "tenants_file")
    return Path(default).expanduser()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `add --tenant NAME [--id ID] [--file PATH]` prints the new key; `revoke --id ID`."""
    parser = argparse.ArgumentParser(prog="python -m switchboard.gateway.keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key for a tenant and store its hash")
    add.add_argument("--tenant", required=True, help="tenant that owns the key")
    add.add_argument("--id", default=None, help="the key's id in audit lines (default: <tenant>-<n>)")
    revoke = commands.add_parser("revoke", help="remove a key by its id")
    revoke.add_argument("--id", required=True, help="id of the key to remove")
    for command in (add, revoke):
        command.add_argument("--file", type=Path, default=None, help="tenants file (default: GATEWAY_TENANTS_FILE)")
    args = parser.parse_args(argv)
    path = args.file or default_tenants_file()
    try:
        if args.command == "add":
            key = new_key()
            key_id = add_key(path, args.tenant, key, args.id)
            print(key)
            print(f"stored the hash of key {key_id!r} for tenant {args.tenant!r} in {path}", file=sys.stderr)
        else:
            tenant = revoke_key(path, args.id)
            print(f"revoked key {args.id!r} of tenant {tenant!r} in {path}", file=sys.stderr)
    except (TenantsFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"error: no key with id {args.id!r} in {path}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
