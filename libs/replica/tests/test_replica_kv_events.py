"""KV event journal: sequencing, net changes, acknowledgement, bounds, overflow and snapshots."""

from __future__ import annotations

import pytest
from switchboard.replica import BlockPool, KvEvent, KvEventBatch, KvEventJournal


def test_events_are_sealed_on_drain_with_consecutive_sequences_and_dropped_once_acked() -> None:
    journal = KvEventJournal()
    assert journal.drain(0) == KvEventBatch(())
    journal.stored(1)
    journal.stored(2)
    first = journal.drain(0)
    assert first == KvEventBatch((KvEvent(1, (1, 2)),))
    journal.evicted(1)
    journal.stored(3)
    # Not acknowledged yet: the same events come again, followed by the new one.
    again = journal.drain(0)
    assert again.events == (KvEvent(1, (1, 2)), KvEvent(2, (3,), (1,)))
    assert journal.drain(2) == KvEventBatch(())  # acked through 2: nothing left
    assert journal.last_sequence == 2 and journal.cached() == [2, 3]


def test_changes_within_one_open_event_are_net() -> None:
    journal = KvEventJournal()
    journal.stored(5)
    journal.evicted(5)  # stored and evicted before anyone saw it
    journal.stored(6)
    journal.stored(6)  # already cached
    journal.evicted(7)  # never cached
    assert journal.drain(0).events == (KvEvent(1, (6,)),)
    journal.evicted(6)
    journal.stored(6)  # evicted and stored back
    assert journal.drain(1).events == ()
    journal.cleared()
    journal.stored(8)
    assert journal.drain(1).events == (KvEvent(2, (8,), (), cleared=True),)


def test_events_are_capped_and_drain_returns_whole_events_within_the_bound() -> None:
    journal = KvEventJournal(max_hashes=100, max_event_hashes=3)
    for h in range(7):
        journal.stored(h)
    batch = journal.drain(0, max_hashes=5)
    assert [e.stored for e in batch.events] == [(0, 1, 2)]  # the next event would pass 5
    batch = journal.drain(1, max_hashes=6)
    assert [e.stored for e in batch.events] == [(3, 4, 5), (6,)]
    assert batch.last_sequence == 3 and batch.num_hashes == 4


def test_overflow_drops_the_oldest_events_and_the_next_drain_is_a_reset_snapshot() -> None:
    journal = KvEventJournal(max_hashes=4, max_event_hashes=2)
    for h in range(6):  # events 1..3 of 2 hashes each: event 1 is dropped
        journal.stored(h)
    journal.evicted(0)
    batch = journal.drain(0)
    assert batch.reset
    assert [e.sequence for e in batch.events] == [5, 6, 7]  # event 4 sealed the eviction
    assert sorted(h for e in batch.events for h in e.stored) == [1, 2, 3, 4, 5]
    # The snapshot continues as ordinary events.
    journal.stored(9)
    assert journal.drain(7).events == (KvEvent(8, (9,)),)


def test_snapshot_chunks_follow_as_ordinary_events_after_the_first_report() -> None:
    journal = KvEventJournal(max_hashes=100, max_event_hashes=2)
    for h in range(5):
        journal.stored(h)
    journal.drain(0)
    snap = journal.snapshot(max_hashes=2)
    assert snap.reset and snap.events == (KvEvent(4, (0, 1)),)
    journal.evicted(4)
    rest = journal.drain(4)
    assert not rest.reset
    assert rest.events == (KvEvent(5, (2, 3)), KvEvent(6, (4,)), KvEvent(7, (), (4,)))


def test_snapshot_of_an_empty_cache_is_one_empty_stored_event() -> None:
    journal = KvEventJournal()
    assert journal.snapshot() == KvEventBatch((KvEvent(1),), reset=True)
    # A drain from a sequence the journal never issued (another process's) is a reset too.
    assert journal.drain(42).reset


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        KvEventJournal(max_hashes=2, max_event_hashes=3)
    with pytest.raises(ValueError):
        KvEventJournal(max_event_hashes=0)


def test_block_pool_records_publishing_and_eviction() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 11)
    pool.register(b, 11)  # not published: the first writer holds the name
    pool.register(b, 12)
    assert pool.events.drain(0).events == (KvEvent(1, (11, 12)),)
    pool.release(a)
    pool.release(b)
    assert pool.events.drain(1).events == ()  # freed, still cached
    pool.allocate()  # evicts 11 (least recently freed)
    assert pool.events.drain(1).events == (KvEvent(2, (), (11,)),)
    assert pool.events.cached() == [12]
