"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random Hugging Face checkpoints.

transformers is used only here, at test time, as the reference implementation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

#: Training text with multi-byte characters, so the BPE has byte tokens that split them.
CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Of Man's first disobedience, and the fruit of that forbidden tree",
    "naïve café résumé — “quoted” text",
    "日本語のテキスト and 中文 text",
] * 20

VOCAB_SIZE = 384


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> tokenizers.Tokenizer:
    """A byte-level BPE with <|endoftext|> (id 0) trained on CORPUS."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def bpe_tokenizer() -> tokenizers.Tokenizer:
    """The session's tiny byte-level BPE tokenizer."""
    return build_tokenizer()


def tiny_hf_model(kind: str, **overrides: Any) -> Any:
    """A tiny random transformers model of `kind` (gpt2, llama, llama-gqa, llama-bias, qwen2, qwen3, mistral)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = dict(
            vocab_size=VOCAB_SIZE,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        cfg.update(overrides)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        rope_theta=10000.0,
    )
    if kind == "llama":
        base.update(overrides)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    if kind == "llama-gqa":
        base.update(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0)
        base.update(overrides)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    if kind == "qwen2":
        base.update(num_key_value_heads=2, rope_theta=1000000.0)
        base.update(overrides)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base)).eval()
        with torch.no_grad():  # random biases, so a dropped bias would show in the logits
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
        return model
    if kind == "llama-bias":  # attention_bias: biases on q, k, v and o_proj
        base.update(num_key_value_heads=2, attention_bias=True)
        base.update(overrides)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
        _randomize_attention_extras(model)
        return model
    if kind == "qwen3":  # q_norm/k_norm, head_dim 24 != hidden_size / heads (16)
        base.update(num_key_value_heads=2, head_dim=24, rope_theta=1000000.0, rms_norm_eps=1e-6)
        base.update(overrides)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**base)).eval()
        _randomize_attention_extras(model)
        return model
    if kind == "mistral":
        base.update(num_key_value_heads=2, sliding_window=64)
        base.update(overrides)
        return transformers.MistralForCausalLM(transformers.MistralConfig(**base)).eval()
    raise ValueError(kind)


def _randomize_attention_extras(model: Any) -> None:
    """Random attention biases and q/k norm weights, so a dropped or misplaced one shows in the logits."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(std=0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)


@pytest.fixture
def make_model_dir(tmp_path: Path, bpe_tokenizer: tokenizers.Tokenizer) -> Callable[..., tuple[Path, Any]]:
    """Factory: save a tiny HF model (+ tokenizer.json) to a fresh folder; returns (folder, hf_model)."""

    def make(
        kind: str, name: str | None = None, safe_serialization: bool = True, **overrides: Any
    ) -> tuple[Path, Any]:
        hf = tiny_hf_model(kind, **overrides)
        folder = tmp_path / (name or kind)
        hf.save_pretrained(folder, safe_serialization=safe_serialization)
        bpe_tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        return folder, hf

    return make
