"""Paged KV cache: fixed-size blocks, a bounded block pool and a prefix cache.

The cache stores keys and values of every layer in one tensor per layer shaped
[num_blocks * block_size, num_kv_heads, head_dim] (a "slot" per token). A
sequence owns a block table (list of block ids); token position p of the
sequence lives in slot `table[p // block_size] * block_size + p % block_size`.

Prefix caching: every full block is named by a chained hash of its tokens and
the hash of the block before it, so two sequences with the same first
k * block_size tokens name the same k blocks. The pool keeps a map from hash to
block; a block whose reference count drops to zero stays in the map (and in an
LRU list) until the pool needs its memory for something else.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

ROOT_HASH = 0


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """Stable 64-bit hash of one full block chained to its parent block's hash.

    Stable across processes (blake2b, not Python's `hash`), so the scheduler can
    compute the same hashes from a prompt for cache-aware placement.
    """
    data = parent.to_bytes(8, "little") + array("q", tokens).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    hashes: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Memory one block takes across all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


class BlockPool:
    """Reference-counted blocks with a hash index and LRU reuse of free cached blocks.

    Free blocks are kept in two places: `_free_plain` (never hashed, handed out
    first) and `_free_cached` (hashed, ordered least recently freed first, evicted
    in that order when no plain block is left).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.block_to_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Popped from the end, so reversed: low block ids go out first.
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (plain free plus evictable cached)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live sequence."""
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
            self.block_to_hash[block] = None
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler must check num_free first)")
        self.refcount[block] = 1
        return block

    def lookup(self, h: int) -> int | None:
        """The block holding the content named `h`, or None (does not take a reference)."""
        return self.hash_to_block.get(h)

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

    def register(self, block: int, h: int) -> None:
        """Record that `block` now holds the full block named `h` (first writer wins)."""
        if self.block_to_hash[block] is not None or h in self.hash_to_block:
            return
        self.block_to_hash[block] = h
        self.hash_to_block[h] = block

    def cached_hashes(self, limit: int | None = None) -> list[int]:
        """Hashes held in the prefix cache, most recently used (in use, then freed last) first."""
        in_use = [h for h, b in self.hash_to_block.items() if self.refcount[b] > 0]
        free = [self.block_to_hash[b] for b in reversed(self._free_cached)]
        hashes = in_use + [h for h in free if h is not None]
        return hashes if limit is None else hashes[:limit]


class KVCache:
    """The key/value tensors of every layer, addressed by slot."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
