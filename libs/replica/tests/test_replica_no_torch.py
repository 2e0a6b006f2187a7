"""The replica package imports and runs with torch made unimportable (the scheduler's image has no torch)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import switchboard.replica

PACKAGE_DIR = Path(switchboard.replica.__file__).parent

SCRIPT = """
import importlib, pkgutil, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import switchboard.replica as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "switchboard.replica.")]
for name in names:
    importlib.import_module(name)
from switchboard.replica import BlockPool, Request, Scheduler, ModelRunnerOutput
s = Scheduler(BlockPool(8), 4, max_num_seqs=2, max_tokens_per_step=16, enable_prefix_caching=True)
s.add(Request("r", 1, 5, [1, 2, 3, 4, 5], max_tokens=1))
out = s.schedule()
done = s.update(out, ModelRunnerOutput(("r",), (9,)))
assert done[0].finish_reason == "length" and s.pool.num_used == 0
assert sys.modules["torch"] is None
print(",".join(names))
"""


def test_every_module_imports_without_torch() -> None:
    """Each module of switchboard.replica imports, and a step runs, when `import torch` fails."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.strip().split(","))
    expected = {m.name for m in pkgutil.walk_packages([str(PACKAGE_DIR)], "switchboard.replica.")}
    assert expected and imported == expected


def test_no_source_mentions_a_torch_import() -> None:
    """No module even names torch in an import (a lazy import would escape the subprocess check)."""
    for path in PACKAGE_DIR.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not (stripped.startswith(("import torch", "from torch"))), f"{path}: {line}"
