"""Block pool: reference-counted KV blocks with a hash index and LRU reuse of free cached blocks.

The pool only does bookkeeping of block ids (the memory they name lives in the
model runner). A block whose reference count drops to zero stays in the hash
index (and in an LRU list) until the pool needs it for something else, so a
later request with the same prefix can take it back. Every hash that enters the index (`register`)
or leaves it (an eviction in `allocate`) is recorded in the pool's `events` journal
(`kv_events.KvEventJournal`), which the generator reports to the scheduler.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from switchboard.replica.kv_events import KvEventJournal


class BlockPool:
    """Reference-counted blocks with a hash index and LRU reuse of free cached blocks.

    Free blocks are kept in two places: `_free_plain` (never hashed, handed out
    first) and `_free_cached` (hashed, ordered least recently freed first, evicted
    in that order when no plain block is left).
    """

    def __init__(self, num_blocks: int, events: KvEventJournal | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.block_to_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Popped from the end, so reversed: low block ids go out first.
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0
        self.events = events if events is not None else KvEventJournal(max_hashes=max(65536, 2 * num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (plain free plus evictable cached)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live request."""
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        """Take one block (refcount 1); evicts the least recently used cached block if needed."""
        if self._free_plain:
            block = self._free_plain.pop()
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            old = self.block_to_hash[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
                self.events.evicted(old)
            self.block_to_hash[block] = None
            self.num_evictions += 1
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler must check num_free first)")
        self.refcount[block] = 1
        return block

    def allocate_many(self, n: int) -> list[int]:
        """Take `n` blocks at once: the same blocks, in the same order, as `n` calls of `allocate`."""
        plain = self._free_plain
        if n <= len(plain):
            cut = len(plain) - n
            out = plain[cut:]
            del plain[cut:]
            out.reverse()
        else:
            need = n - len(plain)
            if need > len(self._free_cached):
                raise RuntimeError("KV block pool exhausted (the scheduler must check num_free first)")
            out = plain[::-1]
            plain.clear()
            evicted: list[int] = []
            block_to_hash, hash_to_block, cached = self.block_to_hash, self.hash_to_block, self._free_cached
            # The `need` least recently freed cached blocks, in that order, as `allocate` takes them.
            # A bound `popitem(False)` per block is faster than slicing an iterator over the dict
            # and deleting each key again (most calls evict one to four blocks).
            popitem = cached.popitem
            take = out.append
            for _ in range(need):
                block = popitem(False)[0]
                old = block_to_hash[block]
                if old is not None and hash_to_block.get(old) == block:
                    del hash_to_block[old]
                    evicted.append(old)
                block_to_hash[block] = None
                take(block)
            self.num_evictions += need
            if evicted:
                self.events.evicted_many(evicted)
        refcount = self.refcount
        for block in out:
            refcount[block] = 1
        return out

    def lookup(self, h: int) -> int | None:
        """The block holding the content named `h`, or None (does not take a reference)."""
        return self.hash_to_block.get(h)

    def acquire_prefix(self, hashes: Iterable[int]) -> list[int]:
        """The blocks of the leading run of `hashes` held in the index, each with one more reference.

        The same as `lookup` then `acquire` for each hash until the first miss, in one call (the
        scheduler matches every new request's prefix this way).
        """
        hash_to_block, refcount, cached = self.hash_to_block, self.refcount, self._free_cached
        out: list[int] = []
        for h in hashes:
            block = hash_to_block.get(h)
            if block is None:
                break
            if refcount[block] == 0:
                cached.pop(block, None)
            refcount[block] += 1
            out.append(block)
        return out

    def acquire(self, block: int) -> None:
        """Take one more reference to a (possibly free, cached) block."""
        if self.refcount[block] == 0:
            self._free_cached.pop(block, None)
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; a block nobody holds becomes free (kept for reuse if hashed)."""
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if self.block_to_hash[block] is not None:
                self._free_cached[block] = None
            else:
                self._free_plain.append(block)

    def release_many(self, blocks: Iterable[int]) -> None:
        """`release` each block, in order."""
        refcount, block_to_hash = self.refcount, self.block_to_hash
        cached, plain = self._free_cached, self._free_plain
        for block in blocks:
            count = refcount[block] - 1
            refcount[block] = count
            if count == 0:
                if block_to_hash[block] is not None:
                    cached[block] = None
                else:
                    plain.append(block)

    def register_many(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """`register` each (block, hash) pair, in order."""
        block_to_hash, hash_to_block = self.block_to_hash, self.hash_to_block
        stored: list[int] = []
        for block, h in zip(blocks, hashes, strict=True):
            if block_to_hash[block] is not None or h in hash_to_block:
                continue
            block_to_hash[block] = h
            hash_to_block[h] = block
            stored.append(h)
        if stored:
            self.events.stored_many(stored)

    def register(self, block: int, h: int) -> None:
        """Record that `block` now holds the full block named `h` (first writer wins)."""
        if self.block_to_hash[block] is not None or h in self.hash_to_block:
            return
        self.block_to_hash[block] = h
        self.hash_to_block[h] = block
        self.events.stored(h)

    def cached_hashes(self, limit: int | None = None) -> list[int]:
        """Hashes held in the prefix cache, most recently used (in use, then freed last) first."""
        in_use = [h for h, b in self.hash_to_block.items() if self.refcount[b] > 0]
        free = [self.block_to_hash[b] for b in reversed(self._free_cached)]
        hashes = in_use + [h for h in free if h is not None]
        return hashes if limit is None else hashes[:limit]
