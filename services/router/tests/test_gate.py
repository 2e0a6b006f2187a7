"""Tests of the router's n-gram gate and its dynamic-k selection."""

from __future__ import annotations

import math

import pytest
import yaml
from switchboard.router.gate import NgramGate, cosine, hashed_ngrams, select, softmax

PROFILES = {
    "bard": "Shakespeare plays: kings, lords, thou and thee, Romeo and Juliet, Hamlet, Macbeth.",
    "milton": "Milton's Paradise Lost: heaven and hell, Satan, angels, Adam and Eve in Eden.",
    "scribe": "General early modern English prose of every kind.",
}


def test_hashed_ngrams_are_deterministic_and_ignore_case_and_spacing() -> None:
    assert hashed_ngrams("Hello   World", 1024) == hashed_ngrams("hello world", 1024)
    assert hashed_ngrams("hello", 1024) != hashed_ngrams("world", 1024)
    assert not hashed_ngrams("", 1024)  # no text, no grams
    assert all(0 <= key < 1024 for key in hashed_ngrams("some text here", 1024))


def test_cosine_bounds() -> None:
    a = hashed_ngrams("the king is dead", 4096)
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, {}) == 0.0
    assert 0.0 <= cosine(a, hashed_ngrams("zzzz qqqq", 4096)) < 0.2


def test_softmax_sums_to_one_and_keeps_order() -> None:
    probs = softmax([1.0, 3.0, 2.0])
    assert math.isclose(sum(probs), 1.0)
    assert probs[1] > probs[2] > probs[0]
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]  # no overflow


def test_gate_scores_are_probabilities_in_config_order() -> None:
    gate = NgramGate(PROFILES)
    scores = gate.score("To be or not to be")
    assert list(scores) == ["bard", "milton", "scribe"]
    assert math.isclose(sum(scores.values()), 1.0)
    assert all(0.0 <= s <= 1.0 for s in scores.values())


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Romeo, Romeo, wherefore art thou Romeo? Juliet loves thee, my lord", "bard"),
        ("Of Man's first disobedience in Eden, Satan fell from heaven to hell with his angels", "milton"),
    ],
)
def test_gate_prefers_the_expert_whose_profile_matches(prompt: str, expected: str) -> None:
    scores = NgramGate(PROFILES).score(prompt)
    assert max(scores, key=scores.__getitem__) == expected


def test_cost_bias_breaks_ties_toward_the_cheaper_expert() -> None:
    gate = NgramGate({"cheap": "same text", "dear": "same text"}, {"cheap": 1.0, "dear": 4.0})
    scores = gate.score("anything at all")
    assert scores["cheap"] > scores["dear"]


def test_gate_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="at least one expert"):
        NgramGate({})
    with pytest.raises(ValueError, match="temperature"):
        NgramGate(PROFILES, temperature=0)


def test_select_dynamic_k() -> None:
    close = select({"a": 0.45, "b": 0.40, "c": 0.15}, relative_threshold=0.5, max_k=2)
    assert close.selected == ("a", "b")
    assert close.ranked == ("a", "b", "c")
    far = select({"a": 0.1, "b": 0.8, "c": 0.1}, relative_threshold=0.5, max_k=3)
    assert far.selected == ("b",)
    capped = select({"a": 0.34, "b": 0.33, "c": 0.33}, relative_threshold=0.5, max_k=1)
    assert capped.selected == ("a",)
    with pytest.raises(ValueError):
        select({}, max_k=1)
    with pytest.raises(ValueError):
        select({"a": 1.0}, max_k=0)


def test_shipped_experts_config_routes_demo_prompts(repo_root) -> None:
    """The descriptions in config/experts.yaml separate the two small experts."""
    config = yaml.safe_load((repo_root / "config" / "experts.yaml").read_text())
    experts = config["experts"]
    gate = NgramGate(
        {e["name"]: e["description"] for e in experts}, {e["name"]: e["relative_cost"] for e in experts}
    )
    bard = gate.score("Enter Hamlet. My lord, the king doth wake tonight and takes his rouse")
    milton = gate.score("Him the Almighty Power hurled headlong flaming from the ethereal sky, Satan and his angels")
    assert max(bard, key=bard.__getitem__) == "bard-small"
    assert max(milton, key=milton.__getitem__) == "milton-small"
