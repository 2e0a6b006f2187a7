"""Tests of the router's built-in n-gram rule under the Gate protocol."""

from __future__ import annotations

import pytest
import yaml
from switchboard.router.gate import NgramGate, cosine, hashed_ngrams

PROFILES = {
    "bard": "Shakespeare plays: kings, lords, thou and thee, Romeo and Juliet, Hamlet, Macbeth.",
    "milton": "Milton's Paradise Lost: heaven and hell, Satan, angels, Adam and Eve in Eden.",
    "scribe": "General early modern English prose of every kind.",
}


def best(gate: NgramGate, prompt: str) -> str:
    scores = gate.score(prompt)
    return gate.experts[max(range(len(scores.quality)), key=scores.quality.__getitem__)]


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


def test_scores_are_similarities_in_config_order_with_the_gate_temperature() -> None:
    gate = NgramGate(PROFILES, temperature=0.07)
    scores = gate.score("To be or not to be")
    assert gate.experts == ("bard", "milton", "scribe")
    assert len(scores.quality) == 3 and all(0.0 <= q <= 1.0 for q in scores.quality)
    assert scores.temperature == 0.07
    assert gate.kind == "ngram" and gate.version == ""
    assert scores.prompt_tokens == len("To be or not to be") // 4 and not scores.exact_tokens


def test_token_counter_replaces_the_character_estimate() -> None:
    gate = NgramGate(PROFILES, token_counter=lambda prompt: (42, True))
    scores = gate.score("anything")
    assert (scores.prompt_tokens, scores.exact_tokens) == (42, True)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Romeo, Romeo, wherefore art thou Romeo? Juliet loves thee, my lord", "bard"),
        ("Of Man's first disobedience in Eden, Satan fell from heaven to hell with his angels", "milton"),
    ],
)
def test_gate_prefers_the_expert_whose_profile_matches(prompt: str, expected: str) -> None:
    assert best(NgramGate(PROFILES), prompt) == expected


def test_only_a_bounded_prefix_is_read() -> None:
    gate = NgramGate(PROFILES, max_chars=64)
    head = "Romeo, Romeo, wherefore art thou Romeo? Juliet loves thee, my lord"
    assert gate.score(head[:64] + " Satan" * 5000).quality == gate.score(head[:64]).quality


def test_gate_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="at least one expert"):
        NgramGate({})
    with pytest.raises(ValueError, match="temperature"):
        NgramGate(PROFILES, temperature=0)


def test_shipped_experts_config_routes_demo_prompts(repo_root) -> None:
    """The descriptions in config/experts.yaml separate the two small experts."""
    config = yaml.safe_load((repo_root / "config" / "experts.yaml").read_text())
    gate = NgramGate({e["name"]: e["description"] for e in config["experts"]})
    assert best(gate, "Enter Hamlet. My lord, the king doth wake tonight and takes his rouse") == "bard-small"
    assert best(gate, "Him the Almighty Power hurled headlong flaming from the ethereal sky, Satan and his angels") == "milton-small"
