"""Which prompt a Generate request runs: the token ids sent from upstream, or its text tokenized here.

The router tokenizes each prompt once with the expert's tokenizer and the gateway sends the ids
with the fingerprint of the tokenizer that made them (`switchboard.common.tokenizer_fingerprint`).
The ids are used as they are (source `upstream`: the replica does not tokenize again) when that
fingerprint is this replica's own; a request with ids and no text at all is taken at its word
too (a client that tokenized the prompt itself). Otherwise (ids of another tokenizer, or ids
without a fingerprint, next to the text) the text is tokenized here (source `local`), as for a
request that sends text only.

Upstream ids are checked before the engine sees them, with messages that say what to fix: an
id outside the model's vocabulary, or so many ids that no output token fits in the context, is a
`PromptRejected` naming `prompt_token_ids`. No gRPC here; the servicer maps the error to
INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UPSTREAM = "upstream"
LOCAL = "local"
SOURCES = (UPSTREAM, LOCAL)


class PromptRejected(ValueError):
    """The request's prompt cannot run here; `field` names the request field to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PromptInput:
    """The prompt to run: `token_ids` (source upstream) or `text` to tokenize here (source local)."""

    source: str
    token_ids: list[int] | None = None
    text: str | None = None


def choose_prompt(
    text: str,
    token_ids: Sequence[int],
    fingerprint: str,
    own_fingerprint: str,
    vocab_size: int,
    max_model_len: int,
) -> PromptInput:
    """The prompt a request runs (see the module docstring); raises PromptRejected."""
    if not token_ids:
        if not text:
            raise PromptRejected("prompt", "is required (or send prompt_token_ids)")
        return PromptInput(LOCAL, text=text)
    ours = bool(fingerprint) and fingerprint == own_fingerprint
    if not ours and text:
        return PromptInput(LOCAL, text=text)
    if fingerprint and not ours:
        raise PromptRejected(
            "tokenizer_fingerprint",
            f"the token ids were made by tokenizer {fingerprint[:16]}..., this replica's is "
            f"{own_fingerprint[:16]}...; send the prompt text so the replica tokenizes it",
        )
    return PromptInput(UPSTREAM, token_ids=checked_ids(token_ids, vocab_size, max_model_len))


def checked_ids(token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> list[int]:
    """`token_ids` as a list, or PromptRejected when they cannot run on this model."""
    count = len(token_ids)
    if max_model_len and count >= max_model_len:
        # Checked before copying: the count alone says the request cannot run.
        raise PromptRejected(
            "prompt_token_ids",
            f"{count} prompt tokens leave no room for an output token in this model's context of "
            f"{max_model_len} tokens; shorten the prompt to fewer than {max_model_len} tokens",
        )
    ids = list(token_ids)
    if ids and max(ids) >= vocab_size:
        position, bad = next((i, t) for i, t in enumerate(ids) if t >= vocab_size)
        raise PromptRejected(
            "prompt_token_ids",
            f"token id {bad} at position {position} is outside this model's vocabulary [0, {vocab_size}); "
            "send ids made by the replica's tokenizer (its tokenizer_fingerprint) or the prompt text only",
        )
    return ids
