"""Our GPT-2 and Llama-family modules, loaded through the loader, against transformers' logits.

Both the plain causal `forward` and the paged `forward_step` (with the engine's
real AttentionContext and KV cache) are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from switchboard.generator.engine.attention import AttentionContext, SequenceSlice
from switchboard.generator.engine.kv_cache import KVCache
from switchboard.generator.loader import load_model
from switchboard.generator.models.gpt2 import GPT2Config, GPT2LMHeadModel
from switchboard.generator.models.packed_linear import PackedLinear, pack_linear_layers, packing_available

KINDS = ["gpt2", "llama", "llama-gqa", "qwen2", "mistral"]
BLOCK = 4


def reference_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_transformers(kind: str, make_model_dir: Callable[..., tuple[Path, Any]]) -> None:
    folder, hf = make_model_dir(kind)
    loaded = load_model(folder, dtype="float32")
    for length in (1, 7, 40):
        ids = torch.randint(
            0, loaded.model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length)
        )
        with torch.no_grad():
            ours = loaded.model(ids)
            ref = hf(ids).logits
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def paged_step(model: Any, cache: KVCache, seqs: list[dict], chunks: list[int]) -> torch.Tensor:
    """One engine-like step: seqs[i] contributes chunks[i] new tokens; returns last-token logits per seq."""
    order = sorted(
        range(len(seqs)), key=lambda i: chunks[i] != 1
    )  # decodes first, as the engine lays them out
    ids: list[int] = []
    positions: list[int] = []
    slices: list[SequenceSlice] = []
    rows: list[int] = []
    for i in order:
        s, n = seqs[i], chunks[i]
        start = s["done"]
        ids += s["ids"][start : start + n]
        positions += list(range(start, start + n))
        slices.append(SequenceSlice(s["table"], start, n))
        rows.append(len(ids) - 1)
        s["done"] += n
    attn = AttentionContext(cache, slices, torch.device("cpu"))
    with torch.no_grad():
        logits = model.forward_step(torch.tensor(ids), torch.tensor(positions), attn, torch.tensor(rows))
    out = torch.empty_like(logits)
    out[torch.tensor(order)] = logits
    return out


def assert_paged_steps_match(model: Any, hf: Any) -> None:
    """Two sequences through paged steps (block size 4): prefill chunks that cross position 32,
    then a chunk beside a decode, then decodes; each step's logits within 1e-4 of transformers'."""
    c = model.config
    cache = KVCache(
        c.num_hidden_layers, 32, 4, c.num_key_value_heads, c.head_size, torch.float32, torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(0)
    seqs = [
        {
            "ids": torch.randint(0, c.vocab_size, (n,), generator=gen).tolist(),
            "done": 0,
            "table": list(range(i * 12, i * 12 + 12)),
        }
        for i, n in enumerate([44, 40])
    ]
    with torch.no_grad():
        refs = [hf(torch.tensor([s["ids"]])).logits[0] for s in seqs]
    for chunks in [[30, 36], [12, 1], [1, 1], [1, 1]]:
        logits = paged_step(model, cache, seqs, chunks)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], refs[i][s["done"] - 1], rtol=1e-4, atol=1e-4)


def save_with_larger_weights(hf: Any, folder: Path) -> None:
    """Rescale every matrix of `hf` to std 0.08 (as engine_fixtures does) and save it to `folder`:
    attention then depends on position strongly enough that greedy tokens change when a term is
    left out."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    hf.save_pretrained(folder, safe_serialization=True)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "qwen2"])
def test_forward_step_matches_transformers(
    kind: str, pack: bool, make_model_dir: Callable[..., tuple[Path, Any]]
) -> None:
    """The paged step, with dense or oneDNN-prepacked weights, gives the reference's logits."""
    folder, hf = make_model_dir(kind)
    loaded = load_model(folder, dtype="float32")
    loaded.model.prepare_for_serving(pack=pack)
    c = loaded.model.config
    cache = KVCache(
        c.num_hidden_layers, 32, BLOCK, c.num_key_value_heads, c.head_size, torch.float32, torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(0)
    lengths = [13, 6]
    seqs = [
        {
            "ids": torch.randint(0, c.vocab_size, (n,), generator=gen).tolist(),
            "done": 0,
            "table": list(range(i * 8, i * 8 + 8)),
        }
        for i, n in enumerate(lengths)
    ]
    refs = [reference_logits(hf, s["ids"]) for s in seqs]
    # Step 1: a chunk of the first prompt and the whole second prompt; step 2: rest of the first
    # prompt while the second decodes; then both decode token by token.
    steps = [[5, 3], [6, 1], [1, 1], [1, 1]]
    for chunks in steps:
        logits = paged_step(loaded.model, cache, seqs, chunks)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], refs[i][s["done"] - 1], rtol=1e-4, atol=1e-4)


def test_gpt2_module_matches_transformers_directly() -> None:
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=97,
        n_embd=48,
        n_layer=3,
        n_head=3,
        n_positions=64,
        n_inner=80,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT2LMHeadModel(GPT2Config.from_hf_dict(hf_cfg.to_dict())).eval()
    # HF may keep its causal-mask buffers (".attn.bias", ".attn.masked_bias") in the state dict.
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours.load_state_dict(state)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_config_exposes_kv_geometry() -> None:
    c = GPT2Config(vocab_size=10, n_embd=64, n_layer=3, n_head=4, n_positions=32)
    assert (c.num_layers, c.num_kv_heads, c.head_dim, c.max_position_embeddings, c.inner_size) == (
        3,
        4,
        16,
        32,
        256,
    )
    assert c.unsupported() == []
    assert (
        "activation_function='relu'" in GPT2Config(10, 64, 3, 4, activation_function="relu").unsupported()[0]
    )


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_explicit_causal_attention_matches_sdpa_with_gradients(kv_heads: int) -> None:
    """The training path's attention equals torch's fused kernel, values and gradients (incl. GQA)."""
    from switchboard.generator.models.llama import explicit_causal_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, 9, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, 9, 8, generator=gen, requires_grad=True)
    ours = explicit_causal_attention(q, k, v)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=kv_heads != 4
    )
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, reference)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_linear_for_any_row_count(dtype: torch.dtype) -> None:
    """Packed for batch 1, the layer still serves prefill-sized and 3-D inputs, with or without bias."""
    gen = torch.Generator().manual_seed(0)
    for bias in (True, False):
        dense = torch.nn.Linear(48, 40, bias=bias).to(dtype)
        packed = PackedLinear.from_linear(dense)
        for shape in ((1, 48), (37, 48), (2, 5, 48)):
            x = torch.randn(shape, generator=gen).to(dtype)
            with torch.no_grad():
                torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)


def test_prepare_for_serving_fuses_and_packs_every_projection(
    make_model_dir: Callable[..., tuple[Path, Any]],
) -> None:
    """After packing no dense Linear is left; the plain forward still matches the reference."""
    folder, hf = make_model_dir("llama-gqa")
    loaded = load_model(folder, dtype="float32")
    loaded.model.prepare_for_serving(pack=True)
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    attn = loaded.model.model.layers[0].self_attn
    assert attn.q_proj is None and isinstance(attn.qkv_proj, PackedLinear)
    assert pack_linear_layers(loaded.model) == 0  # idempotent
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_packed_linear_rejects_a_non_cpu_or_non_matrix_weight() -> None:
    with pytest.raises(ValueError, match="2-D CPU weight"):
        PackedLinear(torch.zeros(3), None)


def test_pinned_torch_build_has_onednn_packing() -> None:
    """The pinned CPU torch ships oneDNN, so the engine packs by default and the tests above run."""
    assert packing_available()
