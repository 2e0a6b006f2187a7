"""Tests of the opt-in text redaction: each category, near misses, the structlog processor, linear time."""

from __future__ import annotations

import random
from typing import Any

import pytest
import structlog
from switchboard.common.redaction import (
    CARD,
    DEFAULT_REDACTED_KEYS,
    EMAIL,
    PHONE,
    SECRET,
    RedactingProcessor,
    luhn_valid,
    redact,
)


@pytest.mark.parametrize(
    "address",
    ["john.doe@example.com", "a+tag@mail.example.co.uk", "first_last-1@sub.domain.io", "X%Y@EXAMPLE.ORG"],
)
def test_email_addresses(address: str) -> None:
    assert redact(f"write to {address}, please") == f"write to {EMAIL}, please"
    assert redact(f"<{address}>") == f"<{EMAIL}>"


@pytest.mark.parametrize(
    "number",
    [
        "+1 (555) 123-4567",
        "+1-555-123-4567",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+33 1 23 45 67 89",
        "+4915123456789",
        "555-123-4567",
        "555.123.4567",
        "(555) 123-4567",
        "1-800-555-1234",
        "030 1234567",
        "030/1234567",
        "06-12345678",
        "020 7946 0958",
        "01 23 45 67 89",
        "0044 20 7946 0958",
    ],
)
def test_phone_numbers(number: str) -> None:
    assert redact(f"call {number} today") == f"call {PHONE} today"


def test_phone_lists_and_trailing_numbers() -> None:
    assert redact("030 1234567 030 7654321") == f"{PHONE} {PHONE}"
    assert redact("+1 555 123 4567 2024 2025") == f"{PHONE} 2024 2025"


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555 5555 5555 4444",
        "2223 0031 2200 3222",
        "3782 822463 10005",
        "378282246310005",
        "6011111111111117",
        "4222222222222",  # 13-digit Visa
    ],
)
def test_card_numbers(number: str) -> None:
    assert luhn_valid(number.replace(" ", "").replace("-", ""))
    assert redact(f"card {number}.") == f"card {CARD}."


def test_card_next_to_other_digit_groups() -> None:
    # A CVC right after the number, and a group before it: the Luhn-valid run is still found.
    assert redact("4111 1111 1111 1111 123") == f"{CARD} 123"
    assert redact("ref 4567 4111 1111 1111 1111") == f"ref 4567 {CARD}"


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("sb-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcd", SECRET),
        ("sk-abcdefghijklmnopqrstuvwxyz012345", SECRET),
        ("sk-proj-Abc123Def456Ghi789Jkl012", SECRET),
        ("Bearer abc.def-123_XYZ", f"Bearer {SECRET}"),
        ("Bearer abcdef123.", f"Bearer {SECRET}."),
        ("authorization: bearer c2VjcmV0LXRva2VuLXZhbHVl==", f"authorization: bearer {SECRET}"),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
            ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
            SECRET,
        ),
        ("eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJ4In0.", SECRET),  # alg none: empty signature
        ("AKIAIOSFODNN7EXAMPLE", SECRET),
        ("api_key=0123456789abcdef0123456789abcdef", f"api_key={SECRET}"),
        ("token: ZXhhbXBsZS1zZWNyZXQtdG9rZW4=", f"token: {SECRET}"),
        ('{"client_secret": "s3cr3tV4lu3s3cr3tV4lu3"}', f'{{"client_secret": "{SECRET}"}}'),
        ("x-api-key: 9f86d081884c7d659a2feaa0c55ad015", f"x-api-key: {SECRET}"),
        ("https://db.example/?user=me&password=hunter2&x=1", f"https://db.example/?user=me&password={SECRET}&x=1"),
    ],
)
def test_secrets(secret: str, expected: str) -> None:
    assert redact(f"here: {secret} end") == f"here: {expected} end"


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 fails the Luhn check.",  # Luhn-invalid 16 digits, grouped
        "Random digits 4111111111111112 and 1234567812345678.",  # Luhn-invalid runs
        "In 2024 the price was $1,299.99 (EUR 1.199,00).",
        "The reply used 512 prompt tokens and 1024 completion tokens; batch 512 1024 2048 4096.",
        "Order #12345678 shipped, invoice 87654321, id 123456789012, ts 1700000000000.",
        "Released 2024-01-15 at 10:30, see 15.01.2024, version 1.2.3, host 192.168.100.200.",
        "The quick brown fox jumps over the lazy dog.",
        "The bearer of bad news has bearer responsibilities.",
        "Set max_tokens=512 and temperature=0.7; the token: is short; monkey=abcdefghijklmnopqrstuvwxyz.",
        "Use the sk- prefix and sb-short; user@localhost is not a full address.",
        "Call 555-1234 (7 digits) or extension 12345.",
    ],
)
def test_near_misses_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_everything_at_once_and_idempotence() -> None:
    text = (
        "Hi, I'm jane@example.com, +1 (555) 123-4567, card 4111-1111-1111-1111 exp 12/27. "
        "Key sb-AbCdEfGhIjKlMnOpQrStUvWx0123 and Authorization: Bearer eyJa1.eyJb2.c3; "
        "AWS AKIAIOSFODNN7EXAMPLE; secret=0123456789abcdef0123. In 2024 I paid $12.50 for 512 tokens."
    )
    once = redact(text)
    assert once == (
        f"Hi, I'm {EMAIL}, {PHONE}, card {CARD} exp 12/27. "
        f"Key {SECRET} and Authorization: Bearer {SECRET}; "
        f"AWS {SECRET}; secret={SECRET}. In 2024 I paid $12.50 for 512 tokens."
    )
    assert redact(once) == once


def test_idempotence_on_random_mixtures() -> None:
    pieces = [
        "4111 1111 1111 1111", "4111111111111112", "3782 822463 10005", "+44 (0)20 7946 0958", "555-123-4567",
        "(555) 123-4567", "030 1234567", "a@b.com", "x.y+1@ex.co.uk", "sb-abcdefghijklmnopqrstu",
        "Bearer abc123def456", "eyJa.eyJb.c", "AKIAIOSFODNN7EXAMPLE", "token=abcdefghijklmnopqrst",
        "password=pw1", "2024", "12345678", "-", ".", " ", "+", "(", ")", "[", "]", "@", "1", "0", "x", "=", ":",
    ]  # fmt: skip
    rng = random.Random(20240611)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        once = redact(text)
        assert redact(once) == once, text


@pytest.mark.parametrize(
    "adversarial",
    [
        "1" * 100_000,
        "1 " * 50_000 + "x",
        "1-" * 50_000 + "x",
        "+1 (2)" * 16_000 + "x",
        "+" + "(1)" * 33_000 + "x",
        "a@" * 50_000,
        "x@" + "a." * 50_000 + "1",
        "a" * 100_000 + "@",
        "eyJa." * 20_000,
        "bearer" + " " * 100_000 + "x",
        "key" + " " * 100_000 + "=",
        "4111 1111 1111 1112 " * 5_000,
        "030 1234567 " * 8_000,
        "".join(random.Random(1).choice("0123456789 -.()+@a:=[]") for _ in range(100_000)),
    ],
)
def test_linear_time_on_adversarial_input(adversarial: str) -> None:
    # No timing assert: a catastrophic pattern would run for hours and trip pytest-timeout.
    assert isinstance(redact(adversarial), str)


def _run_processor(processor: RedactingProcessor, **event: Any) -> dict[str, Any]:
    return dict(processor(None, "info", dict(event)))


def test_processor_redacts_the_configured_keys_only() -> None:
    assert DEFAULT_REDACTED_KEYS == {"prompt", "text", "output", "completion", "messages"}
    processor = RedactingProcessor()
    event = _run_processor(
        processor,
        event="generate",
        prompt="mail me at a@b.com",
        output="card 4111111111111111",
        tenant="a@b.com",  # not a text key: left as is (tenants are ids, not user text)
        prompt_tokens=12,
    )
    assert event == {
        "event": "generate",
        "prompt": f"mail me at {EMAIL}",
        "output": f"card {CARD}",
        "tenant": "a@b.com",
        "prompt_tokens": 12,
    }
    custom = RedactingProcessor(keys="body")  # a single key name, not its characters
    assert custom.keys == {"body"}
    assert _run_processor(custom, body="a@b.com", prompt="a@b.com") == {"body": EMAIL, "prompt": "a@b.com"}


def test_processor_handles_nested_values_without_mutating_them() -> None:
    messages = [
        {"role": "user", "content": "I am +44 20 7946 0958", "parts": [{"text": "sk-abcdefghijklmnop12345"}]},
        {"role": "assistant", "content": ("ok", b"x@example.org"), "tokens": 7, "flags": {"done": True}},
    ]
    event = _run_processor(RedactingProcessor(), messages=messages)
    assert event["messages"] == [
        {"role": "user", "content": f"I am {PHONE}", "parts": [{"text": SECRET}]},
        {"role": "assistant", "content": ("ok", EMAIL), "tokens": 7, "flags": {"done": True}},
    ]
    # The caller's objects are untouched: they are still the request being served.
    assert messages[0]["content"] == "I am +44 20 7946 0958"
    assert messages[1]["content"] == ("ok", b"x@example.org")


def test_processor_survives_cycles_and_unknown_objects() -> None:
    cyclic: list[Any] = ["a@b.com"]
    cyclic.append(cyclic)

    class Message:
        def __str__(self) -> str:
            return "from a@b.com"

    event = _run_processor(RedactingProcessor(), text=cyclic, output=Message())
    assert event["text"][0] == EMAIL
    assert event["output"] == f"from {EMAIL}"


def test_processor_in_a_structlog_chain() -> None:
    captured: list[dict[str, Any]] = []

    def capture(_: Any, __: str, event: dict[str, Any]) -> str:
        captured.append(dict(event))
        return "rendered"

    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[RedactingProcessor(), capture], context_class=dict
    )
    logger.info("debug_text", prompt="my card is 5555 5555 5555 4444", completion="noted", request_id="r1")
    assert captured == [
        {"event": "debug_text", "prompt": f"my card is {CARD}", "completion": "noted", "request_id": "r1"}
    ]
