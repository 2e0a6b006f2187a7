"""Paged attention for one engine step.

An `AttentionContext` is built once per step from the scheduled sequences and
handed to the model's `forward_step`. Every layer calls `attend(layer, q, k, v)`
with the step's flattened tokens: the new keys/values are written into their
cache slots (`index_copy_`), then each query attends over its sequence's cached
prefix plus the new tokens, causally.

Token layout the engine guarantees: sequences that contribute one token
(decodes) come first, then multi-token chunks (prefills). Decodes are handled in
one padded batched call (gather by whole blocks, mask the padding) so sixteen
decoding sequences cost one attention call per layer, not sixteen.

On CPU that call is two batched matmuls and a softmax in float32 (`decode_attention`),
not `scaled_dot_product_attention`: for one query per sequence, torch's CPU SDPA kernel
spends its time on per-block bookkeeping, and in bfloat16 it took 4-5x longer than the
matmuls for 64 sequences of 112 cached tokens (about 2.3 ms against 0.5 ms a layer on
scribe-large's shape, 2-core AMD EPYC). Grouped-query heads are handled by folding each
key/value head's group of query heads into the matmul's rows, so keys are never repeated.
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


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One query per sequence over its cached keys, in float32: softmax(q k^T / sqrt(D) + bias) v.

    q [B, H, D]; keys/values [Hkv, B, S, D] contiguous (as `AttentionContext` gathers them);
    bias [B, 1, S] float32, 0 for real positions and -inf for padding, or None. Each key/value
    head serves H / Hkv query heads, which become the rows of its matmul. Returns [B, H, D] in
    q's dtype.
    """
    batch, heads, dim = q.shape
    kv_heads, span = keys.shape[0], keys.shape[2]
    group = heads // kv_heads
    k = keys.to(torch.float32).view(kv_heads * batch, span, dim)
    v = values.to(torch.float32).view(kv_heads * batch, span, dim)
    # [B, H, D] -> [Hkv * B, G, D]: query head h = kv head h // G, row h % G of its matmul.
    qf = q.view(batch, kv_heads, group, dim).transpose(0, 1).to(torch.float32).reshape(kv_heads * batch, group, dim)
    scale = dim**-0.5
    if bias is None:
        scores = torch.bmm(qf, k.transpose(1, 2)).mul_(scale)
    else:
        rows = bias.unsqueeze(0).expand(kv_heads, batch, group, span).reshape(kv_heads * batch, group, span)
        scores = torch.baddbmm(rows, qf, k.transpose(1, 2), alpha=scale)
    probs = scores.softmax(dim=-1)
    out = torch.bmm(probs, v).view(kv_heads, batch, group, dim).transpose(0, 1)
    return out.reshape(batch, heads, dim).to(q.dtype)


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
        # CPU decodes run `decode_attention`, which takes the padding as an additive float32 bias.
        self.decode_matmul = device.type == "cpu"
        self.decode_bias: torch.Tensor | None = None
        if decodes and self.decode_matmul and self.decode_mask is not None:
            bias = torch.zeros(self.decode_mask.shape, dtype=torch.float32)
            self.decode_bias = bias.masked_fill_(~self.decode_mask, float("-inf")).view(decodes, 1, self.decode_span)

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
        """Cache rows of the given blocks as [kv_heads, *block_ids.shape[:-1], span, head_dim], contiguous."""
        bs = self.cache.block_size
        kv_heads, _, dim = store.shape
        paged = store.view(kv_heads, -1, bs * dim)
        # index_select on whole blocks: contiguous copies, far cheaper than advanced indexing per slot.
        gathered = paged.index_select(1, block_ids.reshape(-1))
        return gathered.view(kv_heads, *block_ids.shape[:-1], block_ids.shape[-1] * bs, dim)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k/v [N, kv_heads, D] into the cache, attend with q [N, heads, D]; returns [N, heads*D]."""
        key_store = self.cache.keys[layer]
        value_store = self.cache.values[layer]
        key_store.index_copy_(1, self.slot_mapping, k.transpose(0, 1))
        value_store.index_copy_(1, self.slot_mapping, v.transpose(0, 1))
        n, heads, dim = q.shape
        gqa = k.shape[1] != heads
        out = torch.empty((n, heads, dim), dtype=q.dtype, device=q.device)
        if self.num_decodes:
            b = self.num_decodes
            keys = self._gather(key_store, self.decode_blocks)  # [Hkv, B, span, D]
            values = self._gather(value_store, self.decode_blocks)
            if self.decode_matmul:
                out[:b] = decode_attention(q[:b], keys, values, self.decode_bias)
            else:
                qd = q[:b].unsqueeze(2)  # [B, H, 1, D]
                keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [B, Hkv, span, D]
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
