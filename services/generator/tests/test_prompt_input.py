"""Which prompt a request runs (`prompt_input.choose_prompt`): upstream ids or the text tokenized here."""

from __future__ import annotations

import pytest
from switchboard.generator.prompt_input import LOCAL, UPSTREAM, PromptRejected, choose_prompt

OWN = "a" * 64
OTHER = "b" * 64
VOCAB = 100
CONTEXT = 16


def choose(text: str, ids: list[int], fingerprint: str) -> object:
    return choose_prompt(text, ids, fingerprint, OWN, VOCAB, CONTEXT)


def test_ids_of_the_own_tokenizer_are_used_as_they_are() -> None:
    chosen = choose("the text", [1, 2, 3], OWN)
    assert chosen.source == UPSTREAM and chosen.token_ids == [1, 2, 3] and chosen.text is None


@pytest.mark.parametrize("fingerprint", [OTHER, ""])
def test_ids_of_another_or_an_unknown_tokenizer_give_way_to_the_text(fingerprint: str) -> None:
    chosen = choose("the text", [1, 2, 3], fingerprint)
    assert chosen.source == LOCAL and chosen.text == "the text" and chosen.token_ids is None


def test_text_only_is_tokenized_here() -> None:
    assert choose("the text", [], "").source == LOCAL
    assert choose("the text", [], OWN).source == LOCAL  # a fingerprint without ids means nothing


def test_ids_without_text_or_fingerprint_are_the_callers_word() -> None:
    chosen = choose("", [5, 6], "")
    assert chosen.source == UPSTREAM and chosen.token_ids == [5, 6]


@pytest.mark.parametrize(
    ("text", "ids", "fingerprint", "field", "says"),
    [
        ("", [], "", "prompt", "required"),
        ("", [1, 2], OTHER, "tokenizer_fingerprint", "send the prompt text"),
        ("text", [1, VOCAB, 2], OWN, "prompt_token_ids", f"token id {VOCAB} at position 1 is outside"),
        ("", [0, 10**6], "", "prompt_token_ids", "vocabulary"),
        ("text", [1] * CONTEXT, OWN, "prompt_token_ids", f"shorten the prompt to fewer than {CONTEXT} tokens"),
    ],
)
def test_unusable_prompts_name_the_field_and_what_to_fix(
    text: str, ids: list[int], fingerprint: str, field: str, says: str
) -> None:
    with pytest.raises(PromptRejected) as info:
        choose(text, ids, fingerprint)
    assert info.value.field == field and says in info.value.message


def test_the_longest_prompt_that_leaves_room_for_one_token_is_accepted() -> None:
    assert choose("", [VOCAB - 1] * (CONTEXT - 1), OWN).token_ids == [VOCAB - 1] * (CONTEXT - 1)
