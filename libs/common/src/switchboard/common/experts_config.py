"""The experts config: the one file that declares the expert pools.

The router scores these experts, the scheduler accepts replicas only of these
experts, and the local stack starts one generator per replica of each. Format
(YAML):

    experts:
      - name: bard-small               # unique, [a-z0-9-], used by clients as `model`
        description: Shakespeare's plays and sonnets; small and fast.
        model: bard-small              # demo expert name, or a path to a Hugging Face model folder
        relative_cost: 1.0             # cost of one output token relative to the cheapest expert
        replicas: 1                    # replicas the local stack starts
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ExpertsConfigError(ValueError):
    """The experts config is missing or invalid; the message names the file and the entry."""


@dataclass(frozen=True)
class ExpertSpec:
    """One expert pool."""

    name: str
    description: str
    model: str
    relative_cost: float = 1.0
    replicas: int = 1


def _spec(path: Path, index: int, entry: Any) -> ExpertSpec:
    where = f"{path}: experts[{index}]"
    if not isinstance(entry, dict):
        raise ExpertsConfigError(f"{where}: expected a mapping with name, description, model")
    unknown = set(entry) - {"name", "description", "model", "relative_cost", "replicas"}
    if unknown:
        raise ExpertsConfigError(f"{where}: unknown keys {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExpertsConfigError(f"{where}.name: must match {_NAME.pattern}, got {name!r}")
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise ExpertsConfigError(f"{where}.model: required (demo expert name or model folder path)")
    cost = entry.get("relative_cost", 1.0)
    if not isinstance(cost, (int, float)) or cost <= 0:
        raise ExpertsConfigError(f"{where}.relative_cost: must be a positive number, got {cost!r}")
    replicas = entry.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        raise ExpertsConfigError(f"{where}.replicas: must be a non-negative integer, got {replicas!r}")
    return ExpertSpec(name, str(entry.get("description", "")), model, float(cost), replicas)


def load_experts_config(path: Path) -> list[ExpertSpec]:
    """Read and validate the experts config at `path`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ExpertsConfigError(f"{path}: experts config not found (set SWITCHBOARD_EXPERTS_CONFIG)") from None
    except yaml.YAMLError as exc:
        raise ExpertsConfigError(f"{path}: not valid YAML: {exc}") from None
    entries = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ExpertsConfigError(f"{path}: expected a non-empty 'experts' list")
    specs = [_spec(Path(path), i, e) for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExpertsConfigError(f"{path}: duplicate expert names {duplicates}")
    return specs
