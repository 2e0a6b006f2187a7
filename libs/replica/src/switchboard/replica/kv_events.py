"""KV events: a bounded journal of what entered and left the prefix cache, for the scheduler.

The block pool tells its `KvEventJournal` every time a block's hash is published (`stored`) or a
cached block is evicted (`evicted`). The journal gathers those into an open event (as net changes:
a hash stored and evicted again before the event is sealed appears in neither list) and seals it,
with the next sequence number (1, 2, ...), when it is drained or holds `max_event_hashes` hashes.

A reporter (the generator's registrar) asks `drain(since, max_hashes)` for the sealed events after
the last sequence the scheduler acknowledged; events up to `since` are dropped then, since the
scheduler has them. The journal holds at most `max_hashes` hashes in unacknowledged events: past
that it drops the oldest, and the next `drain` from before them answers a reset snapshot instead
(`KvEventBatch.reset`), as does `snapshot()` when the scheduler asks for a resync. A snapshot is
the journal's own copy of the cached set cut into stored events with fresh sequence numbers, so
the chunks that do not fit one report follow as ordinary events, in order with later changes.

Thread-safe (one lock): the pool records from the engine's step thread while the registrar drains
from the event loop. Torch-free, like the rest of this package.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

DEFAULT_MAX_EVENT_HASHES = 512


@dataclass(frozen=True, slots=True)
class KvEvent:
    """One sealed change to the prefix cache (mirrors `switchboard.v1.KvEvent`).

    Applying it: drop everything when `cleared`, remove `evicted`, add `stored` (disjoint).
    """

    sequence: int
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()
    cleared: bool = False

    @property
    def num_hashes(self) -> int:
        """Hashes this event names (stored plus evicted)."""
        return len(self.stored) + len(self.evicted)


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """What one `drain` or `snapshot` answers (mirrors `switchboard.v1.KvEvents`).

    `reset`: the events start a snapshot of the whole cache; the receiver forgets what it knew.
    """

    events: tuple[KvEvent, ...]
    reset: bool = False

    @property
    def last_sequence(self) -> int | None:
        """The last event's sequence (None when there are no events)."""
        return self.events[-1].sequence if self.events else None

    @property
    def num_hashes(self) -> int:
        """Hashes over all events."""
        return sum(e.num_hashes for e in self.events)


class KvEventJournal:
    """Bounded, sequenced journal of prefix-cache stores and evictions (see the module docstring).

    `max_hashes`: hashes kept in unacknowledged events (the journal's memory bound besides its copy
    of the cached set, which the cache's size bounds); it must exceed the cache's size, or a
    snapshot could not survive until it is sent (`BlockPool` sizes it at twice its blocks, at least). `max_event_hashes`: an open event is sealed
    when it names this many hashes, so no event is bigger than a report may carry.
    """

    def __init__(self, max_hashes: int = 65536, max_event_hashes: int = DEFAULT_MAX_EVENT_HASHES) -> None:
        if max_event_hashes < 1 or max_hashes < max_event_hashes:
            raise ValueError(
                f"need 1 <= max_event_hashes <= max_hashes, got {max_event_hashes} and {max_hashes}"
            )
        self.max_hashes = max_hashes
        self.max_event_hashes = max_event_hashes
        self._lock = threading.Lock()
        self._events: deque[KvEvent] = deque()
        self._held = 0  # hashes in self._events
        self._last_sequence = 0
        # Events up to this sequence were dropped unacknowledged: a drain from before needs a reset.
        self._lost_through = 0
        self._cached: dict[int, None] = {}  # the cached set, oldest stored first
        self._open_stored: dict[int, None] = {}
        self._open_evicted: dict[int, None] = {}
        self._open_cleared = False

    @property
    def last_sequence(self) -> int:
        """The last sealed event's sequence (0 before the first)."""
        with self._lock:
            return self._last_sequence

    def cached(self) -> list[int]:
        """Every hash the journal knows to be cached now, oldest stored first."""
        with self._lock:
            return list(self._cached)

    # ------------------------------------------------------------------ recording (the pool)

    def stored(self, h: int) -> None:
        """`h` became cached."""
        with self._lock:
            if h in self._cached:
                return
            self._cached[h] = None
            if self._open_evicted.pop(h, 0) is None:
                return  # evicted and stored again within one open event: no net change
            self._open_stored[h] = None
            self._maybe_seal()

    def evicted(self, h: int) -> None:
        """`h` left the cache."""
        with self._lock:
            if self._cached.pop(h, 0) is not None:
                return
            if self._open_stored.pop(h, 0) is None:
                return  # stored and evicted again within one open event
            if not self._open_cleared:
                self._open_evicted[h] = None
            self._maybe_seal()

    def stored_many(self, hashes: list[int]) -> None:
        """Each of `hashes` became cached, in order (one lock for all: the pool publishes blocks in runs)."""
        with self._lock:
            cached, open_evicted, open_stored = self._cached, self._open_evicted, self._open_stored
            limit = self.max_event_hashes
            # The open event's size, counted along instead of asked per hash (a hash not cached is
            # in neither open set: it joins `open_stored` or leaves `open_evicted`).
            size = len(open_stored) + len(open_evicted)
            for h in hashes:
                if h in cached:
                    continue
                cached[h] = None
                if open_evicted.pop(h, 0) is None:
                    size -= 1
                    continue
                open_stored[h] = None
                size += 1
                if size >= limit:
                    self._seal()
                    open_evicted, open_stored = self._open_evicted, self._open_stored
                    size = 0

    def evicted_many(self, hashes: list[int]) -> None:
        """Each of `hashes` left the cache, in order."""
        with self._lock:
            # `evicted` per hash, with the dicts bound once (the pool evicts in runs of many).
            cached, open_stored, open_evicted = self._cached, self._open_stored, self._open_evicted
            limit = self.max_event_hashes
            size = len(open_stored) + len(open_evicted)  # counted along, as in `stored_many`
            for h in hashes:
                if cached.pop(h, 0) is not None:
                    continue
                if open_stored.pop(h, 0) is None:
                    size -= 1
                    continue
                if not self._open_cleared:
                    open_evicted[h] = None
                    size += 1
                if size >= limit:
                    self._seal()
                    open_stored, open_evicted = self._open_stored, self._open_evicted
                    size = 0

    def cleared(self) -> None:
        """The whole cache was dropped."""
        with self._lock:
            self._cached.clear()
            self._open_stored.clear()
            self._open_evicted.clear()
            self._open_cleared = True

    def _maybe_seal(self) -> None:
        if len(self._open_stored) + len(self._open_evicted) >= self.max_event_hashes:
            self._seal()

    def _seal(self) -> None:
        if not (self._open_stored or self._open_evicted or self._open_cleared):
            return
        self._append(tuple(self._open_stored), tuple(self._open_evicted), self._open_cleared)
        self._open_stored = {}
        self._open_evicted = {}
        self._open_cleared = False

    def _append(self, stored: tuple[int, ...], evicted: tuple[int, ...], cleared: bool) -> None:
        self._last_sequence += 1
        event = KvEvent(self._last_sequence, stored, evicted, cleared)
        self._events.append(event)
        self._held += event.num_hashes
        while self._held > self.max_hashes and len(self._events) > 1:
            dropped = self._events.popleft()
            self._held -= dropped.num_hashes
            self._lost_through = dropped.sequence

    # ------------------------------------------------------------------ reporting

    def drain(self, since: int, max_hashes: int | None = None) -> KvEventBatch:
        """The events after sequence `since` (whole events, at most `max_hashes` hashes, at least one
        event when there is any), dropping those up to `since`; a reset snapshot when events after
        `since` were lost to the bound (or `since` is ahead of this journal, e.g. another process)."""
        with self._lock:
            self._seal()
            self._ack(since)
            if since < self._lost_through or since > self._last_sequence:
                return self._snapshot(max_hashes)
            return KvEventBatch(self._take(since, max_hashes))

    def snapshot(self, max_hashes: int | None = None) -> KvEventBatch:
        """A reset: every cached hash as stored events with fresh sequences (the first ones that fit
        `max_hashes`; `drain` from the batch's last sequence returns the rest, then later changes)."""
        with self._lock:
            self._seal()
            return self._snapshot(max_hashes)

    def _ack(self, since: int) -> None:
        while self._events and self._events[0].sequence <= since:
            self._held -= self._events.popleft().num_hashes

    def _take(self, since: int, max_hashes: int | None) -> tuple[KvEvent, ...]:
        out: list[KvEvent] = []
        total = 0
        for event in self._events:
            if event.sequence <= since:
                continue
            if out and max_hashes is not None and total + event.num_hashes > max_hashes:
                break
            out.append(event)
            total += event.num_hashes
        return tuple(out)

    def _snapshot(self, max_hashes: int | None) -> KvEventBatch:
        # Everything before the snapshot is superseded by it: drop it (and the loss marker).
        self._events.clear()
        self._held = 0
        start = self._last_sequence
        self._lost_through = start
        hashes = list(self._cached)
        step = self.max_event_hashes
        chunks = [tuple(hashes[i : i + step]) for i in range(0, len(hashes), step)] or [()]
        for chunk in chunks:
            self._last_sequence += 1
            event = KvEvent(self._last_sequence, chunk)
            self._events.append(event)
            self._held += event.num_hashes
        return KvEventBatch(self._take(start, max_hashes), reset=True)
