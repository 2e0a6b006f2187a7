"""Sampling from an expert: the repetition penalty follows the CTRL / Hugging Face rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from switchboard.experts.cache import expert_dir
from switchboard.experts.sample import continue_text, load_expert
from switchboard.generator.models.llama import LlamaForCausalLM
from tokenizers import Tokenizer

Expert = tuple[LlamaForCausalLM, Tokenizer]


@pytest.fixture(scope="module")
def bard(experts: dict[str, Path]) -> Expert:
    """The built bard-small expert and its tokenizer."""
    return load_expert(expert_dir("bard-small"))


def test_greedy_first_token_applies_the_penalty_to_seen_tokens(bard: Expert) -> None:
    model, tokenizer = bard
    prompt = "My lord, my lord, my lord,"
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].float()
    penalty = 3.0
    expected = logits.clone()
    for token in set(ids):
        value = expected[token]
        expected[token] = value * penalty if value < 0 else value / penalty
    first = continue_text(
        model, tokenizer, prompt, max_new_tokens=1, temperature=0.0, repetition_penalty=penalty
    )
    assert first == tokenizer.decode([int(expected.argmax())], skip_special_tokens=True)
    plain = continue_text(model, tokenizer, prompt, max_new_tokens=1, temperature=0.0)
    assert plain == tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)


def test_a_strong_penalty_writes_fewer_blank_lines(bard: Expert) -> None:
    model, tokenizer = bard
    runs = {
        penalty: [
            continue_text(
                model, tokenizer, "To be, or not to be", 40, 0.7, 40, seed, repetition_penalty=penalty
            )
            for seed in range(3)
        ]
        for penalty in (1.0, 1.5)
    }
    assert sum(t.count("\n\n") for t in runs[1.5]) < sum(t.count("\n\n") for t in runs[1.0])


def test_a_non_positive_penalty_is_refused(bard: Expert) -> None:
    model, tokenizer = bard
    with pytest.raises(ValueError, match="repetition_penalty"):
        continue_text(model, tokenizer, "Hi", repetition_penalty=0.0)
