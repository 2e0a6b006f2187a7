"""StopMatcher: stop strings across stream deltas, held-back prefixes, nothing leaked."""

from __future__ import annotations

import random

import pytest
from switchboard.generator.stop import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    matched = False
    for d in deltas:
        text, matched = matcher.feed(d)
        emitted.append(text)
        if matched:
            break
    if not matched:
        emitted.append(matcher.flush())
    return "".join(emitted), matched, emitted


def test_no_stops_passes_text_through() -> None:
    assert run([], ["a", "bc"]) == ("abc", False, ["a", "bc", ""])


def test_stop_inside_one_delta() -> None:
    text, matched, _ = run(["END"], ["hello END world"])
    assert (text, matched) == ("hello ", True)


def test_stop_split_across_deltas_is_held_back_then_dropped() -> None:
    text, matched, emitted = run(["\n\n"], ["one\n", "\ntwo"])
    assert (text, matched) == ("one", True)
    assert emitted == ["one", ""]


def test_partial_prefix_is_released_when_it_does_not_complete() -> None:
    text, matched, emitted = run(["STOP"], ["ab ST", "O", "!", " more"])
    assert matched is False
    assert text == "ab STO! more"
    assert emitted[0] == "ab "  # "ST" held back


def test_held_text_is_flushed_at_the_end() -> None:
    text, matched, emitted = run(["STOP"], ["fin ST"])
    assert (text, matched) == ("fin ST", False)
    assert emitted == ["fin ", "ST"]


def test_earliest_of_several_stops_wins() -> None:
    text, matched, _ = run(["world", "lo w"], ["hel", "lo world"])
    assert (text, matched) == ("hel", True)


def test_overlapping_prefixes() -> None:
    # "aab" after "aa": the held suffix must be re-checked, not just its start.
    text, matched, _ = run(["aab"], ["xa", "a", "a", "b tail"])
    assert (text, matched) == ("xa", True)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunking_does_not_change_the_result(chunk: int) -> None:
    full = "The quick brown fox. ### jumps"
    deltas = [full[i : i + chunk] for i in range(0, len(full), chunk)]
    assert run(["###", "dog"], deltas)[:2] == ("The quick brown fox. ", True)


def test_after_a_match_nothing_more_is_emitted() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.matched == "x"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_match_a_whole_text_search(seed: int) -> None:
    """Against the obvious reference: cut the whole text at the earliest stop string."""
    rng = random.Random(seed)
    alphabet = "abc"
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    hits = [full.find(s) for s in stops if full.find(s) >= 0]
    expected = (full[: min(hits)], True) if hits else (full, False)
    deltas, i = [], 0
    while i < len(full):
        n = rng.randint(1, 4)
        deltas.append(full[i : i + n])
        i += n
    assert run(stops, deltas)[:2] == expected
