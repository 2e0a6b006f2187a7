"""Shared fixtures of the router tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def repo_root() -> Path:
    """The repository root (where config/experts.yaml lives)."""
    return Path(__file__).resolve().parents[3]
