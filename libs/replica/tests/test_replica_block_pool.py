"""Block pool: allocation order, reference counts, the hash index and LRU eviction."""

from __future__ import annotations

import pytest
from switchboard.replica import BlockPool


def test_allocation_hands_out_low_ids_first_and_counts_references() -> None:
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.num_used == 3 and pool.num_free == 1
    pool.acquire(1)
    assert pool.refcount[1] == 2
    pool.release(1)
    assert pool.refcount[1] == 1 and pool.num_free == 1  # still held once
    pool.release(1)
    assert pool.refcount[1] == 0 and pool.num_free == 2
    assert pool.allocate() == 1  # freed plain block goes out again first (last freed, first out)


def test_exhausted_pool_raises_and_empty_pool_is_refused() -> None:
    pool = BlockPool(1)
    pool.allocate()
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate()
    with pytest.raises(ValueError):
        BlockPool(0)


def test_plain_blocks_go_before_cached_ones_and_cached_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    a, b, c, d = (pool.allocate() for _ in range(4))
    pool.register(a, 101)
    pool.register(b, 102)
    pool.register(c, 103)
    for block in (b, a, d, c):  # freed in this order; d is plain
        pool.release(block)
    assert pool.num_free == 4 and pool.num_used == 0
    assert pool.cached_hashes() == [103, 101, 102]  # most recently freed first
    assert pool.allocate() == d  # plain first, no eviction
    assert pool.num_evictions == 0
    assert pool.allocate() == b and pool.lookup(102) is None  # least recently freed cached
    assert pool.allocate() == a and pool.lookup(101) is None
    assert pool.lookup(103) == c
    assert pool.num_evictions == 2


def test_acquiring_a_free_cached_block_revives_it() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 7)
    pool.release(a)
    assert pool.num_free == 1
    pool.acquire(pool.lookup(7))
    assert pool.refcount[a] == 1 and pool.num_free == 0
    assert pool.cached_hashes() == [7]
    pool.release(b)
    assert pool.allocate() == b  # the revived block is not evicted


def test_register_first_writer_wins() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 5)
    pool.register(b, 5)  # same content computed twice: the first block keeps the name
    pool.register(a, 6)  # a named block is not renamed
    assert pool.lookup(5) == a and pool.lookup(6) is None and pool.block_to_hash[b] is None
    assert pool.cached_hashes(limit=1) == [5]
