"""The CPU decode attention (two float32 matmuls) against torch's SDPA on the same gathered cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from switchboard.generator.engine.attention import AttentionContext, SequenceSlice, decode_attention
from switchboard.generator.engine.kv_cache import KVCache


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_matches_sdpa(heads: int, kv_heads: int, padded: bool) -> None:
    """Grouped-query heads and padding masks give SDPA's output (float32)."""
    gen = torch.Generator().manual_seed(0)
    batch, span, dim = 5, 24, 16
    q = torch.randn(batch, heads, dim, generator=gen)
    keys = torch.randn(kv_heads, batch, span, dim, generator=gen)
    values = torch.randn(kv_heads, batch, span, dim, generator=gen)
    lengths = torch.tensor([span, 3, 17, 1, 20]) if padded else torch.full((batch,), span)
    mask = (torch.arange(span)[None] < lengths[:, None]).view(batch, 1, 1, span)
    bias = torch.zeros(batch, 1, span).masked_fill_(~mask.view(batch, 1, span), float("-inf")) if padded else None
    got = decode_attention(q, keys, values, bias)
    want = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=heads != kv_heads
    ).squeeze(2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paged_decodes_match_sdpa_over_the_cache_in_bfloat16() -> None:
    """A decode step of sequences of different lengths through the paged cache equals SDPA over
    each sequence's own keys, within bfloat16 rounding (the matmuls run in float32)."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, bs = 4, 2, 16, 4
    cache = KVCache(1, 32, bs, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    contexts = [9, 2, 14]  # tokens already cached per sequence
    tables = [[3, 7, 1], [5], [0, 2, 4, 6]]
    history = []
    for ctx, table in zip(contexts, tables, strict=True):
        k = torch.randn(ctx + 1, kv_heads, dim, generator=gen).to(torch.bfloat16)
        v = torch.randn(ctx + 1, kv_heads, dim, generator=gen).to(torch.bfloat16)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)], dtype=torch.long)
        cache.keys[0].index_copy_(1, slots, k[:ctx].transpose(0, 1))
        cache.values[0].index_copy_(1, slots, v[:ctx].transpose(0, 1))
        history.append((k, v))
    slices = [SequenceSlice(table, ctx, 1) for ctx, table in zip(contexts, tables, strict=True)]
    attn = AttentionContext(cache, slices, torch.device("cpu"))
    q = torch.randn(len(slices), heads, dim, generator=gen).to(torch.bfloat16)
    new_k = torch.stack([k[-1] for k, _ in history])
    new_v = torch.stack([v[-1] for _, v in history])
    got = attn.attend(0, q, new_k, new_v).view(len(slices), heads, dim).float()
    for row, (k, v) in enumerate(history):
        want = F.scaled_dot_product_attention(
            q[row, :, None].float()[None], k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None], enable_gqa=True
        )[0, :, 0]
        torch.testing.assert_close(got[row], want, atol=2e-2, rtol=2e-2)
