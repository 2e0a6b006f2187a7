"""Generate the Python code of the contracts in protos/ (one command: `make protos`).

The output lands in libs/common/src/switchboard/v1 as an importable package
(`from switchboard.v1 import gateway_pb2`) with type stubs; protoc's own import
paths already match the package layout, so no import fix-ups are needed.
With --check, generate into a temporary folder and fail if anything differs from
the checked-in files (the drift check that CI runs through the test suite).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs" / "common" / "src"
PACKAGE_DIR = Path("switchboard") / "v1"


def generate(out_root: Path) -> None:
    """Run protoc on every .proto under protos/ into out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generated_files(root: Path) -> set[str]:
    """Names of the generated files under root/switchboard/v1."""
    folder = root / PACKAGE_DIR
    return {p.name for p in folder.glob("*") if p.suffix in {".py", ".pyi"} and p.name != "__init__.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    options = parser.parse_args()
    if not options.check:
        generate(OUT_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(OUT_ROOT)
        stale = sorted(expected ^ actual)
        stale += sorted(
            name
            for name in expected & actual
            if not filecmp.cmp(fresh / PACKAGE_DIR / name, OUT_ROOT / PACKAGE_DIR / name, shallow=False)
        )
        if stale:
            print("generated code is stale; run `make protos`: " + ", ".join(stale), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
