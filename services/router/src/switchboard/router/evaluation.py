"""Offline measures of a routing policy on scored prompts (no torch, no I/O).

Inputs are per prompt: the true quality of every expert (mean log-likelihood per token of the
reference continuation), its cost (relative cost x tokens) and its token count. A policy is one
chosen expert per prompt. The measures:

- **quality**: token-weighted mean log-likelihood per token of the chosen experts' answers;
- **cost**: total cost of the choices, also as a fraction of always-best's cost;
- **APGR** (average performance gap recovered, after RouteLLM): the share of the quality gap
  between always-cheapest and always-best that the policy recovers, (Q - Q_cheap) / (Q_best - Q_cheap);
- **compute**: parameters x tokens of the choices, as a fraction of always-best's;
- **optimal-selection rate**: how often the choice is the oracle's at the same cost weight
  (the expert that maximises true quality - lambda x relative cost for that prompt).

"always-best" is the expert with the best mean quality over the whole set, "always-cheapest" the
one with the lowest relative cost (ties: the better one).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScoredSet:
    """Prompts with every expert's true quality and cost."""

    experts: tuple[str, ...]
    relative_cost: tuple[float, ...]
    parameters: tuple[int, ...]
    quality: tuple[tuple[float, ...], ...]  # [prompt][expert]
    tokens: tuple[int, ...]  # tokens each prompt costs (prompt + continuation)
    weights: tuple[int, ...]  # continuation tokens each prompt's quality is averaged over

    def __post_init__(self) -> None:
        if not self.quality:
            raise ValueError("no prompts to evaluate")
        if any(len(row) != len(self.experts) for row in self.quality):
            raise ValueError("every prompt needs a quality for every expert")

    def mean_quality(self, choices: Sequence[int]) -> float:
        """Token-weighted mean quality of one choice per prompt."""
        total = sum(w * row[c] for w, row, c in zip(self.weights, self.quality, choices, strict=True))
        return total / sum(self.weights)

    def total_cost(self, choices: Sequence[int]) -> float:
        """Relative cost x tokens summed over prompts."""
        return sum(self.relative_cost[c] * t for c, t in zip(choices, self.tokens, strict=True))

    def total_compute(self, choices: Sequence[int]) -> float:
        """Parameters x tokens summed over prompts."""
        return sum(float(self.parameters[c]) * t for c, t in zip(choices, self.tokens, strict=True))

    def constant(self, expert: int) -> list[int]:
        """The policy that always picks one expert."""
        return [expert] * len(self.quality)

    @property
    def best(self) -> int:
        """Index of always-best."""
        return max(range(len(self.experts)), key=lambda e: self.mean_quality(self.constant(e)))

    @property
    def cheapest(self) -> int:
        """Index of always-cheapest (ties: the better mean quality)."""
        low = min(self.relative_cost)
        tied = [e for e, c in enumerate(self.relative_cost) if c == low]
        return max(tied, key=lambda e: self.mean_quality(self.constant(e)))


@dataclass(frozen=True)
class PolicyReport:
    """The measures of one policy."""

    name: str
    quality: float
    cost: float
    cost_fraction: float  # of always-best's cost
    compute_fraction: float  # of always-best's parameters x tokens
    apgr: float
    optimal_rate: float | None
    share: dict[str, float]


def choose(predicted: Sequence[Sequence[float]], relative_cost: Sequence[float], cost_weight: float) -> list[int]:
    """argmax of predicted quality - lambda x relative cost per prompt (ties: the cheaper expert)."""
    out = []
    for row in predicted:
        out.append(max(range(len(row)), key=lambda e: (row[e] - cost_weight * relative_cost[e], -relative_cost[e])))
    return out


def report(scored: ScoredSet, name: str, choices: Sequence[int], cost_weight: float | None = None) -> PolicyReport:
    """All measures of one policy; optimal_rate needs the cost weight the policy ran at."""
    best, cheap = scored.constant(scored.best), scored.constant(scored.cheapest)
    q, q_best, q_cheap = scored.mean_quality(choices), scored.mean_quality(best), scored.mean_quality(cheap)
    gap = q_best - q_cheap
    optimal = None
    if cost_weight is not None:
        oracle = choose(scored.quality, scored.relative_cost, cost_weight)
        optimal = sum(a == b for a, b in zip(choices, oracle, strict=True)) / len(choices)
    counts = [0] * len(scored.experts)
    for c in choices:
        counts[c] += 1
    return PolicyReport(
        name=name,
        quality=q,
        cost=scored.total_cost(choices),
        cost_fraction=scored.total_cost(choices) / scored.total_cost(best),
        compute_fraction=scored.total_compute(choices) / max(1.0, scored.total_compute(best)),
        apgr=(q - q_cheap) / gap if gap > 0 else 0.0,
        optimal_rate=optimal,
        share={e: n / len(choices) for e, n in zip(scored.experts, counts, strict=True)},
    )


def curve(
    scored: ScoredSet, predicted: Sequence[Sequence[float]], cost_weights: Sequence[float]
) -> list[tuple[float, PolicyReport]]:
    """The policy's measures at each cost weight (the quality/cost curve)."""
    return [(w, report(scored, f"lambda={w:g}", choose(predicted, scored.relative_cost, w), w)) for w in cost_weights]


def at_cost(
    scored: ScoredSet, predicted: Sequence[Sequence[float]], cost_fraction: float, cost_weights: Sequence[float]
) -> tuple[float, PolicyReport]:
    """The best-quality point of the curve whose cost fraction is at most `cost_fraction`."""
    points = [(w, r) for w, r in curve(scored, predicted, cost_weights) if r.cost_fraction <= cost_fraction + 1e-9]
    if not points:
        w = max(cost_weights)
        return w, report(scored, f"lambda={w:g}", choose(predicted, scored.relative_cost, w), w)
    return max(points, key=lambda p: (p[1].quality, -p[1].cost))


def random_at_cost(scored: ScoredSet, cost_fraction: float, seed: int = 0, draws: int = 20) -> PolicyReport:
    """Random routing with the same expected cost: always-best with probability p, else a uniformly
    random cheaper expert; p solves the cost equation. Averaged over `draws` seeded draws."""
    best = scored.best
    cheaper = [e for e in range(len(scored.experts)) if scored.relative_cost[e] < scored.relative_cost[best]]
    if not cheaper:
        return report(scored, "random at equal cost", scored.constant(best))
    cost_best = scored.total_cost(scored.constant(best))
    cost_cheap = sum(scored.total_cost(scored.constant(e)) for e in cheaper) / len(cheaper)
    p = min(1.0, max(0.0, (cost_fraction * cost_best - cost_cheap) / max(1e-9, cost_best - cost_cheap)))
    rng = random.Random(seed)
    reports = []
    for _ in range(draws):
        choices = [best if rng.random() < p else rng.choice(cheaper) for _ in scored.quality]
        reports.append(report(scored, "random at equal cost", choices))
    n = len(reports)
    return PolicyReport(
        name="random at equal cost",
        quality=sum(r.quality for r in reports) / n,
        cost=sum(r.cost for r in reports) / n,
        cost_fraction=sum(r.cost_fraction for r in reports) / n,
        compute_fraction=sum(r.compute_fraction for r in reports) / n,
        apgr=sum(r.apgr for r in reports) / n,
        optimal_rate=None,
        share={e: sum(r.share[e] for r in reports) / n for e in scored.experts},
    )


def default_cost_weights() -> list[float]:
    """The lambda grid of curves and of the default operating point."""
    return [0.0] + [round(0.005 * 1.05**i, 6) for i in range(160)]
