"""Fixtures of the deployment checks: the checker module, service contracts, the stack's command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The checkers live next to the tests (they are test code, not product code);
# --import-mode=importlib does not put this folder on sys.path by itself.
sys.path.insert(0, str(Path(__file__).parent))

import deploy_checks


@pytest.fixture(scope="session")
def contracts() -> dict[str, deploy_checks.ServiceContract]:
    """Each service's settings contract, read from its config module."""
    return deploy_checks.contracts()


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return deploy_checks.REPO
