"""The shared byte-level BPE tokenizer: exact round trips and its special token."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.experts.data import PreparedData
from switchboard.experts.recipes import TOKENIZER
from switchboard.experts.tokenizer import load_tokenizer, train_tokenizer
from tokenizers import Tokenizer

SAMPLES = [
    "To be, or not to be, that is the question:\n",
    "",
    " ",
    "\n\n\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\r\n\x0bvertical tab\x0cform feed",
    "Ünïcödé: café, naïve, Œdipus, ſhall, æther — “quotes” ‘single’ …",  # noqa: RUF001
    "日本語のテキスト and emoji 🎭🗡️👑 and combining e\u0301",
    "zero\u200bwidth\u00a0no-break space",
    "<|endoftext|> is text here",
]


@pytest.fixture(scope="module")
def tokenizer(data: PreparedData) -> Tokenizer:
    return load_tokenizer(data.folder)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_round_trip_of_a_held_out_work(tokenizer: Tokenizer, data: PreparedData) -> None:
    text = data.splits["test"][0].text
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_vocabulary_and_special_token(tokenizer: Tokenizer, data: PreparedData) -> None:
    assert tokenizer.get_vocab_size() == TOKENIZER.vocab_size
    assert tokenizer.token_to_id("<|endoftext|>") == data.eot_id
    # Common words are single tokens: the merges were learned from the corpus.
    assert len(tokenizer.encode(" the").ids) == 1


def test_all_experts_share_one_tokenizer(experts: dict[str, Path]) -> None:
    files = {(folder / "tokenizer.json").read_text() for folder in experts.values()}
    assert len(files) == 1


def test_training_is_deterministic() -> None:
    texts = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"] * 20
    small = TOKENIZER.__class__(vocab_size=300, min_frequency=2)
    first, second = train_tokenizer(texts, small), train_tokenizer(texts, small)
    assert first.to_str() == second.to_str()
    assert first.decode(first.encode(texts[0]).ids) == texts[0]
