"""Request features for the gate: cheap at request time and bounded for long prompts.

A prompt becomes two things:

- **bag indices** for the gate's embedding bag: the ids of its tokens under the feature
  tokenizer (the cheapest expert's tokenizer) and hashed token bigrams, so both words and short
  phrases count;
- **dense signals**: length (characters and tokens), the tokenizer's compression (characters per
  token: text far from the experts' training text splits into more, shorter tokens), lexical
  variety (distinct tokens / tokens), layout (lines, line length, capitals, punctuation) and the
  prompt's **complexity** as its mean and spread of token surprisal (-log frequency) under a
  unigram table fitted on the gate's training prompts, shipped in the gate artifact.

Only the first `max_chars` characters are tokenized and at most `max_tokens` tokens are used,
so a 32k-character prompt costs about what a 1k one does. When the prompt is longer than that
prefix its token count is estimated from the prefix's compression, and `exact_tokens` says so.

This module has no torch import: it is shared by the router (request time), the training command
and the evaluation, so a feature means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# Names of the dense signals, in the order of `Features.dense`.
DENSE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_tokens",
    "chars_per_token",
    "distinct_token_ratio",
    "surprisal_mean",
    "surprisal_std",
    "lines_per_100_chars",
    "mean_line_chars",
    "capital_ratio",
    "punctuation_ratio",
)

LAYOUT_CHARS = 1024
_LETTER = re.compile(r"[^\W\d_]")
_CAPITAL = re.compile(r"[A-Z]")
_PUNCT = re.compile(r"[.,;:!?'\"()\[\]-]")


@dataclass(frozen=True)
class FeatureConfig:
    """How features are made; stored in the gate artifact so training and serving agree."""

    vocab_buckets: int = 4096  # token ids are folded into this many buckets (id % buckets)
    bigram_buckets: int = 16384  # hashed token bigrams, after the token buckets
    max_chars: int = 1024  # prompt prefix that is tokenized (about 350 demo-corpus tokens)
    max_tokens: int = 512  # tokens of that prefix that feed the bag and the signals

    @property
    def num_buckets(self) -> int:
        """Rows of the embedding bag."""
        return self.vocab_buckets + self.bigram_buckets

    def to_dict(self) -> dict[str, int]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureConfig:
        """Inverse of `to_dict`; unknown keys are an error (an artifact of another feature set)."""
        known = set(cls.__dataclass_fields__)
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown feature settings {sorted(extra)}")
        return cls(**{k: int(v) for k, v in data.items()})  # type: ignore[call-overload]


@dataclass(frozen=True, eq=False)
class Features:
    """The features of one prompt (compared by `same_as`: `indices` is an array)."""

    indices: np.ndarray  # embedding-bag rows, int64, read-only (never empty)
    dense: tuple[float, ...]  # in DENSE_NAMES order
    prompt_tokens: int  # exact count when exact_tokens, else an estimate from the prefix
    exact_tokens: bool

    def same_as(self, other: Features) -> bool:
        """Whether two prompts' features are identical."""
        return (
            np.array_equal(self.indices, other.indices)
            and self.dense == other.dense
            and (self.prompt_tokens, self.exact_tokens) == (other.prompt_tokens, other.exact_tokens)
        )


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 of a tokenizer.json: two experts share features only if their tokenizers match."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FeatureExtractor:
    """Turns prompt text into `Features` with one tokenizer and one unigram table."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: FeatureConfig | None = None,
        surprisal: Sequence[float] | None = None,
    ) -> None:
        """surprisal: -log frequency per token id (from the artifact); None gives every token the
        same value, which is what a table fitted on no data would say."""
        self.tokenizer = tokenizer
        self.config = config or FeatureConfig()
        self._table = np.asarray(surprisal, dtype=np.float64) if surprisal is not None and len(surprisal) else None
        self._default_surprisal = float(self._table.max()) if self._table is not None else 0.0

    @classmethod
    def from_file(
        cls, tokenizer_json: Path, config: FeatureConfig | None = None, surprisal: Sequence[float] | None = None
    ) -> FeatureExtractor:
        """Load the tokenizer from a Hugging Face `tokenizer.json`."""
        return cls(Tokenizer.from_file(str(tokenizer_json)), config, surprisal)

    def token_ids(self, text: str) -> list[int]:
        """Ids of `text` without special tokens (BOS/EOS would be the same in every prompt)."""
        # The batch "fast" path skips offset bookkeeping: about 20% less time per call.
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def extract(self, prompt: str) -> Features:
        """Features of one prompt (bounded work whatever its length)."""
        cfg = self.config
        prefix = prompt[: cfg.max_chars]
        ids = self.token_ids(prefix)
        exact = len(prompt) <= cfg.max_chars
        if exact:
            prompt_tokens = len(ids)
        else:
            # The prefix's compression extrapolated to the whole prompt.
            prompt_tokens = max(len(ids), round(len(prompt) * len(ids) / max(1, len(prefix))))
        used = ids[: cfg.max_tokens]
        if used:
            tokens = np.asarray(used, dtype=np.int64)
            # A cheap multiplicative hash; the bag only needs bigrams spread over the buckets.
            bigrams = cfg.vocab_buckets + (tokens[:-1] * 1_000_003 + tokens[1:]) % cfg.bigram_buckets
            indices = np.concatenate([tokens % cfg.vocab_buckets, bigrams])
        else:
            indices = np.zeros(1, dtype=np.int64)
        # A read-only array, not a tuple: a thousand Python ints per request cost more than the net.
        indices.flags.writeable = False
        return Features(
            indices=indices,
            dense=self._dense(prefix, used, prompt_tokens, len(prompt)),
            prompt_tokens=prompt_tokens,
            exact_tokens=exact,
        )

    def _dense(self, prefix: str, ids: Sequence[int], prompt_tokens: int, prompt_chars: int) -> tuple[float, ...]:
        count = max(1, len(ids))
        if self._table is not None and ids:
            tokens = np.asarray(ids, dtype=np.int64)
            values = np.where(tokens < len(self._table), self._table[np.minimum(tokens, len(self._table) - 1)], self._default_surprisal)
            mean, std = float(values.mean()), float(values.std())
        else:
            mean = std = 0.0
        # Layout signals read the first LAYOUT_CHARS only: they settle fast and cost per character.
        head = prefix[:LAYOUT_CHARS]
        head_chars = max(1, len(head))
        lines = head.count("\n") + 1
        letters = len(_LETTER.findall(head))
        capitals = len(_CAPITAL.findall(head))
        punctuation = len(_PUNCT.findall(head))
        return (
            math.log1p(prompt_chars),
            math.log1p(prompt_tokens),
            len(prefix) / count,
            len(set(ids)) / count,
            mean,
            std,
            100.0 * lines / head_chars,
            head_chars / lines,
            capitals / max(1, letters),
            punctuation / head_chars,
        )


def fit_surprisal(token_streams: Sequence[Sequence[int]], vocab_size: int) -> list[float]:
    """-log of add-one smoothed token frequencies over the training prompts (nats)."""
    counts = [1] * vocab_size
    for stream in token_streams:
        for token in stream:
            if token < vocab_size:
                counts[token] += 1
    total = sum(counts)
    return [-math.log(c / total) for c in counts]
