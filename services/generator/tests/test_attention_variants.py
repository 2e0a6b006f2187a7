"""Attention variants of the Llama family against transformers on tiny random models.

`attention_bias` (biases on q, k, v and o_proj, as transformers' LlamaConfig and
Qwen3Config put them) and Qwen3 (per-head q_norm/k_norm before RoPE, an explicit
head_dim unequal to hidden_size / num_attention_heads, no biases unless
`attention_bias`). As in test_rope_scaling.py: the plain `forward`, the paged
`forward_step` (dense and oneDNN-packed) and batched greedy generation through the
engine (with and without prefix reuse) must equal transformers; a setting the
engine does not reproduce (Qwen3's sliding window) must stop the load naming it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from switchboard.generator.engine import EngineRequest
from switchboard.generator.loader import ModelLoadError, load_model
from switchboard.generator.models.llama import LlamaConfig
from test_engine import collect, greedy, reference_greedy, running_engine
from test_models import assert_paged_steps_match, save_with_larger_weights
from test_rope_scaling import PROMPTS

Maker = Callable[..., tuple[Path, Any]]

#: name -> (conftest kind, transformers config overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-bias": ("llama-bias", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias": ("qwen3", {"attention_bias": True}),
    # Qwen3 with a scaled RoPE over its explicit head_dim.
    "qwen3-yarn": (
        "qwen3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 1e6,
            }
        },
    ),
}


def make_variant(make_model_dir: Maker, name: str) -> tuple[Path, Any]:
    """The named tiny model, saved, with larger matrix weights (as test_rope_scaling) so greedy tokens depend on every term."""
    kind, overrides = VARIANTS[name]
    folder, hf = make_model_dir(kind, name=name, **json.loads(json.dumps(overrides)))
    save_with_larger_weights(hf, folder)
    return folder, hf


def test_variant_configs_read_as_transformers_does(make_model_dir: Maker) -> None:
    """Biases where transformers puts them; Qwen3's norms and head_dim; Qwen2's q/k/v biases without o_proj's."""
    folder, hf = make_variant(make_model_dir, "llama-bias")
    attn = load_model(folder, dtype="float32").model.model.layers[0].self_attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert attn.q_norm is None and attn.k_norm is None

    folder, hf = make_variant(make_model_dir, "qwen3")
    loaded = load_model(folder, dtype="float32")
    assert loaded.architecture == "llama" and loaded.model.config.head_size == 24 != 64 // 4
    attn = loaded.model.model.layers[0].self_attn
    assert all(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert attn.q_norm is not None and attn.q_norm.weight.shape == (24,)
    assert loaded.parameter_count == sum(p.numel() for p in hf.parameters())

    folder, _ = make_model_dir("qwen2")
    attn = load_model(folder, dtype="float32").model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None

    # A config.json without head_dim gets Qwen3Config's default (128), not hidden_size / heads.
    data = dict(
        vocab_size=10,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        model_type="qwen3",
    )
    import transformers

    assert LlamaConfig.from_hf_dict(data).head_size == transformers.Qwen3Config(**data).head_dim == 128


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_and_paged_step_match_transformers(name: str, make_model_dir: Maker) -> None:
    """Logits within 1e-4 (float32): plain pass, then paged steps (chunked prefill, decodes), dense and packed."""
    folder, hf = make_variant(make_model_dir, name)
    for pack in (False, True):
        loaded = load_model(folder, dtype="float32")
        c = loaded.model.config
        for length in (1, 7, 40):
            ids = torch.randint(0, c.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                torch.testing.assert_close(loaded.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        loaded.model.prepare_for_serving(pack=pack)
        assert_paged_steps_match(loaded.model, hf)


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
async def test_batched_greedy_matches_transformers(
    name: str, prefix_caching: bool, make_model_dir: Maker
) -> None:
    """Prompts batched with chunked prefill (and shared prefixes) give transformers' greedy tokens."""
    folder, hf = make_variant(make_model_dir, name)
    loaded = load_model(folder, dtype="float32")
    engine = await running_engine(loaded, enable_prefix_caching=prefix_caching, max_tokens_per_step=10)
    try:
        results = await asyncio.gather(
            *(
                collect(engine, EngineRequest(f"r{i}", prompt=p, sampling=greedy(10)))
                for i, p in enumerate(PROMPTS)
            )
        )
        for prompt, (got, _, _) in zip(PROMPTS, results, strict=True):
            assert got == reference_greedy(hf, loaded.tokenizer.encode(prompt), 10, loaded.eos_token_ids)
        assert engine.pool.num_used == 0
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
            r"use_sliding_window=true \(sliding_window=16, max_window_layers=1\): Qwen3 sliding-window attention is not implemented",
        ),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            r"layer_types with 'sliding_attention': only 'full_attention' layers are implemented",
        ),
    ],
)  # fmt: skip
def test_qwen3_sliding_window_fails_at_load(
    edit: dict[str, Any], message: str, make_model_dir: Maker
) -> None:
    """A Qwen3 checkpoint with sliding-window layers stops the load with a message naming the setting."""
    folder, _ = make_model_dir("qwen3")
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"cannot serve model in .*: {message}"):
        load_model(folder)


def test_qwen3_sliding_window_off_serves_the_full_context(make_model_dir: Maker) -> None:
    """`sliding_window` set but `use_sliding_window` false (as Qwen3 checkpoints ship) is full attention: not capped."""
    folder, _ = make_model_dir("qwen3")
    config = json.loads((folder / "config.json").read_text())
    config.update(sliding_window=16, use_sliding_window=False)
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder, dtype="float32").max_model_len == 128


def test_o_proj_bias_without_attention_bias_is_an_unexpected_tensor(make_model_dir: Maker) -> None:
    """As in transformers, attention_bias decides the projections' biases; a stray o_proj bias is refused, named."""
    folder, _ = make_variant(make_model_dir, "llama-bias")
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"o_proj\.bias"):
        load_model(folder)
