"""What the gateway's YAML config files (tenants, prices) share: field checks and reload on change.

`FieldErrors` checks the shape of a parsed document and names the path of a bad value in the
file's own exception type. `WatchedFile` keeps the value parsed from a file and re-parses it when
the file's identity changes (atomic replace and in-place edits both change it); a bad edit keeps
the last good value, counts a reload failure and is logged once per bad version.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client import Counter
from switchboard.common.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")
FileIdentity = tuple[int, int, int, int]


@dataclass(frozen=True)
class FieldErrors:
    """Shape checks that raise `error` (the config file's exception type) naming the value's path."""

    error: type[Exception]

    def fail(self, path: str, message: str) -> Exception:
        return self.error(f"{path}: {message}")

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        """`value` as a mapping (None: empty)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def check_keys(self, mapping: Mapping[str, Any], allowed: set[str], path: str) -> None:
        """Refuse a key outside `allowed`, listing what is allowed."""
        unknown = sorted(str(k) for k in mapping if k not in allowed)
        if unknown:
            raise self.fail(path, f"unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(allowed))}")


def file_identity(path: Path) -> FileIdentity:
    """What changes when the file is replaced or edited (inode, size, modification and change times)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class WatchedFile(Generic[T]):
    """The value parsed from a file, re-parsed when the file changes; a bad edit keeps the last good one."""

    def __init__(
        self,
        path: Path,
        value: T,
        identity: FileIdentity,
        parse: Callable[[str], T],
        errors: tuple[type[Exception], ...],
        what: str,
        failures: Counter,
    ) -> None:
        """`value` was parsed from the file as it was at `identity`; `errors` are parse's refusals."""
        self.path = path
        self.value = value
        self._identity = identity
        self._parse = parse
        self._errors = (OSError, UnicodeDecodeError, *errors)
        self._what = what
        self._failures = failures
        self._lock = threading.Lock()
        self._refused: FileIdentity | None = None

    def reload_if_changed(self) -> T | None:
        """Re-read the file if its identity changed; the new value when one took effect, else None."""
        try:
            identity = file_identity(self.path)
        except OSError as exc:
            self._refuse(None, f"cannot read {self.path}: {exc.strerror}")
            return None
        if identity == self._identity:
            return None
        with self._lock:
            if identity == self._identity:
                return None
            try:
                value = self._parse(self.path.read_text(encoding="utf-8"))
            except self._errors as exc:
                self._refuse(identity, str(exc))
                return None
            self.value, self._identity = value, identity
        return value

    def _refuse(self, identity: FileIdentity | None, why: str) -> None:
        # Remember the bad identity so a broken file is reported once, not on every request.
        if identity is not None and identity == self._refused:
            return
        self._refused = identity
        self._failures.inc()
        log.error(f"{self._what} refused; keeping the last good one", error=why)
