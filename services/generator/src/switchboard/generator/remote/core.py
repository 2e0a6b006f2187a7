"""Pure core of the remote backend: no sockets, no HTTP client, no gRPC.

- `SseDecoder`: Server-Sent Events framing (`data:` lines, events ended by a blank line, chunks
  split anywhere, `\\r\\n` or `\\n`), yielding each event's data; `[DONE]` ends the stream.
- `completion_body`: the JSON body of a streaming `POST /v1/completions` from a request's prompt and
  sampling parameters; `sampling_extras` the sampling fields beyond OpenAI's that the engine's
  flavour honours (vLLM's `top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`), refusing one it
  does not (`UnsupportedSampling`); `flavour_from_metrics` tells a vLLM engine by its metrics.
- `parse_completion_chunk`: one streamed completion chunk -> `CompletionChunk` (text, token ids
  when the engine returns them, the finish reason mapped to the generator's names, usage).
- `parse_prometheus` and `load_from_metrics`: the engine's `/metrics` text -> `EngineLoad` (vLLM's
  running and waiting requests and KV-cache usage) or None when it exports none of them.
- `max_model_len_from_models`: the context length a `/v1/models` answer states, if any.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from switchboard.generator.engine.types import EngineLoad, Usage

DONE = "[DONE]"

# OpenAI finish reasons -> the generator's (servicer.FINISH_REASONS). "stop" is an EOS token or a
# stop string; OpenAI does not tell them apart, so a request with stop strings maps to
# stop_sequence only when the engine says which string matched (vLLM's `stop_reason`).
FINISH_REASONS = {
    "length": "length",
    "stop": "eos",
    "eos": "eos",
    "stop_sequence": "stop_sequence",
    "abort": "cancelled",
    "cancelled": "cancelled",
}

# vLLM's gauges (v0 and v1 names of the KV-cache fraction).
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
# The scheduler reads KV use as blocks used / total; a fraction is reported on this scale.
KV_SCALE = 1000


# Engine flavours (GENERATOR_REMOTE_ENGINE): which sampling fields beyond OpenAI's the engine's
# /v1/completions honours. "openai" is the common subset (transformers serve, TGI, and any engine
# not known here): extra fields are rejected or silently ignored there, so none is sent.
VLLM = "vllm"
OPENAI = "openai"
AUTO = "auto"
FLAVOURS = (AUTO, VLLM, OPENAI)
# Sampling fields beyond OpenAI's: SamplingParams field -> its "unset" value (nothing to send).
# The body key is the field's name (vLLM's names for them).
EXTRA_SAMPLING: dict[str, object] = {
    "top_k": 0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "ignore_eos": False,
}
HONOURED: dict[str, frozenset[str]] = {
    VLLM: frozenset(EXTRA_SAMPLING),
    OPENAI: frozenset(),
}


class UnsupportedSampling(ValueError):
    """A request sets a sampling field the engine's flavour cannot honour (`field`, e.g. "top_k")."""

    def __init__(self, field: str, value: object, flavour: str) -> None:
        unset = EXTRA_SAMPLING[field]
        super().__init__(
            f"the remote engine behind this replica ({flavour}: OpenAI's completion fields only) cannot "
            f"honour {field}={value!r}; leave it at {unset!r} or send the request to an expert whose engine "
            "can (vLLM: GENERATOR_REMOTE_ENGINE=vllm)"
        )
        self.field = field
        self.value = value
        self.flavour = flavour


def sampling_extras(sampling: object, flavour: str) -> dict[str, object]:
    """The extra sampling fields to send for `sampling` (a SamplingParams) to an engine of `flavour`:
    each one set to other than its unset value, when the flavour honours it. Raises
    UnsupportedSampling for the first one it does not (never drops a parameter silently)."""
    honoured = HONOURED[flavour]
    extras: dict[str, object] = {}
    for field, unset in EXTRA_SAMPLING.items():
        value = getattr(sampling, field)
        if value == unset:
            continue
        if field not in honoured:
            raise UnsupportedSampling(field, value, flavour)
        extras[field] = value
    return extras


def flavour_from_metrics(samples: Mapping[str, float]) -> str:
    """The flavour an engine's /metrics samples show: vLLM's exports `vllm:` metrics."""
    return VLLM if any(name.startswith("vllm:") for name in samples) else OPENAI


class RemoteProtocolError(ValueError):
    """The engine sent something that is not an OpenAI-compatible completion stream."""


class EngineStreamError(RuntimeError):
    """The engine reported an error inside the stream (an `{"error": ...}` event)."""


class SseDecoder:
    """Incremental SSE decoder: `feed(text)` returns the data of every event completed so far.

    Comment lines (`:`), `event:`/`id:`/`retry:` fields and a missing space after `data:` are
    handled as the SSE specification says; multi-line data is joined with newlines.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        """Events completed by `text` (their data fields), in order."""
        self._buffer += text
        events: list[str] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            line, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1] :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> list[str]:
        """The event left without its blank line when the stream ended (some servers omit it)."""
        events = self.feed("\n\n") if self._buffer or self._data else []
        return events


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in `buffer`, or None without a full line.
    A `\\r` at the very end waits for the next chunk (it may be half of `\\r\\n`)."""
    for index, char in enumerate(buffer):
        if char == "\n":
            return index, index + 1
        if char == "\r":
            if index + 1 == len(buffer):
                return None
            return index, index + (2 if buffer[index + 1] == "\n" else 1)
    return None


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed completion chunk, in the generator's terms."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


def completion_body(
    model: str,
    prompt: str | Sequence[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    return_token_ids: bool,
    extras: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """The body of a streaming `/v1/completions` request (OpenAI fields only, unless
    `return_token_ids` asks for vLLM's extension that streams the sampled ids, or `extras`, from
    `sampling_extras`, adds the sampling fields the engine honours beyond OpenAI's)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if return_token_ids:
        body["return_token_ids"] = True
    body.update(extras or {})
    return body


def map_finish_reason(reason: str | None, stop_reason: object = None) -> str | None:
    """The generator's finish reason for an OpenAI one (None: not finished). A "stop" with a
    string `stop_reason` (vLLM: the stop string that matched) is stop_sequence; anything unknown
    is "error"."""
    if reason is None or reason == "":
        return None
    if reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence"
    return FINISH_REASONS.get(reason, "error")


def parse_completion_chunk(data: str) -> CompletionChunk:
    """One SSE data payload of a completion stream (not `[DONE]`) -> CompletionChunk.

    Raises EngineStreamError for an error event and RemoteProtocolError for anything that is not
    a completion chunk."""
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise RemoteProtocolError(f"stream event is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RemoteProtocolError("stream event is not a JSON object")
    if "error" in document:
        error = document["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise EngineStreamError(f"engine error: {message}")
    text = ""
    token_ids: list[int] = []
    finish_reason = None
    choices = document.get("choices") or []
    if not isinstance(choices, list):
        raise RemoteProtocolError("choices is not a list")
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        text += choice.get("text") or ""
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            token_ids.extend(int(t) for t in ids)
        finish_reason = (
            map_finish_reason(choice.get("finish_reason"), choice.get("stop_reason")) or finish_reason
        )
    usage = None
    raw = document.get("usage")
    if isinstance(raw, dict):
        details = raw.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        usage = Usage(
            prompt_tokens=int(raw.get("prompt_tokens") or 0),
            completion_tokens=int(raw.get("completion_tokens") or 0),
            cached_prompt_tokens=int(cached or 0),
        )
    return CompletionChunk(text, token_ids, finish_reason, usage)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value summed over its label sets}.

    Comments and malformed lines are skipped; NaN samples are left out."""
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            closing = _label_end(rest)
            if closing is None:
                continue
            fields = rest[closing + 1 :].split()
        else:
            name, *fields = line.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


def _label_end(rest: str) -> int | None:
    """Index of the `}` closing a label set (quotes and escapes inside values respected)."""
    quoted = escaped = False
    for index, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return index
    return None


def load_from_metrics(samples: Mapping[str, float]) -> EngineLoad | None:
    """The load vLLM's gauges state (None when the engine exports none of them).

    KV-cache usage (a fraction) becomes `kv_blocks_used / kv_blocks_total` on a scale of
    KV_SCALE; without it both are 0 (unknown)."""
    if RUNNING not in samples and WAITING not in samples:
        return None
    kv = next((samples[name] for name in KV_USAGE if name in samples), None)
    used = round(min(max(kv, 0.0), 1.0) * KV_SCALE) if kv is not None else 0
    return EngineLoad(
        running=max(int(samples.get(RUNNING, 0)), 0),
        waiting=max(int(samples.get(WAITING, 0)), 0),
        kv_blocks_used=used,
        kv_blocks_total=KV_SCALE if kv is not None else 0,
        tokens_per_second=0.0,
    )


def in_flight_load(in_flight: int) -> EngineLoad:
    """The load of an engine without metrics: the requests this replica has in flight there."""
    return EngineLoad(
        running=in_flight, waiting=0, kv_blocks_used=0, kv_blocks_total=0, tokens_per_second=0.0
    )


def max_model_len_from_models(document: object, model: str) -> int | None:
    """The context length `/v1/models` states for `model` (vLLM's `max_model_len`; also
    `context_length` / `max_context_length`), or None."""
    data: Iterable[object] = document.get("data", []) if isinstance(document, dict) else []
    for entry in data:
        if not isinstance(entry, dict) or (model and entry.get("id") != model):
            continue
        for key in ("max_model_len", "context_length", "max_context_length"):
            value = entry.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def served_model_ids(document: object) -> list[str]:
    """The model ids a `/v1/models` answer lists."""
    data = document.get("data", []) if isinstance(document, dict) else []
    return [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]
