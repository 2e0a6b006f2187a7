"""Layering: no service (nor libs/common) imports the CLI/tools packages.

The services run in images that carry only their own package and libs/common; the tools
(`switchboard up`, demo experts, benchmarks, gate training, the simulator) sit above them and hand
them what they need (model folders, config files). Two checks: a static scan of every import
statement in the services' sources (lazy imports inside functions included), and a subprocess that
imports every module of every service package and then finds none of the tools in `sys.modules`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = {
    "gateway": REPO / "services/gateway/src/switchboard/gateway",
    "router": REPO / "services/router/src/switchboard/router",
    "scheduler": REPO / "services/scheduler/src/switchboard/scheduler",
    "generator": REPO / "services/generator/src/switchboard/generator",
    "common": REPO / "libs/common/src/switchboard/common",
}
FORBIDDEN = (
    "switchboard.cli",
    "switchboard.experts",
    "switchboard.bench",
    "switchboard.routing",
    "switchboard.simulation",
    "switchboard.backup",
)


def forbidden(name: str) -> bool:
    """Whether module `name` is one of the tools packages or inside one."""
    return any(name == p or name.startswith(p + ".") for p in FORBIDDEN)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a source file, at any depth."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def test_no_service_source_imports_a_tools_package() -> None:
    problems = [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for package in SERVICE_PACKAGES.values()
        for path in sorted(package.rglob("*.py"))
        for line, name in imported_names(path)
        if forbidden(name)
    ]
    assert not problems, "services must not import the CLI/tools packages:\n" + "\n".join(problems)


def test_importing_every_service_module_loads_no_tools_package() -> None:
    script = """
import importlib, json, pkgutil, sys
loaded = []
for package in ("switchboard.gateway", "switchboard.router", "switchboard.scheduler", "switchboard.generator", "switchboard.common"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # importing __main__ would start the service
        importlib.import_module(info.name)
        loaded.append(info.name)
print(json.dumps({"loaded": loaded, "modules": sorted(sys.modules)}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["loaded"]) > 20  # the walk found the services' modules
    leaked = [name for name in report["modules"] if forbidden(name)]
    assert not leaked, f"importing the services loaded tools packages: {leaked}"
