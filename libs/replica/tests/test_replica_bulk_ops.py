"""The pool's bulk operations do exactly what the same single calls do, in the same order."""

from __future__ import annotations

import random

from switchboard.replica.block_pool import BlockPool


def _state(pool: BlockPool) -> tuple:
    return (
        list(pool.refcount),
        list(pool.block_to_hash),
        dict(pool.hash_to_block),
        list(pool._free_plain),
        list(pool._free_cached),
        pool.num_evictions,
        pool.events.cached(),
        pool.events.drain(0),
    )


def test_bulk_and_single_calls_leave_the_same_pool_and_journal() -> None:
    rng = random.Random(5)
    bulk, single = BlockPool(64), BlockPool(64)
    held: list[list[int]] = []
    next_hash = 1
    for _ in range(400):
        action = rng.random()
        if action < 0.5 and bulk.num_free:
            n = rng.randint(1, min(12, bulk.num_free))
            got = bulk.allocate_many(n)
            assert got == [single.allocate() for _ in range(n)]
            hashes = [next_hash + i if rng.random() < 0.8 else rng.randint(1, next_hash) for i in range(n)]
            next_hash += n
            bulk.register_many(got, hashes)
            for block, h in zip(got, hashes, strict=True):
                single.register(block, h)
            held.append(got)
        elif held:
            blocks = held.pop(rng.randrange(len(held)))
            bulk.release_many(reversed(blocks))
            for block in reversed(blocks):
                single.release(block)
        assert _state(bulk) == _state(single)
    assert bulk.num_evictions > 0  # the run went through eviction of cached blocks
