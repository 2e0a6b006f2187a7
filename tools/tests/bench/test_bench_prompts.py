"""Prompt synthesis: exact token counts and really shared hash blocks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from switchboard.bench.prompts import PromptSynthesizer
from switchboard.bench.workload import TraceRequest


@pytest.fixture(scope="module")
def synth(tokenizer_json: Path, corpus_text: str) -> PromptSynthesizer:
    return PromptSynthesizer.from_file(tokenizer_json, corpus_text, block_size=32, seed=0)


def test_exact_token_counts_for_many_lengths(synth: PromptSynthesizer) -> None:
    rng = random.Random(7)
    for index in range(200):
        length = rng.choice([1, 2, 3, rng.randint(4, 2000)])
        hash_ids = tuple(rng.randint(0, 9) for _ in range(rng.randint(0, 70)))
        prompt = synth.build(TraceRequest(index, 0.0, length, 4, hash_ids))
        assert prompt.tokens == length
        assert len(synth.tokenizer.encode(prompt.text, add_special_tokens=False).ids) == length


def test_shared_hash_ids_share_text_and_tokens(synth: PromptSynthesizer) -> None:
    a = synth.build(TraceRequest(0, 0.0, 200, 4, (11, 12, 13, 14, 15, 16, 17)))
    b = synth.build(TraceRequest(1, 0.0, 300, 4, (11, 12, 99, 98, 97, 96, 95, 94, 93, 92)))
    c = synth.build(TraceRequest(2, 0.0, 200, 4, (50, 51, 52, 53, 54, 55, 56)))
    shared = synth.block_text(11) + synth.block_text(12)
    assert a.text.startswith(shared) and b.text.startswith(shared)
    assert not c.text.startswith(synth.block_text(11))
    # The shared text is also a shared token prefix (the part a prefix cache can reuse).
    ids_a = synth.tokenizer.encode(a.text, add_special_tokens=False).ids
    ids_b = synth.tokenizer.encode(b.text, add_special_tokens=False).ids
    common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
    assert common >= 2 * 32 - 2  # at most a merge at the block boundary differs
    assert synth.block_text(11) != synth.block_text(12)


def test_same_request_same_prompt_and_distinct_requests_differ(tokenizer_json: Path, corpus_text: str,
                                                               synth: PromptSynthesizer) -> None:
    again = PromptSynthesizer.from_file(tokenizer_json, corpus_text, block_size=32, seed=0)
    req = TraceRequest(5, 0.0, 150, 4)
    assert again.build(req) == synth.build(req)
    assert synth.build(TraceRequest(6, 0.0, 150, 4)).text != synth.build(req).text


def test_text_is_the_corpus(synth: PromptSynthesizer, corpus_text: str) -> None:
    # Prompts are cut from the real corpus: a block decodes to a contiguous piece of it.
    assert synth.block_text(3).strip() in corpus_text
