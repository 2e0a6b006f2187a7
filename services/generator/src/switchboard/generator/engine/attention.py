"""Paged attention for one engine step.

An `AttentionContext` is built once per step from the scheduled sequences and
handed to the model's `forward_step`. Every layer calls `attend(layer, q, k, v)`
with the step's flattened tokens: the new keys/values are written into their
cache slots (`index_copy_`), then each query attends over its sequence's cached
prefix plus the new tokens, causally.

Token layout the engine guarantees: sequences that contribute one token
(decodes) come first, then multi-token chunks (prefills). Decodes are handled in
one padded batched call (gather by whole blocks, mask the padding) so sixteen
decoding sequences cost one SDPA call per layer, not sixteen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from switchboard.generator.engine.kv_cache import KVCache


@dataclass(frozen=True)
class SequenceSlice:
    """One scheduled sequence in the step: where its tokens sit and how much context it has."""

    block_table: list[int]
    context_before: int  # tokens already in the cache before this step
    num_new: int  # tokens computed in this step


@dataclass
class _Prefill:
    start: int
    end: int
    context_before: int
    block_ids: torch.Tensor | None  # blocks covering the whole context, None if no cached prefix
    mask: torch.Tensor | None


class AttentionContext:
    """Per-step metadata: slot mapping for writes and gather indices for reads."""

    def __init__(self, cache: KVCache, slices: list[SequenceSlice], device: torch.device) -> None:
        self.cache = cache
        bs = cache.block_size
        slots: list[int] = []
        for s in slices:
            table = s.block_table
            for pos in range(s.context_before, s.context_before + s.num_new):
                slots.append(table[pos // bs] * bs + pos % bs)
        self.num_tokens = len(slots)
        self.slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)

        # Decodes: leading sequences with one new token each.
        decodes = 0
        while decodes < len(slices) and slices[decodes].num_new == 1:
            decodes += 1
        self.num_decodes = decodes
        self.decode_blocks: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None
        if decodes:
            lengths = [s.context_before + 1 for s in slices[:decodes]]
            max_blocks = max((n + bs - 1) // bs for n in lengths)
            rows = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks])) for s in slices[:decodes]]
            self.decode_blocks = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            span = max_blocks * bs
            if any(n != span for n in lengths):
                lens = torch.tensor(lengths, dtype=torch.long)
                mask = torch.arange(span).unsqueeze(0) < lens.unsqueeze(1)
                self.decode_mask = mask.view(decodes, 1, 1, span).to(device, non_blocking=True)
        self.decode_span = 0 if not decodes else self.decode_blocks.shape[1] * bs

        self.prefills: list[_Prefill] = []
        start = decodes
        for s in slices[decodes:]:
            end = start + s.num_new
            if s.context_before == 0:
                self.prefills.append(_Prefill(start, end, 0, None, None))
            else:
                total = s.context_before + s.num_new
                nblocks = (total + bs - 1) // bs
                block_ids = torch.tensor(s.block_table[:nblocks], dtype=torch.long).to(device, non_blocking=True)
                span = nblocks * bs
                query_pos = torch.arange(s.context_before, total).unsqueeze(1)
                mask = (torch.arange(span).unsqueeze(0) <= query_pos).view(1, 1, s.num_new, span)
                self.prefills.append(_Prefill(start, end, s.context_before, block_ids, mask.to(device, non_blocking=True)))
            start = end

    def _gather(self, store: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Cache rows of the given blocks as [*block_ids.shape[:-1], kv_heads, span, head_dim]."""
        bs = self.cache.block_size
        paged = store.view(-1, bs, store.shape[1], store.shape[2])
        # index_select on whole blocks: contiguous copies, far cheaper than advanced indexing per slot.
        gathered = paged.index_select(0, block_ids.reshape(-1))
        lead = block_ids.shape[:-1]
        gathered = gathered.view(*lead, block_ids.shape[-1] * bs, store.shape[1], store.shape[2])
        return gathered.transpose(-3, -2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k/v [N, kv_heads, D] into the cache, attend with q [N, heads, D]; returns [N, heads*D]."""
        key_store = self.cache.keys[layer]
        value_store = self.cache.values[layer]
        key_store.index_copy_(0, self.slot_mapping, k)
        value_store.index_copy_(0, self.slot_mapping, v)
        n, heads, dim = q.shape
        gqa = k.shape[1] != heads
        out = torch.empty((n, heads, dim), dtype=q.dtype, device=q.device)
        if self.num_decodes:
            b = self.num_decodes
            keys = self._gather(key_store, self.decode_blocks)  # [B, Hkv, span, D]
            values = self._gather(value_store, self.decode_blocks)
            qd = q[:b].unsqueeze(2)  # [B, H, 1, D]
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self.decode_mask, enable_gqa=gqa)
            out[:b] = o.squeeze(2)
        for p in self.prefills:
            qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            if p.block_ids is None:
                ks = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
                vs = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:
                ks = self._gather(key_store, p.block_ids).unsqueeze(0)
                vs = self._gather(value_store, p.block_ids).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, enable_gqa=gqa)
            out[p.start : p.end] = o.squeeze(0).transpose(0, 1)
        return out.view(n, heads * dim)
