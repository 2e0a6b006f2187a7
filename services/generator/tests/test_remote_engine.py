"""RemoteEngine over a mock HTTP transport: outputs, usage, load from /metrics, and error mapping."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from switchboard.generator.engine.types import EngineLoad, EngineRequest, QueueFull, RequestRejected, Usage
from switchboard.generator.remote import EngineUnavailable, RemoteClient, RemoteConfig, RemoteEngine
from switchboard.generator.sampling import SamplingParams


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def choice(text: str, finish: str | None = None, **extra: object) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, **extra}]}


VLLM_STREAM = sse(
    choice("To", token_ids=[11]),
    choice(" be", token_ids=[12]),
    choice("", "stop", stop_reason="\n", token_ids=[]),
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    "[DONE]",
)


def engine(
    handler: Callable[[httpx.Request], httpx.Response], token_ids: bool = False, flavour: str = "auto"
) -> tuple[RemoteEngine, list[dict]]:
    bodies: list[dict] = []

    def record(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            bodies.append(json.loads(request.content))
        return handler(request)

    client = RemoteClient("http://engine", transport=httpx.MockTransport(record))
    config = RemoteConfig(
        url="http://engine",
        model="m",
        token_ids=token_ids,
        engine=flavour,
        max_waiting=4,
        start_wait_seconds=0.0,
    )
    return RemoteEngine(config, client), bodies


def vllm(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/metrics":
        return httpx.Response(
            200,
            text="vllm:num_requests_running 2\nvllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.5\n",
        )
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 2048}]})
    return httpx.Response(200, content=VLLM_STREAM, headers={"content-type": "text/event-stream"})


def request(**fields: object) -> EngineRequest:
    return EngineRequest("r1", sampling=SamplingParams(max_tokens=4, temperature=0.0, stop=("\n",)), **fields)


async def collect(remote: RemoteEngine, req: EngineRequest) -> list:
    return [output async for output in remote.generate(req)]


async def test_streams_ids_usage_and_load_from_vllm_metrics() -> None:
    remote, bodies = engine(vllm, token_ids=True)
    await remote.start()
    try:
        assert remote.max_model_len == 2048 and remote.healthy
        assert remote.load() == EngineLoad(2, 1, 500, 1000, 0.0)
        outputs = await collect(remote, request(prompt="To be", prompt_token_ids=[1, 2, 3]))
    finally:
        await remote.stop()
    assert [o.text for o in outputs] == ["To", " be", ""]
    assert [o.token_ids for o in outputs] == [[11], [12], []]
    assert outputs[0].first_scheduled_ns is not None
    assert outputs[-1].finish_reason == "stop_sequence"
    assert outputs[-1].usage == Usage(3, 2, 0)
    body = bodies[0]
    assert body["prompt"] == [1, 2, 3] and body["return_token_ids"] is True and body["stop"] == ["\n"]


async def test_text_engine_without_metrics_reports_in_flight() -> None:
    def text_only(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/health", "/v1/models"):
            return httpx.Response(200, json={"data": []})
        if request.url.path == "/metrics":
            return httpx.Response(404)
        return httpx.Response(
            200,
            content=sse(
                choice("Hi"),
                choice(
                    "",
                    "length",
                ),
            ),
        )

    remote, bodies = engine(text_only)
    await remote.start()
    try:
        assert remote.load() == EngineLoad(0, 0, 0, 0, 0.0)
        stream = remote.generate(request(prompt="To be", prompt_token_ids=[1, 2]))
        first = await anext(stream)
        assert first.text == "Hi" and remote.load().running == 1
        rest = [o async for o in stream]
        assert remote.load().running == 0
    finally:
        await remote.stop()
    assert bodies[0]["prompt"] == "To be" and "return_token_ids" not in bodies[0]
    # No usage from the engine: the count of streamed ids (none) stands.
    assert rest[-1].finish_reason == "length" and rest[-1].usage == Usage(0, 0, 0)


@pytest.mark.parametrize(
    ("status", "error"), [(429, QueueFull), (422, RequestRejected), (503, EngineUnavailable)]
)
async def test_refusals_map_to_errors(status: int, error: type[Exception]) -> None:
    def refusing(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path != "/v1/completions":
            return httpx.Response(404)
        return httpx.Response(status, json={"detail": "no"})

    remote, _ = engine(refusing)
    await remote.start()
    try:
        with pytest.raises(error):
            await collect(remote, request(prompt="x"))
        assert remote.in_flight == 0
    finally:
        await remote.stop()


async def test_engine_down_or_broken_stream_is_unavailable() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    remote, _ = engine(down)
    await remote.start()
    try:
        assert not remote.healthy
        with pytest.raises(EngineUnavailable, match="not healthy"):
            await collect(remote, request(prompt="x"))
    finally:
        await remote.stop()

    def truncated(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, content=sse(choice("a")))  # no finish reason, no [DONE]

    remote, _ = engine(truncated)
    await remote.start()
    try:
        with pytest.raises(EngineUnavailable, match="without a finish reason"):
            await collect(remote, request(prompt="x"))
        with pytest.raises(RequestRejected):
            await collect(remote, request(prompt_token_ids=[1]))  # ids only, to a text-only engine
    finally:
        await remote.stop()


EXTRAS = {"top_k": 40, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True}


def text_engine(request: httpx.Request) -> httpx.Response:
    """A plain OpenAI-compatible engine (transformers serve): no /metrics."""
    if request.url.path in ("/health", "/v1/models"):
        return httpx.Response(200, json={"data": []})
    if request.url.path == "/metrics":
        return httpx.Response(404)
    return httpx.Response(200, content=sse(choice("Hi", "length")))


def sampled(**extras: object) -> EngineRequest:
    return EngineRequest("r1", prompt="To be", sampling=SamplingParams(max_tokens=4, **extras))


@pytest.mark.parametrize("flavour", ["auto", "vllm"])
async def test_vllm_gets_its_extra_sampling_fields(flavour: str) -> None:
    remote, bodies = engine(vllm, flavour=flavour)
    await remote.start()
    try:
        assert remote.flavour == "vllm"
        await collect(remote, sampled(**EXTRAS))
        await collect(remote, sampled())
    finally:
        await remote.stop()
    assert {k: bodies[0].get(k) for k in EXTRAS} == EXTRAS
    assert not set(EXTRAS) & set(bodies[1])  # unset fields are not sent


@pytest.mark.parametrize(("field", "value"), list(EXTRAS.items()))
@pytest.mark.parametrize("flavour", ["auto", "openai"])
async def test_a_plain_engine_refuses_what_it_cannot_honour(field: str, value: object, flavour: str) -> None:
    handler = text_engine if flavour == "auto" else vllm  # "openai" is believed over vLLM's metrics
    remote, bodies = engine(handler, flavour=flavour)
    await remote.start()
    try:
        assert remote.flavour == "openai"
        with pytest.raises(RequestRejected, match=f"cannot honour {field}") as caught:
            await collect(remote, sampled(**{field: value}))
        assert caught.value.field == f"sampling.{field}"
        assert remote.in_flight == 0 and bodies == []  # refused before the engine is asked
        outputs = await collect(remote, sampled())  # the same request without it is served
    finally:
        await remote.stop()
    assert outputs[-1].finish_reason is not None and not set(EXTRAS) & set(bodies[0])


async def test_auto_flavour_follows_the_metrics_and_keeps_it_over_a_failed_read() -> None:
    state = {"metrics": 404}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            if state["metrics"] == 200:
                return httpx.Response(200, text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")
            return httpx.Response(state["metrics"])
        return vllm(request)

    remote, _ = engine(handler)
    await remote.start()
    try:
        assert remote.flavour == "openai"
        state["metrics"] = 200
        await remote.poll()
        assert remote.flavour == "vllm"
        state["metrics"] = 503  # a failed read keeps the last flavour
        await remote.poll()
        assert remote.flavour == "vllm"
    finally:
        await remote.stop()
