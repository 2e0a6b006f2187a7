"""Replica-seconds per request: each request's share of the time its replica was busy.

While n requests are in flight on a replica, each is charged 1/n of every second (processor
sharing, the accounting a per-replica-second price needs: the charges of all requests add up to
the time the replica had work, so a price table's `per_replica_second` recovers exactly what the
busy replica cost, and a request that shared a batch with 15 others pays a sixteenth). Kept with a
virtual clock, as fair queueing does: V advances at 1/n per second while n > 0, and a request's
charge is V at its end minus V at its start, O(1) per event whatever the concurrency. Idle time is
charged to no one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class ReplicaTimeMeter:
    """Charges in-flight requests their share of the replica's busy time (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._virtual = 0.0  # seconds of one request's share, since the meter started
        self._at = clock()
        self._started: dict[Hashable, float] = {}  # a request's key -> the virtual time at its start

    def _advance(self) -> float:
        now = self._clock()
        if self._started:
            self._virtual += (now - self._at) / len(self._started)
        self._at = now
        return self._virtual

    def start(self, key: Hashable) -> None:
        """A request begins; `key` is its own (an object per call: two calls may share a request id)."""
        virtual = self._advance()
        self._started.setdefault(key, virtual)

    def finish(self, key: Hashable) -> float:
        """A request ends: its charge in replica-seconds (0 for a key never started, or ended already)."""
        virtual = self._advance()
        began = self._started.pop(key, None)
        return 0.0 if began is None else virtual - began

    @property
    def in_flight(self) -> int:
        return len(self._started)
