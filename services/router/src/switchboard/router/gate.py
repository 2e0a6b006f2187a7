"""The gate protocol and the router's built-in rule, the n-gram gate.

A gate turns a prompt into a predicted quality per expert (`GateScores`); the `Selector`
(selector.py) turns those into probabilities with the cost knob and the load bias, and picks
the experts. The learned gate (learned_gate.py) predicts the mean log-likelihood per token each
expert would reach; the n-gram rule below is the fallback when no gate artifact is configured.

Built-in rule (`NgramGate`):

1. Each expert has a short *profile text* (its description from the experts config). The
   profile and the prompt are each turned into a bag of hashed character n-grams (n = 3 and 4,
   lower-cased, whitespace collapsed), hashed into a fixed number of buckets so memory does not
   grow with vocabulary. Only the first `max_chars` characters of the prompt are read.
2. Counts are weighted TF-IDF style: sublinear term frequency (1 + log tf) times a smoothed
   inverse document frequency over the profiles, so grams every profile shares ("the", "and")
   count less than the ones that tell experts apart.
3. The "quality" of an expert is the cosine of the two vectors, on the scale of the gate's
   temperature (a 0.05 similarity gap is worth e^1 in probability at the default).

Everything is deterministic: the same prompt always gives the same scores.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from switchboard.router.features import Features

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class GateScores:
    """A gate's view of one prompt."""

    quality: tuple[float, ...]  # predicted quality per expert, in the gate's expert order
    temperature: float  # the scale of `quality`: probabilities are softmax(utility / temperature)
    prompt_tokens: int  # the prompt's length in tokens (exact or estimated, see exact_tokens)
    exact_tokens: bool
    features: Features | None = None  # what the gate saw (learned gate), for the decision log
    hidden: tuple[float, ...] = ()  # the gate's last hidden layer (learned gate), for online learning


class Gate(Protocol):
    """What the router needs from a gate."""

    kind: str  # "learned" or "ngram"
    version: str  # artifact version ("" for the built-in rule)
    experts: tuple[str, ...]  # expert names, in config order

    def score(self, prompt: str) -> GateScores:
        """Predicted quality of every expert for one prompt."""
        ...


def _normalize(text: str) -> str:
    """Lower-case and collapse whitespace so formatting does not change features."""
    return " " + _WHITESPACE.sub(" ", text.lower()).strip() + " "


def hashed_ngrams(text: str, buckets: int, sizes: Sequence[int] = (3, 4)) -> Counter[int]:
    """Count the character n-grams of `text`, hashed into `buckets` buckets.

    blake2b is used instead of `hash()` because Python salts `hash()` per process;
    the gate must give the same scores in every process.
    """
    normalized = _normalize(text)
    counts: Counter[int] = Counter()
    for size in sizes:
        for start in range(max(0, len(normalized) - size + 1)):
            gram = normalized[start : start + size].encode("utf-8")
            digest = hashlib.blake2b(gram, digest_size=8).digest()
            counts[int.from_bytes(digest, "little") % buckets] += 1
    return counts


def tfidf(counts: Counter[int], idf: Mapping[int, float], default_idf: float) -> dict[int, float]:
    """Weight counts by sublinear term frequency times inverse document frequency."""
    return {key: (1.0 + math.log(count)) * idf.get(key, default_idf) for key, count in counts.items()}


def cosine(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Cosine similarity of two sparse count vectors (0 when either is empty)."""
    if not a or not b:
        return 0.0
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    dot = sum(count * large.get(key, 0) for key, count in small.items())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm


class NgramGate:
    """Hashed character n-gram similarity between the prompt and each expert's profile."""

    def __init__(
        self,
        profiles: Mapping[str, str],
        *,
        temperature: float = 0.05,
        buckets: int = 1 << 18,
        max_chars: int = 2048,
        token_counter: Callable[[str], tuple[int, bool]] | None = None,
    ) -> None:
        """Build the gate from {expert: profile text}, in config order.

        temperature: softmax temperature over cosine similarities (which lie in
        [0, 1]); 0.05 turns a 0.1 similarity gap into a probability ratio of e^2.
        token_counter: prompt -> (tokens, exact); without one, characters / 4 (an estimate).
        """
        if not profiles:
            raise ValueError("the gate needs at least one expert")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._experts = list(profiles)
        self._buckets = buckets
        self._temperature = temperature
        counts = {name: hashed_ngrams(text, buckets) for name, text in profiles.items()}
        documents = len(counts)
        frequency: Counter[int] = Counter()
        for grams in counts.values():
            frequency.update(grams.keys())
        # Smoothed idf: a gram in no profile weighs most, one in every profile weighs 1.
        self._default_idf = math.log((1 + documents) / 1) + 1.0
        self._idf = {key: math.log((1 + documents) / (1 + df)) + 1.0 for key, df in frequency.items()}
        self._profiles = {name: tfidf(grams, self._idf, self._default_idf) for name, grams in counts.items()}
        self._max_chars = max_chars
        self._token_counter = token_counter
        self.experts = tuple(self._experts)
        self.kind = "ngram"
        self.version = ""

    def similarities(self, prompt: str) -> dict[str, float]:
        """Cosine similarity of the prompt (its first max_chars characters) to every expert's profile."""
        features = tfidf(hashed_ngrams(prompt[: self._max_chars], self._buckets), self._idf, self._default_idf)
        return {name: cosine(features, self._profiles[name]) for name in self._experts}

    def score(self, prompt: str) -> GateScores:
        """Similarities as the quality, on the scale of the configured temperature."""
        sims = self.similarities(prompt)
        if self._token_counter is not None:
            tokens, exact = self._token_counter(prompt)
        else:
            tokens, exact = max(1, len(prompt) // 4), False
        return GateScores(
            quality=tuple(sims[name] for name in self._experts),
            temperature=self._temperature,
            prompt_tokens=tokens,
            exact_tokens=exact,
        )
