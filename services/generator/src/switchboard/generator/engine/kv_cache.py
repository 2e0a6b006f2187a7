"""Paged KV cache tensors: fixed-size blocks, addressed by slot.

The cache stores keys and values of every layer in one tensor per layer shaped
[num_kv_heads, num_blocks * block_size, head_dim] (a "slot" per token in each
head's plane). A sequence owns a block table (list of block ids); token position p
of the sequence lives in slot `table[p // block_size] * block_size + p % block_size`.
Heads lead so that gathering a sequence's blocks yields each head's keys as one
contiguous [tokens, head_dim] matrix, the layout attention's matmuls read directly.

The bookkeeping of those blocks (the block pool with its reference counts and
prefix cache, the chained block hashes) is torch-free and lives in
`switchboard.replica`; it is re-exported here for existing imports.
"""

from __future__ import annotations

import torch
from switchboard.replica.block_pool import BlockPool
from switchboard.replica.hashing import ROOT_HASH, block_hash, prompt_block_hashes

__all__ = ["ROOT_HASH", "BlockPool", "KVCache", "block_hash", "bytes_per_block", "prompt_block_hashes"]


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Memory one block takes across all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


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
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
