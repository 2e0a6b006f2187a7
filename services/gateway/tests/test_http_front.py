"""The OpenAI-compatible HTTP front, driven by the `openai` client as users run it.

A real gateway (gRPC and HTTP on free ports) in front of in-process router and replica servers:
completions and chat completions, streamed with usage and whole; /v1/models by scope; and the
error statuses and shapes (401, 403, 400, 404, 429 with Retry-After, 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.keys import new_key
from switchboard.gateway.tenants import hash_key
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc, router_pb2, router_pb2_grpc

from .redis_server import free_port
from .test_token_ids import FP_A, FakeRouter, decision, grpc_server, started_gateway

WORDS = ["To", " be", ",", " or", " not"]


class StreamingReplica(generator_pb2_grpc.GeneratorServicer):
    """Streams one word per message, then a finish reason with usage (as a generator does)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def Generate(self, request, context):
        self.prompts.append(request.prompt)
        count = min(request.sampling.max_tokens or len(WORDS), len(WORDS))
        for index in range(count):
            last = index == count - 1
            yield generator_pb2.GeneratorGenerateResponse(
                text=WORDS[index],
                token_ids=[index + 1],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED,
                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=count) if last else None,
            )


class ListingRouter(FakeRouter):
    async def ListExperts(self, request, context):
        return router_pb2.ListExpertsResponse(
            experts=[router_pb2.ExpertInfo(name=name, ready_replicas=1) for name in ("a", "b")]
        )


@dataclass
class Front:
    base_url: str
    key: str
    replica: StreamingReplica
    router: ListingRouter

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=20)


TENANTS = """
tenants:
  main:
    keys: [{{id: main-1, sha256: "{main}"}}]
  scoped:
    keys: [{{id: scoped-1, sha256: "{scoped}"}}]
    scopes: ["experts:b"]
  slow:
    keys: [{{id: slow-1, sha256: "{slow}"}}]
    limits: {{requests_per_second: 0.01, request_burst: 1}}
"""


@asynccontextmanager
async def front(tmp_path: Path, router_up: bool = True, cache: str = "off") -> AsyncIterator[Front]:
    replica, router = StreamingReplica(), ListingRouter(router_pb2.RouteResponse())
    tenants = tmp_path / "tenants.yaml"
    key = new_key()
    tenants.write_text(TENANTS.format(main=hash_key(key), scoped=hash_key("scoped-key"), slow=hash_key("slow-key")))
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        answer = decision(("a", replica_addr, FP_A))
        answer.prompt_tokens = 3
        router.answer = answer
        http_port = free_port()
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr if router_up else f"127.0.0.1:{free_port()}",
            tenants_file=tenants,
            http_port=http_port,
            router_timeout_seconds=1.0,
            cache=cache,
        )
        async with started_gateway(settings):
            yield Front(f"http://127.0.0.1:{http_port}/v1", key, replica, router)


async def test_completions_whole_and_streamed_with_usage(tmp_path: Path) -> None:
    async with front(tmp_path) as f:
        client = f.client()
        whole = await client.completions.create(model="auto", prompt="To be", max_tokens=5)
        assert whole.choices[0].text == "To be, or not" and whole.choices[0].finish_reason == "length"
        assert whole.model == "a" and whole.object == "text_completion" and whole.id.startswith("cmpl-")
        assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 5)
        assert whole.usage.total_tokens == 8
        stream = await client.completions.create(
            model="auto", prompt="To be", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert texts == ["To", " be", ","]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        assert all(c.usage is None for c in chunks[:-1])
        plain = await client.completions.create(model="auto", prompt="To be", max_tokens=2, stream=True)
        assert all(c.usage is None for c in [c async for c in plain])  # no usage chunk unless asked


async def test_chat_completions_whole_and_streamed(tmp_path: Path) -> None:
    async with front(tmp_path) as f:
        client = f.client()
        messages = [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "Well?"}]
        whole = await client.chat.completions.create(model="auto", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == "To be"
        assert whole.object == "chat.completion" and whole.usage is not None and whole.usage.completion_tokens == 2
        # The default template: one "role: content" line per message, then the assistant's turn.
        assert f.replica.prompts[-1] == "system: Speak as Hamlet.\nuser: Well?\nassistant:"
        stream = await client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": [{"type": "text", "text": "Well?"}]}],  # type: ignore[list-item]
            max_completion_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == "To be,"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_a_cached_answer_says_so_in_its_usage(tmp_path: Path) -> None:
    """A response-cache hit: OpenAI's cached_tokens is the whole prompt, and Switchboard's cached is true."""
    async with front(tmp_path, cache="memory") as f:
        client = f.client()
        first = await client.completions.create(model="auto", prompt="To be", max_tokens=3, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens_details is None
        assert "cached" not in (first.usage.model_extra or {})
        again = await client.completions.create(model="auto", prompt="To be", max_tokens=3, temperature=0)
        assert len(f.replica.prompts) == 1  # no replica ran the second one
        assert again.choices[0].text == first.choices[0].text == "To be,"
        usage = again.usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 3, 6)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 3
        assert (usage.model_extra or {}).get("cached") is True
        # Streamed, with the usage chunk: the same marks; without temperature 0 nothing is cached.
        stream = await client.completions.create(
            model="auto", prompt="To be", max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "To be,"
        last = chunks[-1].usage
        assert last is not None and last.prompt_tokens_details is not None and last.prompt_tokens_details.cached_tokens == 3
        assert (last.model_extra or {}).get("cached") is True and len(f.replica.prompts) == 1
        sampled = await client.completions.create(model="auto", prompt="To be", max_tokens=3)
        assert sampled.usage is not None and "cached" not in (sampled.usage.model_extra or {})
        assert len(f.replica.prompts) == 2
        # Chat completions: the first is a miss, the repeat (whole, then streamed) a hit.
        messages = [{"role": "user", "content": "Well?"}]
        miss = await client.chat.completions.create(model="auto", messages=messages, max_tokens=2, seed=7)  # type: ignore[arg-type]
        hit = await client.chat.completions.create(model="auto", messages=messages, max_tokens=2, seed=7)  # type: ignore[arg-type]
        assert len(f.replica.prompts) == 3 and hit.choices[0].message.content == miss.choices[0].message.content
        assert miss.usage is not None and "cached" not in (miss.usage.model_extra or {})
        assert hit.usage is not None and (hit.usage.model_extra or {}).get("cached") is True
        assert hit.usage.prompt_tokens_details is not None and hit.usage.prompt_tokens_details.cached_tokens == 3
        streamed = await client.chat.completions.create(
            model="auto", messages=messages, max_tokens=2, seed=7, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
        final = [chunk async for chunk in streamed][-1].usage
        assert final is not None and (final.model_extra or {}).get("cached") is True and len(f.replica.prompts) == 3


async def test_models_lists_what_the_scopes_allow(tmp_path: Path) -> None:
    async with front(tmp_path) as f:
        assert [m.id async for m in f.client().models.list()] == ["a", "b"]
        assert [m.id async for m in f.client("scoped-key").models.list()] == ["b"]


async def test_error_statuses_and_shapes(tmp_path: Path) -> None:
    async with front(tmp_path) as f:
        with pytest.raises(openai.AuthenticationError) as unauthenticated:
            await f.client("sb-not-a-key").completions.create(model="auto", prompt="x")
        assert unauthenticated.value.status_code == 401 and unauthenticated.value.code == "API_KEY_INVALID"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await f.client("scoped-key").completions.create(model="a", prompt="x")
        assert denied.value.status_code == 403 and "experts:a" in denied.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await f.client().completions.create(model="auto", prompt="x", temperature=5)
        assert bad.value.param == "sampling.temperature"
        with pytest.raises(openai.BadRequestError) as several:
            await f.client().completions.create(model="auto", prompt="x", n=2)
        assert several.value.param == "n"
        with pytest.raises(openai.BadRequestError) as chat:
            await f.client().chat.completions.create(model="auto", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
        assert chat.value.param == "messages[0].role"
        await f.client("slow-key").completions.create(model="auto", prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            await f.client("slow-key").completions.create(model="auto", prompt="x", max_tokens=1)
        assert limited.value.status_code == 429 and int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.code == "TENANT_LIMIT_EXCEEDED"
        async with httpx.AsyncClient(base_url=f.base_url, headers={"authorization": f"Bearer {f.key}"}) as http:
            missing = await http.get("/nothing-here")
            assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
            broken = await http.post("/completions", content=b"{not json")
            assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
            not_utf8 = await http.post("/completions", content=b'{"prompt": "\xff"}')
            assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]
            huge = await http.post("/completions", content=b"{" + b" " * (1 << 20) + b"}")
            assert huge.status_code == 400 and "request body over" in huge.json()["error"]["message"]
            anonymous = await http.get("/models", headers={"authorization": ""})
            assert anonymous.status_code == 401
            assert (await http.get("/../health")).status_code in (200, 404)


async def test_router_down_is_503_with_retry_after(tmp_path: Path) -> None:
    async with front(tmp_path, router_up=False) as f:
        with pytest.raises(openai.InternalServerError) as unavailable:
            await f.client().completions.create(model="auto", prompt="x", max_tokens=1)
        assert unavailable.value.status_code == 503 and unavailable.value.response.headers.get("retry-after") == "1"
