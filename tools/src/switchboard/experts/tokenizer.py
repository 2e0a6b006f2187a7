"""Byte-level BPE tokenizer of the demo experts, trained with `tokenizers`.

Byte-level pre-tokenisation with no normaliser and no added prefix space makes
`decode(encode(text)) == text` for any string, so scoring and generation never lose
a character. `<|endoftext|>` separates works in training and serves as BOS and EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from switchboard.experts.recipes import TokenizerRecipe
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_tokenizer(texts: Iterable[str], recipe: TokenizerRecipe) -> Tokenizer:
    """Train a byte-level BPE on the texts (deterministic for the same input)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=recipe.min_frequency,
        special_tokens=list(recipe.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Fed line by line: whole works as single sequences make the trainer very slow.
    lines = (line for text in texts for line in text.splitlines(keepends=True))
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def special_token_id(tokenizer: Tokenizer, recipe: TokenizerRecipe) -> int:
    """Id of the end-of-text token (used as BOS and EOS)."""
    token_id = tokenizer.token_to_id(recipe.special_tokens[0])
    if token_id is None:
        raise ValueError(f"tokenizer has no {recipe.special_tokens[0]} token")
    return token_id


def write_tokenizer_files(tokenizer: Tokenizer, recipe: TokenizerRecipe, folder: Path) -> None:
    """Write tokenizer.json and the tokenizer_config.json that transformers reads."""
    tokenizer.save(str(folder / "tokenizer.json"))
    eot = recipe.special_tokens[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": recipe.model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}, indent=2) + "\n"
    )


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a saved tokenizer.json (a file or a model folder)."""
    file = path / "tokenizer.json" if path.is_dir() else path
    return Tokenizer.from_file(str(file))
