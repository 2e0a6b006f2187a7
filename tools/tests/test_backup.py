"""`switchboard backup` / `switchboard restore` with real files: round trip, restore over existing files,
and the refusals (a truncated or tampered archive, an unknown version, unsafe paths) that write nothing."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from switchboard.backup.archive import VERSION, BackupError, Source, read_archive, restore, write_archive
from switchboard.cli.main import main


@pytest.fixture
def state(tmp_path: Path) -> dict[str, Path]:
    """A gate folder (with a nested file), two policy files, a tenants file, a price table and rollout state."""
    gate = tmp_path / "live" / "gate"
    (gate / "weights").mkdir(parents=True)
    (gate / "gate.json").write_text('{"experts": ["a", "b"]}')
    (gate / "weights" / "w.bin").write_bytes(bytes(range(256)) * 4)
    policy, policy2 = tmp_path / "live" / "policy.json", tmp_path / "live" / "policy-b.json"
    policy.write_text('{"schema": 3}')
    policy2.write_text('{"schema": 4}')
    tenants, prices = tmp_path / "live" / "tenants.yaml", tmp_path / "live" / "prices.yaml"
    tenants.write_text("tenants: {dev: {}}\n")
    prices.write_text("currency: USD\n")
    rollouts = tmp_path / "live" / "rollouts.json"
    rollouts.write_text('{"schema": "switchboard.rollouts/v1", "rollouts": []}')
    return {
        "gate": gate,
        "policy": policy,
        "policy-2": policy2,
        "tenants": tenants,
        "prices": prices,
        "rollouts": rollouts,
    }


def sources(state: dict[str, Path]) -> list[Source]:
    return [Source(name.split("-")[0], path) for name, path in state.items()]


def snapshot(state: dict[str, Path]) -> dict[str, bytes]:
    """Every file's bytes, by its path."""
    found = {}
    for path in state.values():
        for item in [path] if path.is_file() else sorted(path.rglob("*")):
            if item.is_file():
                found[str(item)] = item.read_bytes()
    return found


def rewrite(archive: Path, edit) -> None:
    """Rewrite an archive's members through `edit(name, bytes) -> bytes | None` (None drops it)."""
    with tarfile.open(archive) as tar:
        members = [(i.name, tar.extractfile(i).read()) for i in tar]  # type: ignore[union-attr]
    with tarfile.open(archive, "w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a write left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_manifest_lists_version_timestamps_and_hashes(tmp_path: Path, state: dict[str, Path]) -> None:
    archive = tmp_path / "backup.tar"
    manifest = write_archive(archive, sources(state), now=1_764_628_800)
    assert manifest.version == VERSION and manifest.created_at == "2025-12-01T22:40:00Z"
    assert [m.name for m in manifest.members] == ["gate", "policy", "policy-2", "tenants", "prices", "rollouts"]
    gate = manifest.members[0]
    assert gate.kind == "dir" and [f.path for f in gate.files] == ["gate.json", "weights/w.bin"]
    assert gate.files[1].sha256 == hashlib.sha256(bytes(range(256)) * 4).hexdigest()
    assert gate.files[0].mtime == state["gate"].joinpath("gate.json").stat().st_mtime
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "manifest.json"
        document = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert document["format"] == "switchboard-backup" and document["version"] == VERSION
    assert leftovers(tmp_path) == []


def test_restore_over_existing_files_brings_back_every_byte(tmp_path: Path, state: dict[str, Path]) -> None:
    archive = tmp_path / "backup.tar"
    write_archive(archive, sources(state))
    saved = snapshot(state)
    # Everything changes after the backup: edits, a stale extra file in the gate, a deleted policy.
    state["tenants"].write_text("tenants: {intruder: {}}\n")
    state["tenants"].chmod(0o640)
    (state["gate"] / "gate.json").write_text("{}")
    (state["gate"] / "stale.json").write_text("old")
    state["policy"].unlink()
    restored = restore(read_archive(archive), {})
    assert [str(path) for _, path in restored] == [str(p.resolve()) for p in state.values()]
    assert snapshot(state) == saved
    assert not (state["gate"] / "stale.json").exists()  # the folder is the archived one, not a merge
    assert state["tenants"].stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permissions
    assert leftovers(state["tenants"].parent) == []


def test_restore_to_other_paths(tmp_path: Path, state: dict[str, Path]) -> None:
    archive = tmp_path / "backup.tar"
    write_archive(archive, [Source("gate", state["gate"]), Source("tenants", state["tenants"])])
    elsewhere = tmp_path / "elsewhere"
    restore(read_archive(archive), {"gate": elsewhere / "g", "tenants": elsewhere / "t.yaml"})
    assert (elsewhere / "g" / "weights" / "w.bin").read_bytes() == (state["gate"] / "weights" / "w.bin").read_bytes()
    assert (elsewhere / "t.yaml").read_text() == state["tenants"].read_text()
    with pytest.raises(BackupError, match="no member prices; it has gate, tenants"):
        restore(read_archive(archive), {"prices": elsewhere / "p.yaml"})
    with pytest.raises(BackupError, match="is a folder; the archive holds a file"):
        restore(read_archive(archive), {"tenants": elsewhere})


def test_a_failed_backup_keeps_the_previous_archive(tmp_path: Path, state: dict[str, Path]) -> None:
    archive = tmp_path / "backup.tar"
    write_archive(archive, sources(state))
    before = archive.read_bytes()
    with pytest.raises(BackupError, match="does not exist"):
        write_archive(archive, [Source("tenants", state["tenants"]), Source("prices", tmp_path / "absent.yaml")])
    with pytest.raises(BackupError, match="nothing to back up"):
        write_archive(archive, [])
    assert archive.read_bytes() == before and leftovers(tmp_path) == []


def _flip_a_byte(name: str, data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("w.bin") else data


def _version(version: object):
    def edit(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        document = json.loads(data)
        document["version"] = version
        return json.dumps(document).encode()

    return edit


def _unsafe_path(name: str, data: bytes) -> bytes:
    if name != "manifest.json":
        return data
    document = json.loads(data)
    document["members"][1]["files"][0]["path"] = "../../etc/passwd"
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:1024]), "corrupt archive"),  # cut inside the manifest
        (lambda p: p.write_bytes(b"not a tar at all" * 100), "does not read as a tar file"),
        (lambda p: rewrite(p, _flip_a_byte), "w.bin does not match its SHA-256"),
        (lambda p: rewrite(p, lambda n, d: None if n.endswith("tenants.yaml") else d), "listed in the manifest but missing"),
        (lambda p: rewrite(p, lambda n, d: None if n == "manifest.json" else d), "no manifest.json"),
        (lambda p: rewrite(p, lambda n, d: b"{" if n == "manifest.json" else d), "is not JSON"),
        (lambda p: rewrite(p, _version(99)), "version 99; this switchboard reads version 1 only"),
        (lambda p: rewrite(p, _version(None)), "version None"),
        (lambda p: rewrite(p, _unsafe_path), "unsafe path '../../etc/passwd'"),
    ],
)
def test_a_corrupt_or_unknown_archive_is_refused_and_nothing_is_written(
    tmp_path: Path, state: dict[str, Path], corrupt, message: str
) -> None:
    archive = tmp_path / "backup.tar"
    write_archive(archive, sources(state))
    corrupt(archive)
    for path in state.values():  # the live files change after the backup; a refused restore must keep them
        if path.is_file():
            path.write_text("edited after the backup")
    live = snapshot(state)
    with pytest.raises(BackupError, match=message.replace("(", r"\(")):
        restore(read_archive(archive), {})
    assert snapshot(state) == live


def test_the_cli_backs_up_from_the_services_variables_and_restores(
    tmp_path: Path, state: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUTER_GATE_PATH", str(state["gate"]))
    monkeypatch.setenv("GATEWAY_TENANTS_FILE", str(state["tenants"]))
    monkeypatch.setenv("GATEWAY_PRICES_FILE", "")  # set but empty: left out
    monkeypatch.delenv("SCHEDULER_POLICY_FILE", raising=False)
    archive = tmp_path / "b.tar"
    # A flag wins over the variable; two policies are two members.
    assert main(["backup", str(archive), "--policy", str(state["policy"]), "--policy", str(state["policy-2"])]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["restore", "--check", str(archive)]) == 0
    listing = capsys.readouterr().out
    assert "intact" in listing and all(f"{n}:" in listing for n in ("gate", "policy", "policy-2", "tenants"))
    assert "prices" not in listing
    state["policy-2"].write_text("changed")
    target = tmp_path / "restored-tenants.yaml"
    assert main(["restore", str(archive), "--to", f"tenants={target}"]) == 0
    assert state["policy-2"].read_text() == '{"schema": 4}' and target.read_text() == state["tenants"].read_text()
    rewrite(archive, _version(2))
    assert main(["restore", str(archive)]) == 2
    assert "version 2; this switchboard reads version 1 only" in capsys.readouterr().err
    assert main(["restore", str(archive), "--to", "tenants"]) == 2
    assert main(["backup", str(archive), "--gate", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
