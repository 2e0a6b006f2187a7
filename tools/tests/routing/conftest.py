"""Shared fixtures: the demo experts from the cache (as in tools/tests/experts) and a small built dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from switchboard.experts import ensure_experts
from switchboard.routing.build_data import RECIPE, build_router_data
from switchboard.routing.dataset import RouterDataset

# The demo experts with the relative costs of config/experts.yaml.
COSTS = {"bard-small": 1.0, "milton-small": 1.0, "scribe-large": 4.0}


@dataclass(frozen=True)
class Expert:
    """What build_router_data needs of an expert."""

    name: str
    model: str
    relative_cost: float


@pytest.fixture(scope="session")
def experts() -> dict[str, Path]:
    """Folders of all demo experts (built here only if `switchboard experts build` has not run)."""
    return ensure_experts()


@pytest.fixture(scope="session")
def expert_list(experts: dict[str, Path]) -> list[Expert]:
    """The demo experts in experts-config order."""
    return [Expert(name, str(experts[name]), cost) for name, cost in COSTS.items()]


@pytest.fixture(scope="session")
def small_build(
    expert_list: list[Expert], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    """A real build of 24 train + 12 test prompts into a temporary folder, and its progress lines."""
    from dataclasses import replace

    lines: list[str] = []
    folder = build_router_data(
        expert_list,
        tmp_path_factory.mktemp("router") / "data",
        recipe=replace(RECIPE, train_samples=24, test_samples=12),
        progress=lines.append,
    )
    return folder, lines


@pytest.fixture(scope="session")
def small_dataset(small_build: tuple[Path, list[str]]) -> RouterDataset:
    return RouterDataset.load(small_build[0])
