"""Which of our model classes serves a Hugging Face checkpoint, and how to build it.

`resolve_family(config_json)` maps the `architectures` (or `model_type`) of a
config.json to a `ModelFamily`: the config and model classes plus the few
per-family facts the loader needs (checkpoint key quirks, tied weights,
buffers to rebuild after meta-device construction, the usable context length).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from switchboard.generator.models.gpt2 import GPT2Config, GPT2LMHeadModel
from switchboard.generator.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    rope_inverse_frequencies,
    rope_scaling_parameters,
)
from torch import nn


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or settings are not ones this generator reproduces."""


@dataclass(frozen=True)
class ModelFamily:
    """How to build, load and describe one family of architectures."""

    name: str
    config_class: type
    model_class: type[nn.Module]
    #: config.json dict -> config object; raises UnsupportedModelError for settings we cannot reproduce.
    parse_config: Callable[[dict[str, Any]], Any]
    #: Checkpoint keys that carry no weights of ours (e.g. cached masks or RoPE tables) and are dropped.
    ignored_keys: tuple[re.Pattern[str], ...]
    #: Rewrites a checkpoint key to our parameter name (e.g. adds a missing base-model prefix).
    rename_key: Callable[[str, set[str]], str]
    #: Re-creates non-persistent buffers and re-ties shared weights after loading into a meta-built model.
    finalize: Callable[[nn.Module, torch.device], None]
    #: Longest sequence (prompt + output) the model computes exactly.
    max_model_len: Callable[[Any], int]

    def tied_key(self, config: Any) -> str | None:
        """The output-head key that is absent from checkpoints with tied embeddings."""
        return "lm_head.weight" if getattr(config, "tie_word_embeddings", False) else None


def _parse_llama(data: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from config.json, normalising transformers v4/v5 RoPE spellings."""
    data = dict(data)
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} (the Llama family here uses silu)")
    if data.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true")
    # from_hf_dict reads both RoPE spellings (v5 rope_parameters, v4 rope_theta + rope_scaling).
    config = LlamaConfig.from_hf_dict(data)
    try:
        rope_scaling_parameters(config)
    except ValueError as exc:
        raise UnsupportedModelError(str(exc)) from exc
    if config.hidden_size % config.num_attention_heads and config.head_dim is None:
        raise UnsupportedModelError(
            f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads}"
        )
    if data.get("model_type") == "qwen3":
        _refuse_qwen3_sliding_window(data)
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    return config


def _refuse_qwen3_sliding_window(data: dict[str, Any]) -> None:
    """Qwen3 with sliding-window layers is refused: our attention is full attention on every layer.

    transformers' Qwen3 makes layers from `max_window_layers` on sliding-window ones when
    `use_sliding_window` is set (or where `layer_types` says so); full attention would differ
    from it on those layers past the window, so such a checkpoint is not served at all.
    """
    if data.get("use_sliding_window"):
        raise UnsupportedModelError(
            f"use_sliding_window=true (sliding_window={data.get('sliding_window')!r}, "
            f"max_window_layers={data.get('max_window_layers')!r}): Qwen3 sliding-window attention "
            "is not implemented; only full attention on every layer"
        )
    layer_types = data.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"}, key=str)
    if other:
        raise UnsupportedModelError(
            f"layer_types with {', '.join(map(repr, other))}: only 'full_attention' layers are implemented"
        )


def _llama_max_len(config: LlamaConfig) -> int:
    """max_position_embeddings, capped at the sliding window where one is in force.

    Our attention is full attention; it equals the reference's sliding-window
    attention exactly only for sequences no longer than the window. The cap at
    max_position_embeddings also keeps "dynamic" RoPE scaling exact: transformers
    changes its frequencies only past that length (see `_dynamic_ntk_rope`).
    """
    extra = config.extra
    window = extra.get("sliding_window")
    if extra.get("model_type") in ("qwen2", "qwen3") and not extra.get("use_sliding_window", False):
        window = None
    if window:
        return min(config.max_position_embeddings, int(window))
    return config.max_position_embeddings


def _finalize_llama(model: nn.Module, device: torch.device) -> None:
    """Rebuild the RoPE table (a non-persistent buffer) and re-tie the output head."""
    assert isinstance(model, LlamaForCausalLM)
    model.inv_freq = rope_inverse_frequencies(model.config).to(device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _parse_gpt2(data: dict[str, Any]) -> GPT2Config:
    """GPT2Config from config.json; refuses variants we do not reproduce."""
    config = GPT2Config.from_hf_dict(data)
    problems = config.unsupported()
    if problems:
        raise UnsupportedModelError("unsupported GPT-2 settings: " + ", ".join(problems))
    return config


def _rename_gpt2(key: str, model_keys: set[str]) -> str:
    """Checkpoints saved from HF's bare GPT2Model (e.g. the original `gpt2`) lack `transformer.`."""
    if key not in model_keys and f"transformer.{key}" in model_keys:
        return f"transformer.{key}"
    return key


def _finalize_gpt2(model: nn.Module, device: torch.device) -> None:
    """Re-tie the output head to the token embedding."""
    assert isinstance(model, GPT2LMHeadModel)
    model.tie_weights()


LLAMA = ModelFamily(
    name="llama",
    config_class=LlamaConfig,
    model_class=LlamaForCausalLM,
    parse_config=_parse_llama,
    ignored_keys=(re.compile(r"(^|\.)rotary_emb\.inv_freq$"),),
    rename_key=lambda key, model_keys: key,
    finalize=_finalize_llama,
    max_model_len=_llama_max_len,
)

GPT2 = ModelFamily(
    name="gpt2",
    config_class=GPT2Config,
    model_class=GPT2LMHeadModel,
    parse_config=_parse_gpt2,
    # Old checkpoints store the causal mask and a constant as buffers.
    ignored_keys=(re.compile(r"(^|\.)attn\.(bias|masked_bias)$"),),
    rename_key=_rename_gpt2,
    finalize=_finalize_gpt2,
    max_model_len=lambda config: config.n_positions,
)

#: config.json "architectures" entries we serve.
ARCHITECTURES: dict[str, ModelFamily] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "GPT2LMHeadModel": GPT2,
}

#: config.json "model_type" values, used when "architectures" is absent.
MODEL_TYPES: dict[str, ModelFamily] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gpt2": GPT2,
}


def resolve_family(config_json: dict[str, Any]) -> ModelFamily:
    """The family serving this config.json; UnsupportedModelError names what was found otherwise."""
    architectures = config_json.get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = config_json.get("model_type")
    if not architectures and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = f"architectures={architectures!r}, model_type={model_type!r}"
    raise UnsupportedModelError(
        f"unknown architecture ({found}); supported: {', '.join(sorted(ARCHITECTURES))}"
    )
