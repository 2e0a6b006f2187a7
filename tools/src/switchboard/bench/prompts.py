"""Prompt synthesis: real text of an exact token length under the target's tokenizer.

The corpus is tokenized once. A trace's hash id `h` names a block of `block_size` tokens
cut from the corpus at an offset derived from `h` (and the seed), so two requests whose
`hash_ids` share a leading id get byte-identical leading text: prefix caches and
cache-aware routers see exactly the reuse the trace has. Tokens a request needs beyond its
blocks come from an offset derived from the request's own index, so unrelated requests do
not share text by accident. Because tokenization does not compose across a text boundary,
the joined text is re-encoded and its tail trimmed or extended until it encodes to exactly
the requested number of tokens (without special tokens such as BOS, which servers may add).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from switchboard.bench.workload import TraceRequest
from tokenizers import Tokenizer

DEFAULT_BLOCK_SIZE = 64
MAX_FIX_ROUNDS = 16


class PromptError(RuntimeError):
    """A prompt of the requested length could not be built."""


@dataclass(frozen=True)
class Prompt:
    """A synthesized prompt and the token count it encodes to."""

    text: str
    tokens: int


def _offset(key: str, modulus: int) -> int:
    """A stable pseudo-random offset in [0, modulus) for a key (same on every machine)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % modulus


class PromptSynthesizer:
    """Builds prompts of exact token length from a corpus under one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, corpus: str, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.seed = seed
        self.corpus_ids: list[int] = tokenizer.encode(corpus, add_special_tokens=False).ids
        if len(self.corpus_ids) < 4 * block_size:
            raise PromptError(
                f"corpus too small: {len(self.corpus_ids)} tokens for blocks of {block_size} tokens"
            )

    @classmethod
    def from_file(cls, tokenizer_json: Path, corpus: str, block_size: int = DEFAULT_BLOCK_SIZE,
                  seed: int = 0) -> PromptSynthesizer:
        """Load a `tokenizer.json` (Hugging Face tokenizers format) and build a synthesizer."""
        return cls(Tokenizer.from_file(str(tokenizer_json)), corpus, block_size, seed)

    def count(self, text: str) -> int:
        """Number of tokens `text` encodes to (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _span(self, key: str, length: int) -> list[int]:
        """`length` corpus token ids starting at the offset for `key` (wrapping around)."""
        n = len(self.corpus_ids)
        start = _offset(f"{self.seed}:{key}", n)
        ids = self.corpus_ids[start : start + length]
        while len(ids) < length:
            ids += self.corpus_ids[: length - len(ids)]
        return ids

    def block_text(self, hash_id: int) -> str:
        """The text of the block named by `hash_id` (identical for every request)."""
        return self.tokenizer.decode(self._span(f"block:{hash_id}", self.block_size), skip_special_tokens=False)

    def build(self, request: TraceRequest) -> Prompt:
        """A prompt for `request` that encodes to exactly `request.input_tokens` tokens."""
        target = request.input_tokens
        if target < 1:
            raise PromptError(f"request {request.index}: input length must be >= 1")
        covered = -(-target // self.block_size)  # blocks that the prompt reaches into
        text = "".join(self.block_text(h) for h in request.hash_ids[:covered])
        filler_key = f"request:{request.index}"
        filler_used = 0
        for _ in range(MAX_FIX_ROUNDS):
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == target:
                return Prompt(text, target)
            if len(ids) > target:
                text = self.tokenizer.decode(ids[:target], skip_special_tokens=False)
            else:
                need = target - len(ids)
                extra = self._span(filler_key, filler_used + need)[filler_used:]
                filler_used += need
                text += self.tokenizer.decode(extra, skip_special_tokens=False)
        # Rare: the tail keeps merging differently. Trim or pad one token at a time.
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        for _ in range(4 * MAX_FIX_ROUNDS):
            if len(ids) == target:
                return Prompt(text, target)
            text = text[:-1] if len(ids) > target else text + " a"
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        raise PromptError(f"request {request.index}: could not reach exactly {target} tokens (got {len(ids)})")
