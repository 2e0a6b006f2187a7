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
        slo:                           # optional service-level objectives of the pool
          ttft_seconds: 0.5            #   time to first token
          tpot_seconds: 0.05           #   time per output token after the first
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
    slo: ExpertSLO | None = None


@dataclass(frozen=True)
class ExpertSLO:
    """Service-level objectives of one expert pool (None: no objective on that measure)."""

    ttft_seconds: float | None = None
    tpot_seconds: float | None = None


_SLO_KEYS = {"ttft_seconds", "tpot_seconds"}


def _slo(where: str, value: Any) -> ExpertSLO | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ExpertsConfigError(f"{where}.slo: expected a mapping with ttft_seconds and/or tpot_seconds")
    unknown = set(value) - _SLO_KEYS
    if unknown:
        raise ExpertsConfigError(f"{where}.slo: unknown keys {sorted(unknown)}; known: {sorted(_SLO_KEYS)}")
    parsed: dict[str, float] = {}
    for key in sorted(_SLO_KEYS & set(value)):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= 3600:
            raise ExpertsConfigError(f"{where}.slo.{key}: must be a number of seconds in (0, 3600], got {number!r}")
        parsed[key] = float(number)
    return ExpertSLO(**parsed)


def _spec(path: Path, index: int, entry: Any) -> ExpertSpec:
    where = f"{path}: experts[{index}]"
    if not isinstance(entry, dict):
        raise ExpertsConfigError(f"{where}: expected a mapping with name, description, model")
    unknown = set(entry) - {"name", "description", "model", "relative_cost", "replicas", "slo"}
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
    return ExpertSpec(
        name, str(entry.get("description", "")), model, float(cost), replicas, _slo(where, entry.get("slo"))
    )


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
