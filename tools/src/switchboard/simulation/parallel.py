"""`fork_map`: run independent simulations in forked worker processes (training's only parallelism).

Simulation runs share nothing and are deterministic, so a run gives the same result in a worker
as in this process. Workers are forked (not spawned), so they inherit the loaded trace, the setup
and the function itself without pickling them; only each result travels back (pickled).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The job forked workers run, set just before the fork (a closure cannot be pickled, a global is
# inherited).
_JOB: Callable[[int], Any] | None = None


def _run(index: int) -> Any:
    assert _JOB is not None
    return _JOB(index)


def fork_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 1) -> list[R]:
    """`[fn(x) for x in items]`, in up to `workers` forked processes when that is more than 1."""
    global _JOB
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    _JOB = lambda i: fn(items[i])  # noqa: E731 (inherited by the fork, never pickled)
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
            return pool.map(_run, range(len(items)), chunksize=1)
    finally:
        _JOB = None
