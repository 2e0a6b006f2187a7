"""RoPE scaling (linear, dynamic NTK, llama3, yarn) against transformers on tiny random Llamas.

Each model's sequences run past `original_max_position_embeddings` (llama3, yarn), so
every branch of the scaled frequencies is used; linear scales every position. The
plain `forward`, the paged `forward_step` and batched greedy generation through the
engine (with and without prefix reuse) must equal transformers, and a RoPE setting
the engine does not reproduce must stop the load with a message naming it.
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
from switchboard.generator.models.llama import LlamaConfig, rope_parameters
from test_engine import collect, greedy, reference_greedy, running_engine
from test_models import assert_paged_steps_match, save_with_larger_weights

Maker = Callable[..., tuple[Path, Any]]

#: name -> (max_position_embeddings, transformers v5 rope_parameters without rope_theta).
SCALINGS: dict[str, tuple[int, dict[str, Any]]] = {
    "linear": (128, {"rope_type": "linear", "factor": 4.0}),
    # Served up to max_position_embeddings, where transformers does not rescale yet.
    "dynamic": (64, {"rope_type": "dynamic", "factor": 2.0}),
    # head_dim 16, theta 50000: wavelengths 6.3 (< 32/4: kept), 24 (smoothed), the rest (> 32: / factor).
    "llama3": (
        128,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "yarn": (128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn-mscale": (
        128,
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ),
}

PROMPTS = [
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings",
    "Of Man's first disobedience, and the fruit",
    "naïve café résumé — “quoted” text, 日本語のテキスト and 中文 text, the slings and arrows",
    "The slings and arrows of outrageous fortune, Of Man's first disobedience, and the fruit of that",
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the arrows",
]


def make_scaled(make_model_dir: Maker, name: str) -> tuple[Path, Any]:
    """A tiny grouped-query Llama (theta 50000) with the named RoPE scaling, saved and in transformers."""
    max_positions, params = SCALINGS[name]
    folder, hf = make_model_dir(
        "llama-gqa", name=name, max_position_embeddings=max_positions, rope_parameters=dict(params)
    )
    save_with_larger_weights(hf, folder)  # so greedy tokens change when the RoPE scaling is ignored
    return folder, hf


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_tables_equal_transformers(name: str, make_model_dir: Maker) -> None:
    """Inverse frequencies and the cos/sin factor equal transformers' rotary embedding, bit for bit."""
    folder, hf = make_scaled(make_model_dir, name)
    loaded = load_model(folder, dtype="float32")
    rotary = hf.model.rotary_emb
    assert torch.equal(loaded.model.inv_freq, rotary.inv_freq)
    assert loaded.model.rope_attention_scaling == rotary.attention_scaling
    if name.startswith("yarn"):
        assert loaded.model.rope_attention_scaling != 1.0
    positions = torch.arange(loaded.max_model_len)
    cos, sin = loaded.model._rope_tables(torch.float32, torch.device("cpu"))
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


@pytest.mark.parametrize("name", list(SCALINGS))
def test_forward_and_paged_step_match_transformers(name: str, make_model_dir: Maker) -> None:
    """Logits within 1e-4 (float32), plain pass and paged steps with chunked prefill and decodes."""
    folder, hf = make_scaled(make_model_dir, name)
    loaded = load_model(folder, dtype="float32")
    c = loaded.model.config
    assert loaded.max_model_len == SCALINGS[name][0]
    for length in (7, 40, loaded.max_model_len):
        ids = torch.randint(0, c.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)

    loaded.model.prepare_for_serving(pack=False)
    assert_paged_steps_match(loaded.model, hf)


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("name", list(SCALINGS))
async def test_batched_greedy_matches_transformers(
    name: str, prefix_caching: bool, make_model_dir: Maker
) -> None:
    """Prompts batched with chunked prefill (and shared prefixes) give transformers' greedy tokens."""
    folder, hf = make_scaled(make_model_dir, name)
    loaded = load_model(folder, dtype="float32")
    lengths = [len(loaded.tokenizer.encode(p)) for p in PROMPTS]
    assert max(lengths) > 32 and max(lengths) + 10 <= loaded.max_model_len
    engine = await running_engine(loaded, enable_prefix_caching=prefix_caching, max_tokens_per_step=10)
    try:
        results = await asyncio.gather(
            *(
                collect(engine, EngineRequest(f"r{i}", prompt=p, sampling=greedy(10)))
                for i, p in enumerate(PROMPTS)
            )
        )
        for prompt, (got, _, _) in zip(PROMPTS, results, strict=True):
            assert got == reference_greedy(hf, loaded.tokenizer.encode(prompt), 10)
        assert engine.pool.num_used == 0
    finally:
        await engine.stop()


def test_transformers_v4_spelling_loads_the_same(make_model_dir: Maker) -> None:
    """A config.json with top-level rope_theta and rope_scaling {"type": ...} gives the same tables."""
    folder, hf = make_scaled(make_model_dir, "yarn")
    config = json.loads((folder / "config.json").read_text())
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, dtype="float32")
    assert torch.equal(loaded.model.inv_freq, hf.model.rotary_emb.inv_freq)
    assert loaded.model.rope_attention_scaling == hf.model.rotary_emb.attention_scaling
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_top_level_original_max_position_embeddings_wins_as_in_transformers() -> None:
    """Phi-3 style configs keep original_max_position_embeddings outside the RoPE dict; it takes priority."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    data = dict(
        vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=128, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4},
    )  # fmt: skip
    hf = transformers.LlamaConfig(**json.loads(json.dumps(data)))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, scale = rope_parameters(LlamaConfig.from_hf_dict(json.loads(json.dumps(data))))
    assert torch.equal(inv, ref_inv) and scale == ref_scale


_SUPPORTED = r"supported: default, dynamic, linear, llama3, yarn"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, rf"RoPE scaling type 'longrope' is not supported; {_SUPPORTED}"),
        ({"rope_scaling": {"type": "su", "factor": 2.0}}, rf"RoPE scaling type 'su' is not supported; {_SUPPORTED}"),
        ({"rope_scaling": "linear"}, rf"rope_scaling='linear' is not an object; {_SUPPORTED}"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, r"RoPE scaling type 'llama3': missing low_freq_factor, high_freq_factor"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"RoPE scaling type 'linear': missing factor"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": "two"}}, r"RoPE scaling type 'dynamic': factor='two' must be a positive number"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, r"RoPE scaling type 'linear': factor=0 must be a positive number"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
            r"RoPE scaling type 'llama3': low_freq_factor=4.0 and high_freq_factor=4.0 must be numbers with 0 < low < high",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
            r"RoPE scaling type 'yarn': original_max_position_embeddings=0 must be a positive integer",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "x"}}, r"RoPE scaling type 'yarn': beta_fast='x' must be a number"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            r"RoPE scaling type 'linear': partial_rotary_factor=0.5 \(only full-head rotation is implemented\)",
        ),
    ],
)  # fmt: skip
def test_unsupported_or_malformed_rope_scaling_fails_at_load(
    edit: dict[str, Any], message: str, make_model_dir: Maker
) -> None:
    """The load stops with ModelLoadError naming the folder, the type and what is wrong (or the supported types)."""
    folder, _ = make_model_dir("llama")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"cannot serve model in .*: {message}"):
        load_model(folder)
