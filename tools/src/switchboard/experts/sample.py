"""Sampling a continuation from an expert (a quick look at what it writes).

This is a plain loop that re-runs the whole window each step: fine for a few dozen
tokens from a small model; serving uses the generator's engine instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from switchboard.experts.recipes import SAMPLING
from switchboard.experts.tokenizer import load_tokenizer
from switchboard.generator.models.llama import LlamaConfig, LlamaForCausalLM
from tokenizers import Tokenizer


def load_expert(folder: Path) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Model (float32, eval mode) and tokenizer of an expert folder."""
    config = LlamaConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    model = LlamaForCausalLM(config)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied checkpoint may omit lm_head.weight; it then shares the embedding.
    if unexpected or (missing and missing != ["lm_head.weight"]):
        raise ValueError(f"{folder}: missing weights {missing}, unexpected weights {unexpected}")
    model.eval()
    return model, load_tokenizer(folder)


@torch.no_grad()
def continue_text(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 48,
    temperature: float = SAMPLING.temperature,
    top_k: int = SAMPLING.top_k,
    seed: int = SAMPLING.seed,
    repetition_penalty: float = SAMPLING.repetition_penalty,
) -> str:
    """Sampled continuation of `prompt` (only the new text), stopping at end-of-text.

    `repetition_penalty` > 1 damps every token already in the window (CTRL / Hugging
    Face rule, as the generator's sampler applies it): the tiny experts otherwise fall
    into loops of blank lines and stage directions.
    """
    if not prompt:
        raise ValueError("prompt must not be empty")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt).ids
    new: list[int] = []
    limit = model.config.max_position_embeddings
    eos = model.config.eos_token_id
    for _ in range(max_new_tokens):
        window = torch.tensor([(ids + new)[-limit:]])
        logits = model(window)[0, -1].float()
        if repetition_penalty != 1.0:
            seen = torch.unique(window[0])
            picked = logits[seen]
            logits[seen] = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / temperature, min(top_k, logits.numel()))
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            token = int(indices[choice])
        if token == eos:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)
