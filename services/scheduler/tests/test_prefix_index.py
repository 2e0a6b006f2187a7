"""PrefixIndex: folding KV events in order, gaps and resync, resets, eviction, bounds, matching."""

from __future__ import annotations

import pytest
from switchboard.scheduler.prefix_index import (
    MAX_KV_HASHES_PER_REPORT,
    InvalidKvEvents,
    KvAck,
    KvEventIn,
    KvEventsIn,
    PrefixIndex,
)


def reset(*events: KvEventIn) -> KvEventsIn:
    return KvEventsIn(events=events, reset=True)


def delta(*events: KvEventIn) -> KvEventsIn:
    return KvEventsIn(events=events)


def test_starts_out_of_sync_and_ignores_deltas_until_a_reset() -> None:
    index = PrefixIndex()
    assert index.ack() == KvAck(0, True)
    assert index.apply(delta(KvEventIn(1, (10,)))) == KvAck(0, True)
    assert len(index) == 0
    assert index.apply(reset(KvEventIn(5, (10, 11)))) == KvAck(5, False)
    assert 10 in index and 11 in index


def test_folds_in_order_skips_repeats_and_applies_evictions_and_clears() -> None:
    index = PrefixIndex()
    index.apply(reset(KvEventIn(1, (1, 2))))
    assert index.apply(delta(KvEventIn(2, (3,), (1,)), KvEventIn(3, (4,)))) == KvAck(3, False)
    assert sorted(index._hashes) == [2, 3, 4]
    # A retried report: the events already folded are skipped, the new one folds.
    assert index.apply(delta(KvEventIn(3, (4,)), KvEventIn(4, (), (2,)))) == KvAck(4, False)
    assert sorted(index._hashes) == [3, 4]
    assert index.apply(delta(KvEventIn(5, (9,), cleared=True))) == KvAck(5, False)
    assert sorted(index._hashes) == [9]
    assert index.apply(delta()) == KvAck(5, False)  # nothing new


def test_a_gap_asks_for_a_resync_and_a_reset_recovers() -> None:
    index = PrefixIndex()
    index.apply(reset(KvEventIn(1, (1,))))
    assert index.apply(delta(KvEventIn(3, (3,)))) == KvAck(1, True)
    assert 3 not in index and 1 in index  # kept as a hint until the reset
    assert index.apply(delta(KvEventIn(2, (2,)))) == KvAck(1, True)  # out of sync: nothing folds
    assert index.apply(reset(KvEventIn(7, (5,)), KvEventIn(8, (6,)))) == KvAck(8, False)
    assert sorted(index._hashes) == [5, 6]


def test_bounded_size_drops_the_oldest_stored() -> None:
    index = PrefixIndex(max_hashes=3)
    index.apply(reset(KvEventIn(1, (1, 2, 3))))
    index.apply(delta(KvEventIn(2, (1,)), KvEventIn(3, (4,))))  # 1 re-stored: 2 is now the oldest
    assert sorted(index._hashes) == [1, 3, 4] and index.dropped == 1
    with pytest.raises(ValueError):
        PrefixIndex(max_hashes=0)


def test_matched_blocks_is_the_longest_held_prefix_of_the_chain() -> None:
    index = PrefixIndex()
    index.apply(reset(KvEventIn(1, (100, 101, 103))))
    assert index.matched_blocks([100, 101, 102, 103]) == 2
    assert index.matched_blocks([200, 100]) == 0
    assert index.matched_blocks([]) == 0


@pytest.mark.parametrize(
    ("batch", "field"),
    [
        (delta(KvEventIn(0)), "kv_events.events[0].sequence"),
        (delta(KvEventIn(2), KvEventIn(1)), "kv_events.events[1].sequence"),
        (delta(KvEventIn(2), KvEventIn(4)), "kv_events.events[1].sequence"),
        (delta(KvEventIn(1, (5,), (5,))), "kv_events.events[0].evicted_block_hashes"),
        (KvEventsIn(reset=True), "kv_events.events"),
        (delta(KvEventIn(1, tuple(range(MAX_KV_HASHES_PER_REPORT + 1)))), "kv_events.events"),
    ],
)
def test_malformed_batches_name_the_field(batch: KvEventsIn, field: str) -> None:
    index = PrefixIndex()
    index.apply(reset(KvEventIn(1, (1,))))
    with pytest.raises(InvalidKvEvents) as info:
        index.apply(batch)
    assert info.value.field == field
    assert index.ack() == KvAck(1, False) and 1 in index  # nothing changed
