"""Redaction of personal data and secrets from text that an operator chose to log.

The services never log prompts or outputs by default (only lengths and ids). Where an operator
opts into logging text for debugging, the text passes `redact` first, usually through
`RedactingProcessor` in the structlog chain, so a debug log does not become a store of e-mail
addresses, phone numbers, card numbers or credentials.

Redaction is best effort and tuned for precision on ordinary text: years, prices, token counts,
short ids, dates and version numbers are left alone; card numbers must pass the Luhn check; phone
numbers need an international `+` prefix or a national format with separators.

Every pattern is precompiled and built so that the regex engine cannot backtrack
catastrophically: repetitions are bounded or separated by characters the repeated part cannot
contain, and each long-scanning pattern starts only at a boundary (a lookbehind) so a failed
attempt is not retried from every character of a long run. Redacting is linear in the text length.
The placeholders contain no digits, `@` or key prefixes, so `redact` is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from functools import partial
from typing import Any

__all__ = [
    "CARD",
    "DEFAULT_REDACTED_KEYS",
    "EMAIL",
    "PHONE",
    "SECRET",
    "RedactingProcessor",
    "luhn_valid",
    "redact",
]

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
SECRET = "[SECRET]"

# Event keys whose values are user text (requests, model outputs) in our log lines.
DEFAULT_REDACTED_KEYS: frozenset[str] = frozenset({"prompt", "text", "output", "completion", "messages"})

# Containers nested deeper than this are replaced whole: unverifiable, and a cycle would recurse forever.
_MAX_DEPTH = 32

# --- secrets --------------------------------------------------------------------------------------
# A JWT: base64url header and payload starting `eyJ` (`{"`), then a signature (empty for alg none).
_JWT = re.compile(r"(?<![A-Za-z0-9_\]-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Our API keys (`sb-` + token_urlsafe), OpenAI/Anthropic style `sk-...` (incl. sk-proj-, sk-ant-).
_PREFIXED_KEY = re.compile(r"(?<![A-Za-z0-9_\]-])(?:sb|sk)-[A-Za-z0-9_-]{16,}")
# AWS access key ids (long-term AKIA, temporary ASIA).
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9\]])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")
# `Bearer <token>`: the token must contain a digit or token punctuation other than a full stop, so
# "bearer responsibilities." stays, and it does not end with a full stop (the sentence's). The
# lookahead scans only the token's own characters (the class excludes spaces).
_BEARER = re.compile(
    r"(?<![A-Za-z0-9\]])((?i:bearer)\s+)(?=[A-Za-z0-9._~+/-]*[0-9_~+/-])[A-Za-z0-9._~+/-]{7,}[A-Za-z0-9_~+/-]=*"
)
# `key=...`, `api_key: ...`, `token=...`, `secret=...`, `password=...`: long hex/base64 values
# (16 characters or more, not ending with a full stop, which belongs to the sentence).
# `_`/`-` may precede the name (api_key, x-api-key, client_secret) but not a letter or digit, so
# "monkey=..." is not a key; `max_tokens=512` has neither the exact name nor a long value.
_ASSIGNED_SECRET = re.compile(
    r"(?<![A-Za-z0-9\]])(?i:(?:api[_-]?)?key|token|secret|password|passwd|pwd)"
    r"([\"']?\s*[=:]\s*[\"']?)[A-Za-z0-9+/_.~-]{15,}[A-Za-z0-9+/_~-]={0,2}"
)
# Short passwords in query strings and config lines: `password=hunter2` (any value up to a delimiter).
_ASSIGNED_PASSWORD = re.compile(r"(?<![A-Za-z0-9\]])(?i:password|passwd|pwd)(=)[^\s&;,\"'\[\]]+")

# --- e-mail ---------------------------------------------------------------------------------------
# Local part bounded at 64 (RFC 5321); domain labels separated by dots the labels cannot contain.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\]-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,63}(?![A-Za-z0-9-])"
)

# --- payment cards --------------------------------------------------------------------------------
# 13-19 digits, bare or grouped as printed on cards (4-4-4-4[-3], 4-4-4-1..7, Amex/Diners 4-6-5/4-6-4)
# with one consistent separator. The first digit must be a major issuer range (2: Mastercard 2-series,
# 3: Amex/Diners/JCB, 4: Visa, 5: Mastercard/Maestro, 6: Discover/UnionPay), so 13-digit epoch
# millisecond timestamps (starting with 1) are never candidates. `luhn_valid` then decides.
_CARD = re.compile(
    r"(?<![\w.\]-])(?:"
    r"[2-6]\d{12,18}"
    r"|[2-6]\d{3}([ -])\d{4}\1\d{4}\1\d{1,7}(?:\1\d{3})?"
    r"|[2-6]\d{3}([ -])\d{6}\2\d{4,5}"
    r")(?![\w-])"
)

# --- phone numbers --------------------------------------------------------------------------------
# International: `+` then digits, single separators between digits, and parenthesised groups such
# as "+1 (555) 123-4567" or "+44 (0)20 7946 0958". Which alternative applies is decided by the next
# one or two characters, so the repetition never backtracks into itself. 9-15 digits (E.164) are
# checked afterwards.
_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+\]])\+\d(?:\d|[ .-]\d|[ .-]?\(\d{1,5}\))*(?!\w)")
# National formats, which need separators so bare digit runs (ids, counts) are never phones:
#   North American: 555-123-4567, 555.123.4567, 555 123 4567, (555) 123-4567, 1-800-555-1234
#   trunk prefix 0: 030 1234567, 030/1234567, 06-12345678, 020 7946 0958, 01 23 45 67 89,
#                   0044 20 7946 0958
# Not preceded or followed by `digit.`/`digit-`, so parts of longer dotted/dashed numbers are not taken
# (a placeholder counts as a digit there, so a second pass sees what the first saw).
_PHONE_NATIONAL = re.compile(
    r"(?<![\w+\]])(?<![\d\]][.-])(?:"
    r"(?:1[ .-])?\d{3}([ .-])\d{3}\1\d{4}"
    r"|(?:1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|0\d{1,4}[ ./-]\d{2,8}(?:[ .-]\d{2,8}){0,4}"
    r")(?!\w)(?![.-]\d)"
)

_NON_DIGIT = re.compile(r"\D")


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum that every payment card number carries."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# A decision on a candidate match: (replacement, end of the text it replaces), or None to leave it.
_Decision = tuple[str, int] | None


def _card(match: re.Match[str]) -> _Decision:
    """[CARD] for a Luhn-valid candidate; for a grouped one, for the longest Luhn-valid run of its groups.

    The run case catches a card number printed next to other digit groups, such as a CVC after it
    ("4111 1111 1111 1111 123"), which the candidate swallows and which then fails the checksum.
    """
    found = match.group(0)
    digits = _NON_DIGIT.sub("", found)
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return CARD, match.end()
    separator = match.group(1) or match.group(2)
    if not separator:
        return None
    groups = found.split(separator)  # at most 5 groups, so at most 10 runs to try
    for length in range(len(groups) - 1, 2, -1):
        for first in range(len(groups) - length + 1):
            run = "".join(groups[first : first + length])
            if 13 <= len(run) <= 19 and luhn_valid(run):
                return separator.join([*groups[:first], CARD, *groups[first + length :]]), match.end()
    return None


def _phone(match: re.Match[str]) -> _Decision:
    """[PHONE] for 9-15 digits (E.164 allows at most 15).

    A longer candidate is a phone number followed by more numbers, typically a list of them
    ("030 1234567 030 7654321"): its shortest space-separated prefix with 9 digits or more is taken
    as the number and the search goes on after it, so the next number is found on its own.
    """
    found = match.group(0)
    digits = sum(char.isdigit() for char in found)
    if 9 <= digits <= 15:
        return PHONE, match.end()
    if digits < 9:
        return None
    count = 0
    length = -1  # no separator before the first chunk
    for chunk in found.split(" "):
        count += sum(char.isdigit() for char in chunk)
        length += len(chunk) + 1
        if count >= 9:
            return (PHONE, match.start() + length) if count <= 15 else None
    return None


def _substitute(pattern: re.Pattern[str], decide: Callable[[re.Match[str]], _Decision], text: str) -> str:
    """`pattern.sub` whose callback may replace only a prefix of a match, or refuse it.

    After a refusal the search resumes one character after the refused match's start, not after its
    end: a rejected candidate (a Luhn-invalid run, too many digits) may have swallowed the start of a
    real one ("4567 4111 1111 1111 1111"). The lookbehinds keep such retries to token starts, so the
    work stays linear.
    """
    pieces: list[str] = []
    kept = 0  # text[kept:] has not been copied to pieces yet
    position = 0
    while (match := pattern.search(text, position)) is not None:
        decision = decide(match)
        if decision is None:
            position = match.start() + 1
            continue
        replacement, end = decision
        pieces.append(text[kept : match.start()])
        pieces.append(replacement)
        kept = position = end
    pieces.append(text[kept:])
    return "".join(pieces)


def _keep_name(match: re.Match[str]) -> str:
    """`token=abcd...` -> `token=[SECRET]`: the name stays so the log line still says what was there."""
    return match.group(0)[: match.end(1) - match.start(0)] + SECRET


def _replace(pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str]) -> Callable[[str], str]:
    return partial(pattern.sub, replacement)


def _decide(pattern: re.Pattern[str], decide: Callable[[re.Match[str]], _Decision]) -> Callable[[str], str]:
    return partial(_substitute, pattern, decide)


# Order matters: secrets first (a key or JWT may contain digit runs that later rules would partly
# eat), then e-mail (a local part may hold a phone number), cards before phones (a grouped card
# number also has the shape of a long phone number).
_PASSES: tuple[Callable[[str], str], ...] = (
    _replace(_JWT, SECRET),
    _replace(_PREFIXED_KEY, SECRET),
    _replace(_AWS_KEY_ID, SECRET),
    _replace(_BEARER, rf"\1{SECRET}"),
    _replace(_ASSIGNED_SECRET, _keep_name),
    _replace(_ASSIGNED_PASSWORD, _keep_name),
    _replace(_EMAIL, EMAIL),
    _decide(_CARD, _card),
    _decide(_PHONE_INTERNATIONAL, _phone),
    _decide(_PHONE_NATIONAL, _phone),
)


def redact(text: str) -> str:
    """`text` with e-mail addresses, phone numbers, card numbers and secrets replaced by placeholders.

    Placeholders: [EMAIL], [PHONE], [CARD], [SECRET] (`Bearer [SECRET]`, `token=[SECRET]` keep
    their prefix). Linear time; idempotent.
    """
    for apply in _PASSES:
        text = apply(text)
    return text


class RedactingProcessor:
    """structlog processor: `redact` the string values under the given event keys, nested ones included.

    Put it before the renderer. Containers are copied, never changed in place: the logged object
    (a request's message list, say) is still in use by the caller. Values that are neither text,
    containers nor plain scalars (a protobuf message, a dataclass) are logged as their redacted
    `str()`, since the renderer would otherwise print them unredacted.
    """

    def __init__(self, keys: Iterable[str] = DEFAULT_REDACTED_KEYS) -> None:
        # A lone string would otherwise become a set of its characters.
        self.keys: frozenset[str] = frozenset((keys,) if isinstance(keys, str) else keys)

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in self.keys.intersection(event_dict):
            event_dict[key] = _redact_value(event_dict[key], 0)
        return event_dict


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        # Text that reached the log as bytes is still text: decode it rather than let it through unredacted.
        return redact(bytes(value).decode("utf-8", "replace"))
    if not isinstance(value, Mapping | list | tuple | set | frozenset):
        return redact(str(value))
    if depth >= _MAX_DEPTH:
        return SECRET
    if isinstance(value, Mapping):
        return {name: _redact_value(item, depth + 1) for name, item in value.items()}
    items = [_redact_value(item, depth + 1) for item in value]
    # A plain tuple stays a tuple; sets become lists (two values may redact to the same placeholder).
    return tuple(items) if type(value) is tuple else items
