"""Tiny random Llama and GPT-2 model folders built with `transformers` for engine tests.

Each folder holds config.json, model.safetensors and a byte-level BPE
tokenizer.json trained on a few sentences (byte-level, so multi-byte characters
are split across tokens and the UTF-8 streaming path is exercised).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows.",
    "Of man's first disobedience, and the fruit of that forbidden tree.",
    "Café, naïve, façade: déjà vu — ünïcödé ✓ 日本語 テキスト 🎭🎭",
    "The quick brown fox jumps over the lazy dog again and again.",
]
VOCAB = 320
EOS = "<|eos|>"


def build_tokenizer(folder: Path) -> None:
    """Train a byte-level BPE on SENTENCES and save tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))


def build_llama(folder: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """A 2-layer grouped-query Llama with random weights (float32) saved in HF layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger weights than the default init so the logits are far from uniform (greedy ties are rare).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_gpt2(folder: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """A 2-layer GPT-2 with random weights (float32) saved in HF layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=max_positions,
        eos_token_id=0,
        bos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
