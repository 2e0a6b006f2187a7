"""Shared fixtures: the demo experts from the cache (built by `make test`'s experts step) and their data."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.experts import ensure_experts
from switchboard.experts.cache import cache_root
from switchboard.experts.data import PreparedData, prepare_data


@pytest.fixture(scope="session")
def experts() -> dict[str, Path]:
    """Folders of all demo experts (built here only if `switchboard experts build` has not run)."""
    return ensure_experts()


@pytest.fixture(scope="session")
def data() -> PreparedData:
    """The corpus splits, shared tokenizer and token streams the experts were built from."""
    return prepare_data(cache_root())
