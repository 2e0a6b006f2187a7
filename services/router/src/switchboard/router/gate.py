"""The router's gate: scores every expert for a prompt and picks the top ones.

This is the simple, documented rule of the walking skeleton (issue 2); the
learned torch gate of a later issue implements the same `Gate` protocol.

Rule (`NgramGate`):

1. Each expert has a short *profile text* (its description from the experts
   config). The profile and the prompt are each turned into a bag of hashed
   character n-grams (n = 3 and 4, lower-cased, whitespace collapsed), hashed into
   a fixed number of buckets so memory does not grow with vocabulary.
2. Counts are weighted TF-IDF style: sublinear term frequency (1 + log tf) times a
   smoothed inverse document frequency over the profiles, so grams every profile
   shares ("the", "and") count less than the ones that tell experts apart.
3. The similarity of the prompt to an expert is the cosine of the two vectors.
4. Scores are the softmax of similarity / temperature, so they lie in [0, 1] and
   sum to 1 over the experts. A small bias per expert (minus `cost_weight` times
   log relative cost) makes cheaper experts win ties.
5. Selection (dynamic k): experts are ordered by score; the best is always
   selected, and each next one is selected while its score is at least
   `relative_threshold` times the best score, up to `max_k`.

Everything is deterministic: the same prompt always gives the same scores.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

_WHITESPACE = re.compile(r"\s+")


class Gate(Protocol):
    """What the router needs from a gate: a probability per expert."""

    def score(self, prompt: str) -> dict[str, float]:
        """Return {expert: probability} over every expert; the values sum to 1."""
        ...


@dataclass(frozen=True)
class Selection:
    """The gate's decision for one prompt."""

    scores: dict[str, float]  # every expert, in config order
    selected: tuple[str, ...]  # selected experts, best first
    ranked: tuple[str, ...]  # every expert, best first


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


def softmax(values: Sequence[float]) -> list[float]:
    """Numerically stable softmax."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


class NgramGate:
    """Hashed character n-gram similarity between the prompt and each expert's profile."""

    def __init__(
        self,
        profiles: Mapping[str, str],
        relative_cost: Mapping[str, float] | None = None,
        *,
        temperature: float = 0.05,
        cost_weight: float = 0.01,
        buckets: int = 1 << 18,
    ) -> None:
        """Build the gate from {expert: profile text}, in config order.

        temperature: softmax temperature over cosine similarities (which lie in
        [0, 1]); 0.05 turns a 0.1 similarity gap into a probability ratio of e^2.
        cost_weight: bias against costly experts, times log(relative_cost).
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
        costs = relative_cost or {}
        self._bias = {name: -cost_weight * math.log(max(costs.get(name, 1.0), 1e-6)) for name in self._experts}

    @property
    def experts(self) -> list[str]:
        """Expert names in config order."""
        return list(self._experts)

    def similarities(self, prompt: str) -> dict[str, float]:
        """Cosine similarity of the prompt to every expert's profile."""
        features = tfidf(hashed_ngrams(prompt, self._buckets), self._idf, self._default_idf)
        return {name: cosine(features, self._profiles[name]) for name in self._experts}

    def score(self, prompt: str) -> dict[str, float]:
        """Softmax over (similarity / temperature + cost bias), in config order."""
        sims = self.similarities(prompt)
        logits = [sims[name] / self._temperature + self._bias[name] for name in self._experts]
        return dict(zip(self._experts, softmax(logits), strict=True))


def select(scores: Mapping[str, float], *, relative_threshold: float = 0.5, max_k: int = 2) -> Selection:
    """Order experts by score and pick the top ones with a dynamic k.

    The best expert is always selected; each next expert is selected while its
    score is at least `relative_threshold` times the best score, up to `max_k`.
    Ties keep config order (Python's sort is stable).
    """
    if not scores:
        raise ValueError("no experts to select from")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    ranked = tuple(sorted(scores, key=lambda name: -scores[name]))
    best = scores[ranked[0]]
    selected = [ranked[0]]
    for name in ranked[1:max_k]:
        if scores[name] >= relative_threshold * best:
            selected.append(name)
        else:
            break
    return Selection(scores=dict(scores), selected=tuple(selected), ranked=ranked)
