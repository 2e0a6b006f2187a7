"""KV-cache manager: which blocks a request holds, prefix-cache hits, and publishing full blocks.

Sits between the scheduler and the block pool (as vLLM v1's `KVCacheManager`):
the scheduler asks it whether a request's next tokens fit and to allocate their
slots; it matches a new request's leading full blocks against the prefix cache
and registers each block in the cache once its tokens are all computed.
A request's token position p lives in block `block_table[p // block_size]`.
"""

from __future__ import annotations

from switchboard.replica.block_pool import BlockPool
from switchboard.replica.hashing import ROOT_HASH, extend_block_hashes
from switchboard.replica.request import Request


class KVCacheManager:
    """Block tables and prefix caching over one `BlockPool`."""

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool, hash_seed: int = ROOT_HASH) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def new_blocks_needed(self, req: Request, num_new: int) -> int:
        """Blocks `req` must still allocate to compute `num_new` more tokens."""
        bs = self.block_size  # `blocks_for`, inlined: asked for every request of every step
        need = (req.num_computed + num_new + bs - 1) // bs - len(req.block_table)
        return need if need > 0 else 0

    def can_allocate(self, req: Request, num_new: int) -> bool:
        """Whether the pool can hand out the blocks `num_new` more tokens of `req` need."""
        return self.new_blocks_needed(req, num_new) <= self.pool.num_free

    def allocate_slots(self, req: Request, num_new: int) -> None:
        """Grow `req`'s block table to hold `num_new` more tokens (check `can_allocate` first)."""
        need = self.new_blocks_needed(req, num_new)
        if need:
            req.block_table.extend(self.pool.allocate_many(need))

    def block_hashes_of(self, req: Request, num_blocks: int) -> list[int]:
        """The chain of `req`'s first `num_blocks` full blocks (each hash computed once per request)."""
        if len(req.hash_chain) < num_blocks:
            extend_block_hashes(req.hash_chain, req.token_ids, self.block_size, self.hash_seed)
        return req.hash_chain[:num_blocks]

    def match_prefix(self, req: Request) -> None:
        """Reuse cached full blocks for the leading tokens (never the very last token: it must be computed)."""
        bs = self.block_size
        limit = (len(req.token_ids) - 1) // bs
        hashes = self.block_hashes_of(req, limit)
        blocks = self.pool.acquire_prefix(hashes)
        if blocks:
            req.block_table.extend(blocks)
            req.block_hashes.extend(hashes[: len(blocks)])
        req.num_computed = len(req.block_table) * bs

    def cache_full_blocks(self, req: Request) -> None:
        """Publish `req`'s newly full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = req.num_computed // self.block_size
        start = len(req.block_hashes)
        if full <= start:
            return
        # `block_hashes_of`, without copying the chain's head: this runs after every step.
        chain = req.hash_chain
        if len(chain) < full:
            extend_block_hashes(chain, req.token_ids, self.block_size, self.hash_seed)
        new = chain[start:full]
        self.pool.register_many(req.block_table[start:full], new)
        req.block_hashes.extend(new)

    def free(self, req: Request) -> None:
        """Return every block of `req` to the pool (tail first, so shared prefixes are evicted last)."""
        self.pool.release_many(reversed(req.block_table))
        req.block_table = []
        req.block_hashes = []
        req.num_computed = 0
