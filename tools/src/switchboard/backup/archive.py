"""One versioned archive of the state that took work to make: the router's gate, the scheduler's policies, config.

An archive is a tar file holding `manifest.json` and, under `members/<name>/`, a copy of each
saved path (a file, or a folder such as the gate artifact). The manifest gives the format and its
version, when the archive was made, and per member its role, the path it was saved from and each
file's relative path, size, modification time and SHA-256:

    {"format": "switchboard-backup", "version": 1, "created_at": "2026-12-01T22:40:00Z",
     "members": [{"name": "gate", "role": "gate", "kind": "dir", "source": "/srv/gate",
                  "files": [{"path": "gate.json", "size": 812, "mtime": 1764628800.0, "sha256": "..."}]}]}

Both directions are atomic where it matters:

- `write_archive` writes a temporary file next to the target, fsyncs it and renames it over the
  target, so a crash leaves either the old archive or the whole new one, never half of one.
- `read_archive` checks everything before `restore` writes anything: the tar must read, the
  manifest must be of a known version, every listed file must be present with its size and
  SHA-256, and no member may point outside its folder. A corrupt archive changes nothing.
- `restore` writes each file member to a temporary file in the target's folder, fsyncs it and
  renames it over the target; a folder member is written into a temporary sibling folder and
  swapped in with two renames (the old folder is kept under a `.old` name until the new one is in
  place), so a reader of the target never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "switchboard-backup"
VERSION = 1
MANIFEST = "manifest.json"
MEMBERS_DIR = "members"
# Roles an archive member may have; the CLI maps each to the setting that names its path.
ROLES = ("gate", "policy", "tenants", "prices", "rollouts")


class BackupError(Exception):
    """A backup cannot be made or an archive cannot be restored; the message says why and what to do."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a member: its path relative to the member, size, modification time and SHA-256."""

    path: str
    size: int
    mtime: float
    sha256: str


@dataclass(frozen=True)
class Member:
    """One saved path: its unique name in the archive, role, kind (file or dir), origin and files."""

    name: str
    role: str
    kind: str
    source: str
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Manifest:
    """What an archive holds (the parsed manifest.json)."""

    version: int
    created_at: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Source:
    """A path to save under a role (e.g. the gate folder under `gate`)."""

    role: str
    path: Path


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file of a file or folder, sorted."""
    if path.is_file():
        return [(path.name, path)]
    found = []
    for item in sorted(path.rglob("*")):
        if item.is_symlink():
            raise BackupError(f"{item}: a symbolic link; back up the file it points to instead")
        if item.is_file():
            found.append((item.relative_to(path).as_posix(), item))
    return found


def _member_names(sources: Sequence[Source]) -> list[str]:
    """Unique names: the role, then role-2, role-3 for a role given more than once (several policies)."""
    counts: dict[str, int] = {}
    names = []
    for source in sources:
        counts[source.role] = counts.get(source.role, 0) + 1
        names.append(source.role if counts[source.role] == 1 else f"{source.role}-{counts[source.role]}")
    return names


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    with contextlib.suppress(OSError):  # some filesystems cannot open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[io.BufferedWriter]:
    """A file written next to `target`, fsynced and renamed over it on success, removed on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if target.is_file():  # a replaced file keeps its permissions (mkstemp makes it 0600)
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_dir(target.parent)


def write_archive(target: Path, sources: Sequence[Source], now: float | None = None) -> Manifest:
    """Save `sources` into one archive at `target` (atomically); return its manifest."""
    if not sources:
        raise BackupError("nothing to back up: name at least one of --gate, --policy, --tenants, --prices, --rollouts")
    members = []
    contents: list[tuple[str, bytes, float]] = []
    for source, name in zip(sources, _member_names(sources), strict=True):
        if source.role not in ROLES:
            raise BackupError(f"unknown role {source.role!r}; one of {', '.join(ROLES)}")
        path = source.path.expanduser()
        if not path.exists():
            raise BackupError(f"{source.role}: {path} does not exist")
        entries = []
        for relative, absolute in _files_of(path):
            # Read once: the bytes archived are the bytes hashed, even if the file changes meanwhile.
            mtime, content = absolute.stat().st_mtime, absolute.read_bytes()
            entries.append(FileEntry(relative, len(content), mtime, hashlib.sha256(content).hexdigest()))
            contents.append((f"{MEMBERS_DIR}/{name}/{relative}", content, mtime))
        kind = "file" if path.is_file() else "dir"
        members.append(Member(name, source.role, kind, str(path.resolve()), tuple(entries)))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    manifest = Manifest(VERSION, created, tuple(members))
    manifest_bytes = json.dumps(_manifest_json(manifest), indent=2, sort_keys=True).encode()
    with _atomic_file(target) as handle, tarfile.open(fileobj=handle, mode="w") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(manifest_bytes), int(time.time() if now is None else now)
        tar.addfile(info, io.BytesIO(manifest_bytes))
        for arcname, content, mtime in contents:
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime, info.mode = len(content), int(mtime), 0o600
            tar.addfile(info, io.BytesIO(content))
    return manifest


def _manifest_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": manifest.version,
        "created_at": manifest.created_at,
        "members": [
            {
                "name": m.name,
                "role": m.role,
                "kind": m.kind,
                "source": m.source,
                "files": [{"path": f.path, "size": f.size, "mtime": f.mtime, "sha256": f.sha256} for f in m.files],
            }
            for m in manifest.members
        ],
    }


def _safe_relative(path: str, where: str) -> str:
    """`path` if it stays inside its folder (no absolute path, no `..`), else a BackupError."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise BackupError(f"corrupt archive: {where} names an unsafe path {path!r}")
    return pure.as_posix()


def _parse_manifest(raw: bytes, archive: Path) -> Manifest:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupError(f"corrupt archive {archive}: {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(document, Mapping) or document.get("format") != FORMAT:
        raise BackupError(f"{archive} is not a Switchboard backup ({MANIFEST} has no format {FORMAT!r})")
    version = document.get("version")
    if version != VERSION:
        raise BackupError(
            f"{archive} is a backup of version {version!r}; this switchboard reads version {VERSION} only "
            "(restore it with the switchboard release that wrote it)"
        )
    try:
        members = []
        names: set[str] = set()
        for raw_member in document["members"]:
            name = _safe_relative(str(raw_member["name"]), "a member")
            if "/" in name or name in names:
                raise BackupError(f"corrupt archive {archive}: member name {name!r} is nested or repeated")
            names.add(name)
            role, kind = str(raw_member["role"]), str(raw_member["kind"])
            if role not in ROLES or kind not in ("file", "dir"):
                raise BackupError(f"corrupt archive {archive}: member {name} has role {role!r}, kind {kind!r}")
            files = tuple(
                FileEntry(
                    _safe_relative(str(f["path"]), f"member {name}"), int(f["size"]), float(f["mtime"]), str(f["sha256"])
                )
                for f in raw_member["files"]
            )
            if kind == "file" and len(files) != 1:
                raise BackupError(f"corrupt archive {archive}: file member {name} lists {len(files)} files")
            members.append(Member(name, role, kind, str(raw_member["source"]), files))
        return Manifest(VERSION, str(document["created_at"]), tuple(members))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"corrupt archive {archive}: {MANIFEST} lacks or misstates a field ({exc!r})") from None


@dataclass(frozen=True)
class VerifiedArchive:
    """An archive whose every file matched its manifest: the manifest and the files' bytes by tar path."""

    manifest: Manifest
    data: Mapping[str, bytes]

    def member_bytes(self, member: Member) -> list[tuple[str, bytes]]:
        """(relative path, bytes) of each file of `member`."""
        return [(f.path, self.data[f"{MEMBERS_DIR}/{member.name}/{f.path}"]) for f in member.files]


def read_archive(archive: Path) -> VerifiedArchive:
    """Read and verify an archive in memory; BackupError says what is wrong with a corrupt or unknown one."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            data: dict[str, bytes] = {}
            for info in tar:
                if not info.isfile():
                    raise BackupError(f"corrupt archive {archive}: {info.name!r} is not a regular file")
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has data
                data[info.name] = extracted.read()
    except FileNotFoundError:
        raise BackupError(f"{archive} does not exist") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"corrupt archive {archive}: it does not read as a tar file ({exc})") from None
    if MANIFEST not in data:
        raise BackupError(f"corrupt archive {archive}: no {MANIFEST}")
    manifest = _parse_manifest(data[MANIFEST], archive)
    expected = {MANIFEST}
    for member in manifest.members:
        for entry in member.files:
            tar_path = f"{MEMBERS_DIR}/{member.name}/{entry.path}"
            expected.add(tar_path)
            content = data.get(tar_path)
            if content is None:
                raise BackupError(f"corrupt archive {archive}: {tar_path} is listed in the manifest but missing")
            if len(content) != entry.size or hashlib.sha256(content).hexdigest() != entry.sha256:
                raise BackupError(f"corrupt archive {archive}: {tar_path} does not match its SHA-256 in the manifest")
    extra = sorted(set(data) - expected)
    if extra:
        raise BackupError(f"corrupt archive {archive}: files not in the manifest: {', '.join(extra)}")
    return VerifiedArchive(manifest, data)


def _restore_file(target: Path, content: bytes, mtime: float) -> None:
    with _atomic_file(target) as handle:
        handle.write(content)
    os.utime(target, (mtime, mtime))


def _restore_dir(target: Path, files: Sequence[tuple[FileEntry, bytes]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".restore", dir=target.parent))
    try:
        for entry, content in files:
            path = staging / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.utime(path, (entry.mtime, entry.mtime))
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def restore(verified: VerifiedArchive, targets: Mapping[str, Path]) -> list[tuple[Member, Path]]:
    """Write each member of a verified archive to its target (by member name; default: where it was saved from).

    Returns (member, path) per member restored.
    """
    unknown = sorted(set(targets) - {m.name for m in verified.manifest.members})
    if unknown:
        raise BackupError(f"the archive has no member {', '.join(unknown)}; it has {_names(verified.manifest)}")
    plan = [(m, Path(targets.get(m.name, m.source)).expanduser()) for m in verified.manifest.members]
    for member, path in plan:
        if member.kind == "file" and path.is_dir():
            raise BackupError(f"{member.name}: {path} is a folder; the archive holds a file for it")
        if member.kind == "dir" and path.is_file():
            raise BackupError(f"{member.name}: {path} is a file; the archive holds a folder for it")
    for member, path in plan:
        files = member.files
        contents = [content for _, content in verified.member_bytes(member)]
        if member.kind == "file":
            _restore_file(path, contents[0], files[0].mtime)
        else:
            _restore_dir(path, list(zip(files, contents, strict=True)))
    return plan


def _names(manifest: Manifest) -> str:
    return ", ".join(m.name for m in manifest.members) or "none"
