"""Per-replica prefix index: the scheduler's view of one replica's prefix cache, built from KV events.

A replica reports what entered and left its prefix cache as sequenced events (`KvEvents` in
Register and ReportLoad). `PrefixIndex.apply` folds a batch in sequence order: events at or below
the last folded sequence are skipped (a retried report), a batch that starts past the next one is a
gap, and the index then asks for a resync (the answer's `kv_resync_needed`) and folds nothing until
a reset arrives. It starts out of sync too: until a replica sends `reset=true`, the scheduler knows
nothing of its cache. What it held before a gap is kept as a hint for placement until the reset.

`matched_blocks(hashes)` is what a prefix-aware placement asks: how many leading blocks of a
request's block-hash chain the replica holds. Bounded: at most `max_hashes` hashes per replica,
the oldest stored dropped first past that. No gRPC here; the servicer converts the protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Per report: hashes over all events (stored plus evicted) and events. A generator's journal seals
# events at 512 hashes, so a report of up to eight full events fits.
MAX_KV_HASHES_PER_REPORT = 4096
MAX_KV_EVENTS_PER_REPORT = 4096
# Hashes the scheduler keeps per replica (a 64k-block cache; 8 bytes of key and dict overhead each).
DEFAULT_MAX_INDEX_HASHES = 65536


@dataclass(frozen=True, slots=True)
class KvEventIn:
    """One reported event (mirrors `switchboard.v1.KvEvent`)."""

    sequence: int
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()
    cleared: bool = False


@dataclass(frozen=True, slots=True)
class KvEventsIn:
    """One reported batch (mirrors `switchboard.v1.KvEvents`)."""

    events: tuple[KvEventIn, ...] = ()
    reset: bool = False


@dataclass(frozen=True, slots=True)
class KvAck:
    """What the scheduler answers about a replica's events: the last folded sequence, and whether
    the replica must send a reset snapshot."""

    acked_sequence: int
    resync_needed: bool


class InvalidKvEvents(ValueError):
    """A malformed batch; `field` names the offending request field (for BadRequest)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def validate(batch: KvEventsIn, field: str = "kv_events") -> None:
    """Raise `InvalidKvEvents` unless `batch` is well formed (bounds, sequences, disjoint lists)."""
    if len(batch.events) > MAX_KV_EVENTS_PER_REPORT:
        raise InvalidKvEvents(
            f"{field}.events",
            f"at most {MAX_KV_EVENTS_PER_REPORT} events per report, got {len(batch.events)}",
        )
    total = sum(len(e.stored) + len(e.evicted) for e in batch.events)
    if total > MAX_KV_HASHES_PER_REPORT:
        raise InvalidKvEvents(
            f"{field}.events",
            f"at most {MAX_KV_HASHES_PER_REPORT} hashes (stored plus evicted) per report, got {total}; "
            "send the rest in the next report",
        )
    if batch.reset and not batch.events:
        raise InvalidKvEvents(f"{field}.events", "a reset needs at least one event (the snapshot)")
    previous: int | None = None
    for i, event in enumerate(batch.events):
        where = f"{field}.events[{i}]"
        if event.sequence < 1:
            raise InvalidKvEvents(f"{where}.sequence", "must be at least 1")
        if previous is not None and event.sequence != previous + 1:
            raise InvalidKvEvents(
                f"{where}.sequence",
                f"must be events[{i - 1}].sequence + 1 = {previous + 1}, got {event.sequence} "
                "(sequences in one report are consecutive and increasing)",
            )
        previous = event.sequence
        if event.evicted and not set(event.stored).isdisjoint(event.evicted):
            raise InvalidKvEvents(
                f"{where}.evicted_block_hashes", "must not repeat a hash of stored_block_hashes"
            )


class PrefixIndex:
    """The cached block hashes of one replica, folded from its KV events."""

    def __init__(self, max_hashes: int = DEFAULT_MAX_INDEX_HASHES) -> None:
        if max_hashes < 1:
            raise ValueError(f"max_hashes must be positive, got {max_hashes}")
        self.max_hashes = max_hashes
        self._hashes: dict[int, None] = {}  # oldest stored first
        self.sequence = 0  # the last folded event
        self.in_sync = False  # a reset was folded and no gap seen since
        self.dropped = 0  # hashes dropped by the bound

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, h: object) -> bool:
        return h in self._hashes

    def ack(self) -> KvAck:
        """The answer for the replica now."""
        return KvAck(self.sequence, not self.in_sync)

    def apply(self, batch: KvEventsIn) -> KvAck:
        """Validate and fold a batch (see the module docstring); raises `InvalidKvEvents`."""
        validate(batch)
        if batch.reset:
            self._hashes.clear()
            self.sequence = batch.events[0].sequence - 1
            self.in_sync = True
        if not self.in_sync or not batch.events:
            return self.ack()
        for event in batch.events:
            if event.sequence <= self.sequence:
                continue  # already folded (a retried report)
            if event.sequence != self.sequence + 1:
                self.in_sync = False  # a gap: events were lost; wait for a reset
                break
            self._fold(event)
            self.sequence = event.sequence
        return self.ack()

    def _fold(self, event: KvEventIn) -> None:
        hashes = self._hashes
        if event.cleared:
            hashes.clear()
        for h in event.evicted:
            hashes.pop(h, None)
        stored = event.stored
        new = dict.fromkeys(stored)
        if len(new) == len(stored) and hashes.keys().isdisjoint(new):
            # The usual event: every stored hash is new and named once, so the loop below would
            # only append them in order; one C-level update does (every heartbeat folds hundreds).
            hashes.update(new)
        else:
            for h in stored:
                hashes.pop(h, None)  # re-stored: now the newest
                hashes[h] = None
        while len(hashes) > self.max_hashes:
            del hashes[next(iter(hashes))]
            self.dropped += 1

    def matched_blocks(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of a request's hash chain the replica holds."""
        n = 0
        for h in block_hashes:
            if h not in self._hashes:
                break
            n += 1
        return n
