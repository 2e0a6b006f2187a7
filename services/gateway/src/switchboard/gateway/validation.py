"""Request validation: every bad field becomes an error that names the field.

The servicer turns a `FieldError` into INVALID_ARGUMENT with a
`google.rpc.BadRequest` field violation. Field names use the request's proto
paths (`prompt`, `sampling.max_tokens`, ...), so a client can point at the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from switchboard.v1 import common_pb2, gateway_pb2

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_COST_WEIGHT = 100.0  # the router's bound on lambda
MAX_MODEL_CHARS = 128


class FieldError(Exception):
    """One request field is invalid; `field` is its proto path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    """The gateway's request limits (from its settings)."""

    max_prompt_chars: int
    default_max_tokens: int
    max_tokens_limit: int


def maximal_request_bytes(max_prompt_chars: int) -> int:
    """Encoded size of the largest request that passes `validate_request` (every string of 4-byte characters).

    The gateway's max receive message size must be at least this, so no valid request is refused
    by the transport; a little above it, so an oversized one is refused before any work.
    """
    wide = "\U0001F600"  # 4 bytes in UTF-8, the most a character takes
    biggest = gateway_pb2.CompleteRequest(
        prompt=wide * max_prompt_chars,
        sampling=common_pb2.SamplingParams(
            max_tokens=2**31 - 1,
            temperature=2.0,
            top_p=1.0,
            top_k=2**31 - 1,
            repetition_penalty=2.0,
            stop=[wide * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES,
            seed=2**64 - 1,
            min_tokens=2**31 - 1,
            ignore_eos=True,
        ),
        model=wide * MAX_MODEL_CHARS,
        request_id=wide * MAX_REQUEST_ID_CHARS,
        cost_weight=MAX_COST_WEIGHT,
    )
    return biggest.ByteSize()


def _check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if math.isnan(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise FieldError(field, f"must be in {bracket}{low:g}, {high:g}], got {value:g}")


def validate_sampling(sampling: common_pb2.SamplingParams, limits: Limits) -> common_pb2.SamplingParams:
    """Check sampling parameters; return a copy with max_tokens defaulted."""
    if sampling.max_tokens < 0:
        raise FieldError("sampling.max_tokens", f"must be at least 1 (or 0 for the default), got {sampling.max_tokens}")
    if sampling.max_tokens > limits.max_tokens_limit:
        raise FieldError(
            "sampling.max_tokens", f"must be at most {limits.max_tokens_limit}, got {sampling.max_tokens}"
        )
    if sampling.HasField("temperature"):
        _check_range("sampling.temperature", sampling.temperature, 0.0, 2.0)
    if sampling.HasField("top_p"):
        _check_range("sampling.top_p", sampling.top_p, 0.0, 1.0, low_open=True)
    if sampling.top_k < 0:
        raise FieldError("sampling.top_k", f"must not be negative (0 disables), got {sampling.top_k}")
    if sampling.HasField("repetition_penalty"):
        _check_range("sampling.repetition_penalty", sampling.repetition_penalty, 1.0, 2.0)
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise FieldError("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop strings, got {len(sampling.stop)}")
    for index, stop in enumerate(sampling.stop):
        if not stop:
            raise FieldError(f"sampling.stop[{index}]", "must not be empty")
        if len(stop) > MAX_STOP_CHARS:
            raise FieldError(f"sampling.stop[{index}]", f"at most {MAX_STOP_CHARS} characters, got {len(stop)}")
    normalized = common_pb2.SamplingParams()
    normalized.CopyFrom(sampling)
    if normalized.max_tokens == 0:
        normalized.max_tokens = limits.default_max_tokens
    if sampling.min_tokens < 0:
        raise FieldError("sampling.min_tokens", f"must not be negative, got {sampling.min_tokens}")
    if sampling.min_tokens > normalized.max_tokens:
        raise FieldError(
            "sampling.min_tokens", f"must be <= max_tokens ({normalized.max_tokens}), got {sampling.min_tokens}"
        )
    return normalized


def validate_request(
    prompt: str,
    sampling: common_pb2.SamplingParams,
    model: str,
    request_id: str,
    limits: Limits,
    cost_weight: float | None = None,
) -> common_pb2.SamplingParams:
    """Validate a Generate/Complete request; return the normalized sampling parameters."""
    if not prompt:
        raise FieldError("prompt", "must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise FieldError("prompt", f"at most {limits.max_prompt_chars} characters, got {len(prompt)}")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise FieldError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if len(model) > MAX_MODEL_CHARS:
        raise FieldError("model", f"at most {MAX_MODEL_CHARS} characters, got {len(model)}")
    if cost_weight is not None and not (0.0 <= cost_weight <= MAX_COST_WEIGHT):  # also refuses NaN
        raise FieldError("cost_weight", f"must be in [0, {MAX_COST_WEIGHT:g}], got {cost_weight}")
    return validate_sampling(sampling, limits)
