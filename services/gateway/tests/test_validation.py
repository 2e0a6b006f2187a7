"""Tests of request validation: each bad field is named."""

from __future__ import annotations

import pytest
from switchboard.gateway.validation import FieldError, Limits, validate_request
from switchboard.v1 import common_pb2

LIMITS = Limits(max_prompt_chars=100, default_max_tokens=32, max_tokens_limit=512)


def check(prompt: str = "hi", model: str = "", request_id: str = "", **sampling: object) -> common_pb2.SamplingParams:
    return validate_request(prompt, common_pb2.SamplingParams(**sampling), model, request_id, LIMITS)


def test_defaults_are_applied() -> None:
    params = check()
    assert params.max_tokens == 32
    assert not params.HasField("temperature")
    assert check(max_tokens=7, temperature=0.0).max_tokens == 7


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 101}, "prompt"),
        ({"request_id": "r" * 129}, "request_id"),
        ({"model": "m" * 129}, "model"),
        ({"max_tokens": -3}, "sampling.max_tokens"),
        ({"max_tokens": 513}, "sampling.max_tokens"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": 2.5}, "sampling.temperature"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"repetition_penalty": 0.5}, "sampling.repetition_penalty"),
        ({"stop": ["a"] * 9}, "sampling.stop"),
        ({"stop": ["ok", "s" * 65]}, "sampling.stop[1]"),
        ({"stop": [""]}, "sampling.stop[0]"),
        ({"min_tokens": 10, "max_tokens": 5}, "sampling.min_tokens"),
        ({"min_tokens": 40}, "sampling.min_tokens"),  # over the defaulted max_tokens
        ({"min_tokens": -1}, "sampling.min_tokens"),
    ],
)
def test_bad_fields_are_named(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(FieldError) as error:
        check(**kwargs)
    assert error.value.field == field
    assert field in str(error.value)


def test_boundaries_are_accepted() -> None:
    params = check(prompt="x" * 100, max_tokens=512, temperature=2.0, top_p=1.0, top_k=0, stop=["s" * 64] * 8)
    assert params.max_tokens == 512
    check(temperature=0.0, repetition_penalty=1.0, min_tokens=32)


@pytest.mark.parametrize("value", [-0.01, 100.5, float("nan"), float("inf")])
def test_cost_weight_out_of_range_is_named(value: float) -> None:
    with pytest.raises(FieldError) as error:
        validate_request("x", common_pb2.SamplingParams(), "", "", LIMITS, cost_weight=value)
    assert error.value.field == "cost_weight"


def test_cost_weight_bounds_and_unset_are_accepted() -> None:
    for value in (None, 0.0, 100.0, 0.07):
        validate_request("x", common_pb2.SamplingParams(), "", "", LIMITS, cost_weight=value)
