"""Tokenizer wrapper and streaming detokenization (UTF-8 split across byte-level tokens)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import tokenizers
from switchboard.generator.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "To be, or not to be 🙂🚀 that is 日本語のテキスト!",
    "naïve café — “quoted” 中文 👨‍👩‍👧 done",
    "\U0001d518\U0001d52b\U0001d526 (4-byte letters) and emoji 🎉🎉 at the end 🎉",
]


class WindowRecordingTokenizer(Tokenizer):
    """The real tokenizer, recording how many ids each decode call receives."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        super().__init__(inner)
        self.windows: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.windows.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), step: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_join_to_the_full_text_and_never_split_a_character(
    bpe_tokenizer: tokenizers.Tokenizer, text: str, step: int
) -> None:
    tok = Tokenizer(bpe_tokenizer)
    ids = tok.encode(text)
    # The multi-byte characters really are split across several byte tokens.
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    deltas = stream(tok, ids, step=step)
    assert "".join(deltas) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # something was held back


def test_prompt_context_is_not_repeated(bpe_tokenizer: tokenizers.Tokenizer) -> None:
    tok = Tokenizer(bpe_tokenizer)
    prompt = tok.encode("To be, or not to be")
    out = tok.encode(", that is 🙂 the question")
    assert "".join(stream(tok, out, prompt=prompt)) == tok.decode(prompt + out)[len(tok.decode(prompt)) :]


def test_each_step_decodes_a_bounded_window(bpe_tokenizer: tokenizers.Tokenizer) -> None:
    tok = WindowRecordingTokenizer(bpe_tokenizer)
    ids = tok.encode(" ".join(TEXTS) * 4)
    assert len(ids) > 200
    stream(tok, ids)
    # A UTF-8 character is at most 4 bytes; the window never needs much more than that.
    assert max(tok.windows) <= 10


def test_flush_releases_an_incomplete_character(bpe_tokenizer: tokenizers.Tokenizer) -> None:
    tok = Tokenizer(bpe_tokenizer)
    ids = tok.encode("ok 🙂")
    byte_ids = [i for i in ids if REPLACEMENT_CHAR in tok.decode([i])]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("ok")) == "ok"
    assert detok.add(byte_ids[:1]) == ""
    assert detok.flush() == REPLACEMENT_CHAR
    assert detok.text == "ok" + REPLACEMENT_CHAR


def test_special_tokens_are_skipped(bpe_tokenizer: tokenizers.Tokenizer) -> None:
    tok = Tokenizer(bpe_tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    assert "".join(stream(tok, [*tok.encode("the end"), eos])) == "the end"


def test_from_dir_reads_special_ids(tmp_path: Path, bpe_tokenizer: tokenizers.Tokenizer) -> None:
    bpe_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6], "bos_token_id": 0}))
    tok = Tokenizer.from_dir(tmp_path, {"eos_token_id": 7})
    assert tok.eos_token_ids == {0, 5, 6, 7}
    assert tok.bos_token_id == 0
    assert tok.vocab_size == bpe_tokenizer.get_vocab_size()
    assert tok.decode(tok.encode("hello 日本")) == "hello 日本"


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_stream_to_the_full_decode(bpe_tokenizer: tokenizers.Tokenizer, seed: int) -> None:
    """Arbitrary id sequences, invalid UTF-8 included: the deltas always add up to the full decode,
    and every delta but the final flush ends on a complete character."""
    rng = random.Random(seed)
    tok = Tokenizer(bpe_tokenizer)
    ids = [rng.randrange(1, tok.vocab_size) for _ in range(120)]
    detok = IncrementalDetokenizer(tok)
    deltas = []
    i = 0
    while i < len(ids):
        step = rng.randint(1, 3)
        deltas.append(detok.add(ids[i : i + step]))
        i += step
    assert all(not d.endswith(REPLACEMENT_CHAR) for d in deltas)
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
