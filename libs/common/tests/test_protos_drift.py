"""The checked-in generated code matches protos/ (run `make protos` to fix)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    """A copy of the repo with an edited proto must fail the check."""
    for part in ("protos", "scripts"):
        subprocess.run(["cp", "-r", str(ROOT / part), str(tmp_path / part)], check=True)
    target = tmp_path / "libs" / "common" / "src" / "switchboard"
    target.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ROOT / "libs/common/src/switchboard/v1"), str(target / "v1")], check=True)
    proto = tmp_path / "protos" / "switchboard" / "v1" / "common.proto"
    proto.write_text(proto.read_text().replace("message Usage {", "message Usage {\n  uint32 extra_field = 99;"))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "common_pb2.py" in result.stderr and "make protos" in result.stderr


BUF = ROOT / ".cache" / "node" / "node_modules" / ".bin" / "buf"


def test_buf_lint_and_format() -> None:
    """The contracts pass `buf lint` (STANDARD rules) and are `buf format`-clean (installed by `make buf`)."""
    assert BUF.exists(), "buf is missing: run `make buf` (make test does)"
    lint = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(BUF), "format", "-d", "--exit-code"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


BASELINE_FILE = ROOT / "protos" / "BREAKING_BASELINE"


def breaking_baseline() -> str:
    """The git input of the last released contracts (protos/BREAKING_BASELINE), checked to be usable.

    Fails, saying why, when the checkout cannot answer: no git metadata, or a shallow clone that
    lacks the baseline commit (buf reads the old contracts out of the repository's history).
    """
    commit = BASELINE_FILE.read_text().strip()
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), (
        f"{BASELINE_FILE} must hold one 40-hex commit, got {commit!r}"
    )
    git_dir = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert git_dir.returncode == 0, (
        f"buf breaking needs the git history to read the baseline contracts, and {ROOT} is not a git "
        f"checkout: {git_dir.stderr.strip()}"
    )
    present = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True, timeout=30
    )
    if present.returncode != 0:
        shallow = subprocess.run(
            ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        why = (
            "this checkout is a shallow clone, so the baseline commit is not in it; "
            "run `git fetch --unshallow` (or clone with full history, e.g. actions/checkout fetch-depth: 0)"
            if shallow == "true"
            else "the commit is not in this repository; fix protos/BREAKING_BASELINE"
        )
        raise AssertionError(f"cannot check breaking changes against {commit}: {why}")
    return f"{git_dir.stdout.strip()}#ref={commit},subdir=protos"


def buf_breaking(cwd: Path, against: str) -> subprocess.CompletedProcess[str]:
    """`buf breaking protos --against AGAINST` run from `cwd` (where buf.yaml selects the FILE rules)."""
    return subprocess.run(
        [str(BUF), "breaking", "protos", "--against", against],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_buf_breaking_against_the_released_contracts() -> None:
    """The contracts only add to the last released ones (buf breaking, FILE rules, see buf.yaml)."""
    assert BUF.exists(), "buf is missing: run `make buf` (make test does)"
    result = buf_breaking(ROOT, breaking_baseline())
    assert result.returncode == 0, (
        "the contracts break wire or generated-code compatibility with protos/BREAKING_BASELINE; add fields "
        "and mark old ones [deprecated = true] instead:\n" + result.stdout + result.stderr
    )


def test_buf_breaking_detects_a_deleted_field(tmp_path: Path) -> None:
    """A copy of the contracts without a released field must fail the breaking check."""
    assert BUF.exists(), "buf is missing: run `make buf` (make test does)"
    against = breaking_baseline()
    for part in ("protos", "buf.yaml"):
        subprocess.run(["cp", "-r", str(ROOT / part), str(tmp_path / part)], check=True)
    proto = tmp_path / "protos" / "switchboard" / "v1" / "common.proto"
    field = "  uint32 completion_tokens = 2;\n"
    assert field in proto.read_text()
    proto.write_text(proto.read_text().replace(field, ""))
    result = buf_breaking(tmp_path, against)
    assert result.returncode != 0
    assert 'field "2" with name "completion_tokens" on message "Usage" was deleted' in result.stdout
