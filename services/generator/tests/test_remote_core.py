"""The remote backend's pure core: SSE framing, completion chunks, finish reasons, Prometheus load."""

from __future__ import annotations

import json

import pytest
from switchboard.generator.engine.types import EngineLoad, Usage
from switchboard.generator.remote.core import (
    DONE,
    EXTRA_SAMPLING,
    OPENAI,
    VLLM,
    EngineStreamError,
    RemoteProtocolError,
    SseDecoder,
    UnsupportedSampling,
    completion_body,
    flavour_from_metrics,
    load_from_metrics,
    map_finish_reason,
    max_model_len_from_models,
    parse_completion_chunk,
    parse_prometheus,
    sampling_extras,
)
from switchboard.generator.sampling import SamplingParams


def chunk(text: str = "", finish: str | None = None, **extra: object) -> str:
    choice: dict[str, object] = {"index": 0, "text": text, "finish_reason": finish}
    choice.update({k: v for k, v in extra.items() if k in ("token_ids", "stop_reason")})
    document: dict[str, object] = {"id": "c", "object": "text_completion", "choices": [choice]}
    if "usage" in extra:
        document["usage"] = extra["usage"]
    return json.dumps(document)


def test_sse_events_split_anywhere_give_the_same_data() -> None:
    stream = f"data: {chunk('To')}\n\n: keep-alive\n\ndata: {chunk(' be')}\r\n\r\nevent: x\ndata: {DONE}\n\n"
    whole = SseDecoder().feed(stream)
    assert whole == [chunk("To"), chunk(" be"), DONE]
    for size in (1, 2, 3, 7, 50):
        decoder = SseDecoder()
        events: list[str] = []
        for start in range(0, len(stream), size):
            events += decoder.feed(stream[start : start + size])
        assert events + decoder.close() == whole, size


def test_sse_multiline_data_and_an_unterminated_last_event() -> None:
    decoder = SseDecoder()
    assert decoder.feed("data:a\ndata: b\n\ndata: last") == ["a\nb"]
    assert decoder.close() == ["last"]
    assert SseDecoder().close() == []


def test_completion_chunks_map_text_ids_finish_and_usage() -> None:
    assert parse_completion_chunk(chunk("Hi")).text == "Hi"
    with_ids = parse_completion_chunk(chunk(" there", token_ids=[5, 6]))
    assert with_ids.token_ids == [5, 6] and with_ids.finish_reason is None
    last = parse_completion_chunk(
        chunk("", "length", usage={"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13})
    )
    assert last.finish_reason == "length"
    assert last.usage == Usage(prompt_tokens=5, completion_tokens=8, cached_prompt_tokens=0)
    # vLLM's separate usage chunk (no choices), with cached prompt tokens.
    usage_only = parse_completion_chunk(
        json.dumps(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": 2,
                    "prompt_tokens_details": {"cached_tokens": 4},
                },
            }
        )
    )
    assert usage_only.usage == Usage(9, 2, 4) and usage_only.text == ""


def test_finish_reasons() -> None:
    assert map_finish_reason(None) is None
    assert map_finish_reason("") is None
    assert map_finish_reason("length") == "length"
    assert map_finish_reason("stop") == "eos"
    assert map_finish_reason("stop", stop_reason="\n\n") == "stop_sequence"
    assert map_finish_reason("stop", stop_reason=2) == "eos"  # vLLM: a stop token id
    assert map_finish_reason("abort") == "cancelled"
    assert map_finish_reason("content_filter") == "error"


def test_error_events_and_garbage() -> None:
    with pytest.raises(EngineStreamError, match="boom"):
        parse_completion_chunk('{"error": "boom"}')
    with pytest.raises(EngineStreamError, match="out of memory"):
        parse_completion_chunk('{"error": {"message": "out of memory", "code": 500}}')
    with pytest.raises(RemoteProtocolError):
        parse_completion_chunk("not json")
    with pytest.raises(RemoteProtocolError):
        parse_completion_chunk("[1, 2]")


def test_completion_body_maps_sampling() -> None:
    body = completion_body(
        "m", "To be", max_tokens=8, temperature=0.0, top_p=0.9, seed=7, stop=("\n",), return_token_ids=False
    )
    assert body == {
        "model": "m",
        "prompt": "To be",
        "max_tokens": 8,
        "temperature": 0.0,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
        "stop": ["\n"],
    }
    ids = completion_body(
        "m", [1, 2], max_tokens=1, temperature=1.0, top_p=1.0, seed=None, stop=(), return_token_ids=True
    )
    assert ids["prompt"] == [1, 2] and ids["return_token_ids"] is True
    assert "seed" not in ids and "stop" not in ids


def test_extra_sampling_fields_go_to_vllm_only_when_set() -> None:
    plain = SamplingParams(max_tokens=8)
    assert sampling_extras(plain, VLLM) == {} and sampling_extras(plain, OPENAI) == {}
    every = SamplingParams(max_tokens=8, top_k=40, repetition_penalty=1.2, min_tokens=2, ignore_eos=True)
    extras = sampling_extras(every, VLLM)
    assert extras == {"top_k": 40, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True}
    assert set(extras) == set(EXTRA_SAMPLING)
    body = completion_body(
        "m",
        "x",
        max_tokens=8,
        temperature=1.0,
        top_p=1.0,
        seed=None,
        stop=(),
        return_token_ids=False,
        extras=extras,
    )
    assert {k: body[k] for k in extras} == extras and body["stream"] is True


@pytest.mark.parametrize(
    ("field", "value"), [("top_k", 40), ("repetition_penalty", 1.3), ("min_tokens", 1), ("ignore_eos", True)]
)
def test_a_plain_engine_refuses_each_extra_field_rather_than_dropping_it(field: str, value: object) -> None:
    sampling = SamplingParams(max_tokens=8, **{field: value})
    with pytest.raises(UnsupportedSampling, match=f"cannot honour {field}={value!r}") as caught:
        sampling_extras(sampling, OPENAI)
    assert caught.value.field == field and caught.value.flavour == OPENAI
    assert f"leave it at {EXTRA_SAMPLING[field]!r}" in str(caught.value)


def test_flavour_from_metrics() -> None:
    assert flavour_from_metrics(parse_prometheus(VLLM_METRICS)) == VLLM
    assert flavour_from_metrics(parse_prometheus("process_cpu_seconds_total 3\n")) == OPENAI
    assert flavour_from_metrics({}) == OPENAI


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="a \\"quoted\\" } name"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prompt_tokens_total{model_name="m"} NaN
garbage line
"""


def test_prometheus_text_sums_label_sets() -> None:
    samples = parse_prometheus(VLLM_METRICS)
    assert samples["vllm:num_requests_running"] == 5.0
    assert samples["vllm:num_requests_waiting"] == 4.0
    assert "vllm:prompt_tokens_total" not in samples


def test_load_from_vllm_gauges_or_none() -> None:
    assert load_from_metrics(parse_prometheus(VLLM_METRICS)) == EngineLoad(5, 4, 250, 1000, 0.0)
    old = parse_prometheus("vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 1.5\n")
    assert load_from_metrics(old) == EngineLoad(1, 0, 1000, 1000, 0.0)
    no_kv = load_from_metrics(parse_prometheus("vllm:num_requests_waiting 2\n"))
    assert no_kv == EngineLoad(0, 2, 0, 0, 0.0)
    assert load_from_metrics(parse_prometheus("process_cpu_seconds_total 3\n")) is None


def test_max_model_len_from_models() -> None:
    document = {"data": [{"id": "other", "max_model_len": 1}, {"id": "m", "max_model_len": 4096}]}
    assert max_model_len_from_models(document, "m") == 4096
    assert max_model_len_from_models({"data": [{"id": "m"}]}, "m") is None
    assert max_model_len_from_models(None, "m") is None
