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
