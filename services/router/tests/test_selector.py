"""Tests of the selector: cost knob, dynamic k, load bias, eligibility, exploration."""

from __future__ import annotations

import math
import random

import pytest
from switchboard.router.selector import NoEligibleExpert, Selector, SelectorConfig, softmax

EXPERTS = ("bard", "milton", "scribe")
COST = {"bard": 1.0, "milton": 1.0, "scribe": 4.0}


def selector(**config: object) -> Selector:
    return Selector(EXPERTS, COST, SelectorConfig(**config))  # type: ignore[arg-type]


def test_softmax_sums_to_one_and_keeps_order() -> None:
    probs = softmax([1.0, 3.0, 2.0])
    assert math.isclose(sum(probs), 1.0)
    assert probs[1] > probs[2] > probs[0]
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]  # no overflow


def test_cost_weight_moves_the_operating_point_to_the_cheaper_expert() -> None:
    quality = {"bard": -5.0, "milton": -5.3, "scribe": -4.8}
    assert selector().select(quality, 0.1, cost_weight=0.0).primary == "scribe"
    cheap = selector().select(quality, 0.1, cost_weight=0.1)  # 0.3 nats of cost outweigh 0.2 of quality
    assert cheap.primary == "bard"
    assert cheap.choice("scribe").utility == pytest.approx(-4.8 - 0.4)
    assert sum(c.probability for c in cheap.choices) == pytest.approx(1.0)


def test_dynamic_k_selects_until_the_cumulative_threshold() -> None:
    confident = selector(cumulative_threshold=0.9, k_max=3).select({"bard": 0.0, "milton": -1.0, "scribe": -1.0}, 0.1, cost_weight=0)
    assert confident.k == 1 and confident.order[0] == "bard"
    unsure = selector(cumulative_threshold=0.9, k_max=3).select({"bard": 0.0, "milton": -0.01, "scribe": -0.02}, 0.1, cost_weight=0)
    assert unsure.k == 3
    capped = selector(cumulative_threshold=0.99, k_max=2).select({"bard": 0.0, "milton": 0.0, "scribe": 0.0}, 0.1, cost_weight=0)
    assert capped.k == 2
    assert [c.expert for c in capped.choices if c.selected] == ["bard", "milton"]  # ties: cheaper, then config order
    assert capped.order == ("bard", "milton", "scribe")  # the unselected one still follows as last resort


def test_load_bias_sheds_a_hot_expert_to_the_next_best() -> None:
    quality = {"bard": -4.6, "milton": -5.5, "scribe": -4.5}
    assert selector().select(quality, 0.05, cost_weight=0.0).primary == "scribe"
    shed = selector().select(quality, 0.05, cost_weight=0.0, bias={"scribe": -0.5})
    assert shed.primary == "bard"
    assert shed.choice("scribe").bias == -0.5


def test_ineligible_experts_are_never_candidates_and_unavailable_ones_come_last() -> None:
    quality = {"bard": -4.6, "milton": -5.5, "scribe": -4.5}
    pinned = selector().select(quality, 0.05, cost_weight=0, ineligible={"bard": "pinned", "scribe": "pinned"})
    assert pinned.order == ("milton",)
    assert pinned.choice("bard").probability == 0.0 and not pinned.choice("bard").eligible
    down = selector().select(quality, 0.05, cost_weight=0, unavailable={"scribe": "no ready replica"})
    assert down.primary == "bard" and down.order[-1] == "scribe"
    assert down.choice("scribe").probability == 0.0
    assert down.choice("scribe").why_ineligible == "no ready replica"
    # When every allowed expert looks unavailable the view is doubtful: they are ranked anyway.
    stale = selector().select(quality, 0.05, cost_weight=0, unavailable=dict.fromkeys(EXPERTS, "no ready replica"))
    assert stale.primary == "scribe"
    with pytest.raises(NoEligibleExpert) as info:
        selector().select(quality, 0.05, cost_weight=0, ineligible=dict.fromkeys(EXPERTS, "not allowed"))
    assert info.value.reasons == dict.fromkeys(EXPERTS, "not allowed")


def test_exploration_is_off_by_default_and_bounded_when_on() -> None:
    quality = {"bard": 0.0, "milton": -3.0, "scribe": -3.0}
    rng = random.Random(1)
    assert all(selector().select(quality, 0.1, cost_weight=0, rng=rng).primary == "bard" for _ in range(200))
    explored = [selector(exploration=0.2).select(quality, 0.1, cost_weight=0, rng=rng) for _ in range(2000)]
    rate = sum(s.explored for s in explored) / len(explored)
    assert 0.15 < rate < 0.25


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="cumulative_threshold"):
        selector(cumulative_threshold=0.0)
    with pytest.raises(ValueError, match="k_max"):
        selector(k_max=0)
    with pytest.raises(ValueError, match="at least one"):
        Selector((), {}, SelectorConfig())
