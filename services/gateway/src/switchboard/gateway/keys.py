"""Create API keys for the gateway: `python -m switchboard.gateway.keys add --tenant dev`.

`add` prints a new random key once and appends only its SHA-256 to the keys file
(GATEWAY_KEYS_FILE, or --file). The gateway picks up the new line without a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from switchboard.gateway.auth import hash_key

KEY_PREFIX = "sb-"


def new_key() -> str:
    """A fresh random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def append_key(path: Path, tenant: str, key: str) -> None:
    """Append the hash of `key` for `tenant` to the keys file (created 0600 if missing)."""
    if not tenant:
        raise ValueError("tenant must not be empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"tenant": tenant, "sha256": hash_key(key)}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line)


def default_keys_file() -> Path:
    """GATEWAY_KEYS_FILE, else the gateway's documented default (the file the gateway reads)."""
    configured = os.environ.get("GATEWAY_KEYS_FILE")
    if configured:
        return Path(configured).expanduser()
    from switchboard.gateway.config import GatewaySettings

    default = next(f.default for f in dataclasses.fields(GatewaySettings) if f.name == "keys_file")
    return Path(default).expanduser()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `add --tenant NAME [--file PATH]` prints the new key."""
    parser = argparse.ArgumentParser(prog="python -m switchboard.gateway.keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key for a tenant and append its hash")
    add.add_argument("--tenant", required=True, help="tenant that owns the key")
    add.add_argument("--file", type=Path, default=None, help="keys file (default: GATEWAY_KEYS_FILE or the cache)")
    args = parser.parse_args(argv)
    path = args.file or default_keys_file()
    key = new_key()
    append_key(path, args.tenant, key)
    print(key)
    print(f"appended the hash for tenant {args.tenant!r} to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
