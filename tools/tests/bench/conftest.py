"""Shared fixtures for the bench tests: real corpus text and a byte-level BPE trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.bench.corpus import load_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TRACES = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """300 k characters of the demo corpus (Shakespeare and Milton)."""
    text, _source = load_corpus(max_chars=300_000)
    return text


def train_tokenizer(text: str, vocab_size: int = 500) -> Tokenizer:
    """A byte-level BPE like the demo experts' tokenizer, trained on `text`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """A tokenizer.json trained on the corpus (saved like an expert's)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_text[:100_000]).save(str(path))
    return path


def make_checkpoint(folder: Path, corpus_text: str) -> Path:
    """A tiny random LlamaForCausalLM with a corpus-trained tokenizer, in Hugging Face layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = train_tokenizer(corpus_text[:50_000], vocab_size=400)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """A tiny random Llama checkpoint with a corpus-trained tokenizer (Hugging Face layout)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), corpus_text)
