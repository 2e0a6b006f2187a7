"""The selector: from a gate's predicted quality to an ordered choice of experts.

For every expert e that can serve the request (eligible):

    utility(e) = quality(e) - lambda * relative_cost(e) + bias(e) + correction(e)
    p(e)       = softmax(utility / temperature) over the eligible experts

- `lambda` (the cost/quality knob, "cost weight") is the quality in nats per token that one unit
  of relative cost is worth: 0 picks the best expert whatever it costs, a large value the
  cheapest. It comes from the request, else the tenant, else the gate's default.
- `bias` is the load bias (load_bias.py): negative while an expert's pool is saturated, so a hot
  expert sheds traffic to the next best one without retraining.
- `correction` is the online head's learned adjustment (online.py), zero when it is off.

Dynamic k: experts in order of p; the first is the primary; more are selected while the
cumulative probability of those selected is below `cumulative_threshold`, up to `k_max`. The
selected ones are the ordered alternates for failover; the other eligible experts follow as a
last resort. An ineligible expert (pinned elsewhere, not allowed) gets p = 0 and is never a
candidate. An *unavailable* one (the router's last look at the cluster saw no ready replica, or
only replicas too short for the request) gets p = 0 too but stays at the very end of the order:
that look may be a moment old, and the scheduler, which has the truth, skips it if it still
cannot serve (it checks health and context length itself). Ties go to the cheaper expert, then
to config order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertChoice:
    """The selector's numbers for one expert (explainability: all of them reach the response)."""

    expert: str
    quality: float
    cost: float
    bias: float
    correction: float
    utility: float
    probability: float
    eligible: bool
    selected: bool
    why_ineligible: str = ""


@dataclass(frozen=True)
class Selection:
    """The selector's decision for one request."""

    choices: tuple[ExpertChoice, ...]  # every expert, in config order
    order: tuple[str, ...]  # eligible experts: selected ones first (primary first), then the rest
    k: int  # how many were selected
    cost_weight: float
    explored: bool = False  # the primary was drawn at random (online exploration)

    @property
    def primary(self) -> str:
        """The expert of the primary candidate."""
        return self.order[0]

    def choice(self, expert: str) -> ExpertChoice:
        """The numbers of one expert."""
        return next(c for c in self.choices if c.expert == expert)


class NoEligibleExpert(Exception):
    """No expert can serve the request; `reasons` says why for each."""

    def __init__(self, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        super().__init__("; ".join(f"{name}: {why}" for name, why in self.reasons.items()))


@dataclass(frozen=True)
class SelectorConfig:
    """Dynamic-k and exploration settings."""

    cumulative_threshold: float = 0.9
    k_max: int = 2
    exploration: float = 0.0  # probability of a uniformly random eligible primary


def softmax(values: Sequence[float]) -> list[float]:
    """Numerically stable softmax."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


class Selector:
    """Combines quality, cost, load bias and eligibility into a `Selection`."""

    def __init__(self, experts: Sequence[str], relative_cost: Mapping[str, float], config: SelectorConfig) -> None:
        if not experts:
            raise ValueError("the selector needs at least one expert")
        if not 0.0 < config.cumulative_threshold <= 1.0:
            raise ValueError(f"cumulative_threshold must be in (0, 1], got {config.cumulative_threshold}")
        if config.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {config.k_max}")
        self.experts = tuple(experts)
        self.cost = {name: float(relative_cost.get(name, 1.0)) for name in self.experts}
        self.config = config
        self._rank = {name: i for i, name in enumerate(self.experts)}

    def select(
        self,
        quality: Mapping[str, float],
        temperature: float,
        *,
        cost_weight: float,
        bias: Mapping[str, float] | None = None,
        correction: Mapping[str, float] | None = None,
        ineligible: Mapping[str, str] | None = None,
        unavailable: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> Selection:
        """Decide for one request. Raises NoEligibleExpert when every expert is ineligible."""
        bias = bias or {}
        correction = correction or {}
        ineligible = ineligible or {}
        unavailable = {k: v for k, v in (unavailable or {}).items() if k not in ineligible}
        allowed = [name for name in self.experts if name not in ineligible]
        if not allowed:
            raise NoEligibleExpert({name: ineligible[name] for name in self.experts})
        utility = {
            name: quality[name] - cost_weight * self.cost[name] + bias.get(name, 0.0) + correction.get(name, 0.0)
            for name in self.experts
        }
        # When every allowed expert looks unavailable, the look is what is doubtful: rank them all.
        eligible = [name for name in allowed if name not in unavailable] or allowed
        last_resort = [name for name in allowed if name not in eligible]
        probs = dict(zip(eligible, softmax([utility[n] / temperature for n in eligible]), strict=True))
        ranked = sorted(eligible, key=lambda n: (-probs[n], self.cost[n], self._rank[n]))
        explored = False
        if self.config.exploration > 0 and len(ranked) > 1 and rng is not None and rng.random() < self.config.exploration:
            pick = rng.choice(ranked)
            ranked.remove(pick)
            ranked.insert(0, pick)
            explored = True
        selected = [ranked[0]]
        mass = probs[ranked[0]]
        for name in ranked[1 : self.config.k_max]:
            if mass >= self.config.cumulative_threshold:
                break
            selected.append(name)
            mass += probs[name]
        chosen = set(selected)
        choices = tuple(
            ExpertChoice(
                expert=name,
                quality=quality[name],
                cost=self.cost[name],
                bias=bias.get(name, 0.0),
                correction=correction.get(name, 0.0),
                utility=utility[name],
                probability=probs.get(name, 0.0),
                eligible=name in eligible,
                selected=name in chosen,
                why_ineligible=ineligible.get(name) or unavailable.get(name, ""),
            )
            for name in self.experts
        )
        last_resort.sort(key=lambda n: (-utility[n], self.cost[n], self._rank[n]))
        order = tuple(selected + [n for n in ranked if n not in chosen] + last_resort)
        return Selection(choices=choices, order=order, k=len(selected), cost_weight=cost_weight, explored=explored)
