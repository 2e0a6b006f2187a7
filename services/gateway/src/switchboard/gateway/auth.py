"""API-key authentication: `authorization: Bearer <key>` checked against hashed keys.

The keys file (GATEWAY_KEYS_FILE) holds one JSON object per line,
`{"tenant": "dev", "sha256": "<hex digest of the key>"}`; blank lines and lines
starting with `#` are ignored. Only hashes are stored, so a leaked keys file does
not leak keys. The file is re-read when its modification time changes, so keys
added with `python -m switchboard.gateway.keys add` work without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BEARER_PREFIX = "bearer "


class AuthError(Exception):
    """The request carries no usable API key; `reason` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class KeysFileError(Exception):
    """The keys file cannot be read or has a malformed line."""


@dataclass(frozen=True)
class KeyRecord:
    """One accepted key, stored as the SHA-256 of the key."""

    tenant: str
    sha256: bytes


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key, as stored in the keys file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(lines: Iterable[str], source: str = "keys file") -> list[KeyRecord]:
    """Parse the JSON-lines keys file; raise KeysFileError naming the bad line."""
    records: list[KeyRecord] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = json.loads(line)
            tenant = entry["tenant"]
            digest = bytes.fromhex(entry["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KeysFileError(
                f"{source}:{number}: expected {{\"tenant\": ..., \"sha256\": <64 hex chars>}} ({exc})"
            ) from exc
        if not isinstance(tenant, str) or not tenant or len(digest) != 32:
            raise KeysFileError(f"{source}:{number}: tenant must be a non-empty string and sha256 64 hex chars")
        records.append(KeyRecord(tenant=tenant, sha256=digest))
    return records


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Extract the key from `authorization: Bearer <key>` metadata, or raise AuthError."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if not text.lower().startswith(BEARER_PREFIX) or not text[len(BEARER_PREFIX) :].strip():
            raise AuthError("API_KEY_MALFORMED", "malformed authorization metadata: expected 'Bearer <api key>'")
        return text[len(BEARER_PREFIX) :].strip()
    raise AuthError("API_KEY_MISSING", "missing API key: send metadata 'authorization: Bearer <key>'")


class KeyStore:
    """The accepted keys, reloaded from their file when it changes."""

    def __init__(self, path: Path) -> None:
        """Load the keys file; raise KeysFileError if it is missing or malformed."""
        self._path = path
        self._lock = threading.Lock()
        self._mtime_ns = -1
        self._records: list[KeyRecord] = []
        self._reload_if_changed()

    @property
    def path(self) -> Path:
        """The keys file."""
        return self._path

    def __len__(self) -> int:
        return len(self._records)

    def _reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self._path).st_mtime_ns
        except OSError as exc:
            raise KeysFileError(f"cannot read keys file {self._path}: {exc.strerror}") from exc
        if mtime == self._mtime_ns:
            return
        with self._lock:
            text = self._path.read_text(encoding="utf-8")
            self._records = parse_keys(text.splitlines(), str(self._path))
            self._mtime_ns = mtime

    def tenant_for(self, key: str) -> str | None:
        """The tenant owning `key`, or None.

        Every stored hash is compared with hmac.compare_digest and the loop never
        exits early, so the time taken does not reveal which hash nearly matched.
        """
        try:
            self._reload_if_changed()
        except KeysFileError:
            # Keep serving with the last good keys if the file is mid-rewrite or broken.
            pass
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for record in self._records:
            if hmac.compare_digest(digest, record.sha256) and found is None:
                found = record.tenant
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """Return the tenant of the request's bearer key, or raise AuthError."""
        key = bearer_key(metadata)
        tenant = self.tenant_for(key)
        if tenant is None:
            raise AuthError("API_KEY_INVALID", "invalid API key")
        return tenant
