"""The limit stores: the same behaviour from the in-process store and from a real Redis.

Every behaviour test runs against both. Time is the memory store's injected clock, and for Redis
the server's own TIME read around each operation: refill is checked against the bounds those
readings give (never against a wall-clock threshold), and waiting for an expiry loops until the
server's clock has passed it. Static checks use a rate of 1e-6/s, so the refill during a test (less
than pytest's 600 s timeout) stays under 1e-3 and `approx(abs=1e-3)` holds however slow the machine.

Redis-only tests: two processes racing for one bucket (exactly the burst is admitted), key TTLs,
and an unreachable or silent Redis raising LimitStoreUnavailable.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as redis_asyncio
from switchboard.gateway.limitstore import (
    Decision,
    LimitStore,
    LimitStoreUnavailable,
    MemoryLimitStore,
    RedisLimitStore,
    limit_key,
    open_limit_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import free_port, start_redis_server

T = TypeVar("T")
SLOW = 1e-6  # a refill rate too slow to matter within a test


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A store and its clock: `now()` reads it, `wait_past(t, s)` returns once it passed t + s."""

    store: LimitStore
    clock: FakeClock | None = None
    redis: Any = None
    tenant: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")

    def key(self, name: str) -> str:
        return limit_key(self.tenant, name)

    async def now(self) -> float:
        if self.clock is not None:
            return self.clock.now
        seconds, micros = await self.redis.time()
        return float(seconds) + micros / 1e6

    async def timed(self, operation: Awaitable[T]) -> tuple[T, float, float]:
        """The result and the clock just before and just after (equal for the memory store)."""
        before = await self.now()
        result = await operation
        return result, before, await self.now()

    async def wait_past(self, start: float, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now = max(self.clock.now, start + seconds + 1e-3)
            return
        # Redis keeps expiries in whole milliseconds: be sure its clock is a few past the moment.
        deadline = start + seconds + 3e-3
        while True:
            now = await self.now()
            if now > deadline:
                return
            await asyncio.sleep(deadline - now + 1e-3)

    async def key_count(self) -> int:
        if isinstance(self.store, MemoryLimitStore):
            return len(self.store)
        return int(await self.redis.dbsize())


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with start_redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        yield Harness(MemoryLimitStore(clock=clock), clock=clock)
        return
    url = request.getfixturevalue("redis_url")
    raw = redis_asyncio.Redis.from_url(url)
    await raw.flushdb()
    store = RedisLimitStore(url, timeout_seconds=5.0)  # generous: a shared CI machine may be slow
    try:
        yield Harness(store, redis=raw)
    finally:
        await store.close()
        await raw.aclose()


def assert_between(value: float, low: float, high: float) -> None:
    assert low - 1e-6 <= value <= high + 1e-6, (value, low, high)


# --- token buckets -------------------------------------------------------------------------------


async def test_take_from_a_full_bucket_then_refuse_with_retry_after(harness: Harness) -> None:
    store, key = harness.store, harness.key("rps")
    assert await store.take(key, rate=SLOW, burst=10, amount=4) == Decision(True, 0.0, 6.0)
    refused = await store.take(key, rate=SLOW, burst=10, amount=7)
    assert not refused.allowed
    assert refused.remaining == pytest.approx(6.0, abs=1e-3)
    assert refused.retry_after_seconds == pytest.approx((7 - refused.remaining) / SLOW, rel=1e-6)
    # A refusal changes nothing: what is left can still be taken.
    assert (await store.take(key, rate=SLOW, burst=10, amount=6)).allowed
    assert not (await store.take(key, rate=SLOW, burst=10, amount=1)).allowed


async def test_bucket_refills_at_its_rate_up_to_the_burst(harness: Harness) -> None:
    store, key, rate = harness.store, harness.key("tps"), 40.0
    emptied, b1, a1 = await harness.timed(store.take(key, rate=rate, burst=4, amount=4))
    assert emptied.allowed and emptied.remaining == 0.0
    await harness.wait_past(a1, 0.05)
    level, b2, a2 = await harness.timed(store.settle(key, rate=rate, burst=4, amount=0))
    assert_between(level, min(4.0, rate * (b2 - a1)), min(4.0, rate * (a2 - b1)))
    assert level > 0
    # Long enough for a full refill: the whole burst again, and never more.
    await harness.wait_past(a2, 4 / rate)
    assert (await store.take(key, rate=rate, burst=4, amount=4)).allowed
    assert not (await store.take(key, rate=SLOW, burst=4, amount=1)).allowed


async def test_refusal_says_when_the_bucket_holds_enough(harness: Harness) -> None:
    store, key, rate = harness.store, harness.key("rps"), 20.0
    await store.take(key, rate=rate, burst=4, amount=4)
    refused, _, after = await harness.timed(store.take(key, rate=rate, burst=4, amount=3))
    assert not refused.allowed
    assert refused.retry_after_seconds == pytest.approx((3 - refused.remaining) / rate)
    assert refused.retry_after_seconds <= 3 / rate + 1e-9
    # After waiting that long (from the refusal), the same take is admitted.
    await harness.wait_past(after, refused.retry_after_seconds)
    assert (await store.take(key, rate=rate, burst=4, amount=3)).allowed


async def test_a_take_larger_than_the_burst_is_admitted_when_full_and_leaves_debt(harness: Harness) -> None:
    store, key = harness.store, harness.key("tps")
    big = await store.take(key, rate=SLOW, burst=10, amount=25)
    assert big == Decision(True, 0.0, -15.0)
    refused = await store.take(key, rate=SLOW, burst=10, amount=1)
    assert not refused.allowed and refused.remaining == pytest.approx(-15.0, abs=1e-3)
    assert refused.retry_after_seconds == pytest.approx(16 / SLOW, rel=1e-3)
    # While not full, a big take waits for the whole burst (min(amount, burst)), not forever.
    assert await store.settle(key, rate=SLOW, burst=10, amount=-24) == pytest.approx(9.0, abs=1e-3)
    refused = await store.take(key, rate=SLOW, burst=10, amount=25)
    assert not refused.allowed and refused.retry_after_seconds == pytest.approx(1 / SLOW, rel=1e-3)


async def test_settle_charges_into_debt_and_refunds_up_to_the_burst(harness: Harness) -> None:
    store, key = harness.store, harness.key("tps")
    assert await store.settle(key, rate=SLOW, burst=10, amount=3) == 7.0
    assert await store.settle(key, rate=SLOW, burst=10, amount=20) == pytest.approx(-13.0, abs=1e-3)
    assert await store.settle(key, rate=SLOW, burst=10, amount=-5) == pytest.approx(-8.0, abs=1e-3)
    assert await store.settle(key, rate=SLOW, burst=10, amount=-100) == 10.0
    assert await store.take(key, rate=SLOW, burst=10, amount=10) == Decision(True, 0.0, 0.0)


async def test_a_full_bucket_keeps_no_state(harness: Harness) -> None:
    store, key = harness.store, harness.key("rps")
    await store.take(key, rate=SLOW, burst=10, amount=2)
    assert await harness.key_count() == 1
    assert await store.settle(key, rate=SLOW, burst=10, amount=-2) == 10.0
    assert await harness.key_count() == 0


async def test_bucket_arguments_are_checked(harness: Harness) -> None:
    for rate, burst in [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (float("inf"), 1.0)]:
        with pytest.raises(ValueError, match="positive"):
            await harness.store.take(harness.key("x"), rate=rate, burst=burst, amount=1)
    with pytest.raises(ValueError, match="non-negative"):
        await harness.store.take(harness.key("x"), rate=1, burst=1, amount=-1)


# --- concurrency slots ---------------------------------------------------------------------------


async def test_slots_up_to_the_limit_and_release(harness: Harness) -> None:
    store, key = harness.store, harness.key("streams")
    assert await store.acquire_slot(key, limit=2, lease_id="a", ttl_seconds=60)
    assert await store.acquire_slot(key, limit=2, lease_id="b", ttl_seconds=60)
    assert not await store.acquire_slot(key, limit=2, lease_id="c", ttl_seconds=60)
    assert await store.acquire_slot(key, limit=2, lease_id="a", ttl_seconds=60)  # already held: renewed
    await store.release_slot(key, "a")
    await store.release_slot(key, "a")  # twice is harmless
    assert await store.acquire_slot(key, limit=2, lease_id="c", ttl_seconds=60)
    assert not await store.acquire_slot(key, limit=0, lease_id="d", ttl_seconds=60)
    await store.release_slot(key, "b")
    await store.release_slot(key, "c")
    assert await harness.key_count() == 0


async def test_an_expired_lease_frees_its_slot(harness: Harness) -> None:
    store, key, ttl = harness.store, harness.key("streams"), 0.05
    _, _, acquired = await harness.timed(store.acquire_slot(key, limit=1, lease_id="crashed", ttl_seconds=ttl))
    assert not await store.acquire_slot(key, limit=1, lease_id="next", ttl_seconds=60)
    await harness.wait_past(acquired, ttl)
    assert await store.acquire_slot(key, limit=1, lease_id="next", ttl_seconds=60)
    assert not await store.refresh_slot(key, "crashed", 60)  # gone for good


async def test_refresh_extends_a_lease(harness: Harness) -> None:
    store, key, ttl = harness.store, harness.key("streams"), 0.05
    _, _, acquired = await harness.timed(store.acquire_slot(key, limit=1, lease_id="long", ttl_seconds=ttl))
    assert await store.refresh_slot(key, "long", 60)
    assert not await store.refresh_slot(key, "unknown", 60)
    await harness.wait_past(acquired, ttl)
    assert not await store.acquire_slot(key, limit=1, lease_id="other", ttl_seconds=60)
    await store.release_slot(key, "long")
    assert await store.acquire_slot(key, limit=1, lease_id="other", ttl_seconds=60)


# --- monthly budget counters ---------------------------------------------------------------------


async def test_budget_counts_and_expires(harness: Harness) -> None:
    store, key = harness.store, harness.key("budget:2026-05")
    assert await store.budget_used(key) == 0
    assert await store.charge_budget(key, amount=5) == 5
    assert await store.charge_budget(key, amount=7, ttl_seconds=60) == 12
    assert await store.charge_budget(key, amount=-2) == 10  # a refund; the TTL stays
    assert await store.budget_used(key) == 10
    short = harness.key("budget:2026-04")
    _, _, charged = await harness.timed(store.charge_budget(short, amount=3, ttl_seconds=0.05))
    await harness.wait_past(charged, 0.05)
    assert await store.budget_used(short) == 0
    assert await store.budget_used(key) == 10


# --- Redis specifics -----------------------------------------------------------------------------


async def test_redis_keys_have_ttls_and_a_tenant_hash_tag(redis_url: str) -> None:
    store = RedisLimitStore(redis_url)
    raw = redis_asyncio.Redis.from_url(redis_url)
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        bucket, slots, budget = limit_key(tenant, "tokens"), limit_key(tenant, "streams"), limit_key(tenant, "b")
        assert bucket == f"sb:gw:{{{tenant}}}:tokens"
        await store.take(bucket, rate=10, burst=10, amount=5)  # full again in 0.5 s
        assert 0 < await raw.pttl(bucket) <= 1500  # + the 1 s margin
        await store.acquire_slot(slots, limit=3, lease_id="a", ttl_seconds=2)
        await store.acquire_slot(slots, limit=3, lease_id="b", ttl_seconds=30)
        assert 2000 < await raw.pttl(slots) <= 31000  # the longest lease, + margin
        await store.charge_budget(budget, amount=1, ttl_seconds=90)
        assert 0 < await raw.pttl(budget) <= 90000
    finally:
        await store.close()
        await raw.aclose()


_RACER = textwrap.dedent(
    """
    import asyncio, sys
    from switchboard.gateway.limitstore import RedisLimitStore

    async def main(url: str, key: str) -> None:
        store = RedisLimitStore(url, timeout_seconds=30)
        await store.budget_used("warm-up")  # connected before the start signal
        print("ready", flush=True)
        sys.stdin.readline()
        allowed = 0
        for _ in range(50):
            allowed += (await store.take(key, rate=1e-6, burst=60, amount=1)).allowed
        print(allowed, flush=True)
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_two_processes_sharing_one_redis_take_exactly_the_burst(redis_url: str) -> None:
    key = limit_key(f"t-{uuid.uuid4().hex[:8]}", "requests")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, redis_url, key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        for racer in racers:  # both start together
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        allowed = [int(racer.communicate()[0].strip()) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert all(racer.returncode == 0 for racer in racers)
    assert sum(allowed) == 60, allowed


async def _every_operation(store: LimitStore) -> list[str]:
    """Run each operation; the messages of the LimitStoreUnavailable each raised."""
    key = limit_key("t", "k")
    operations: list[Awaitable[Any]] = [
        store.take(key, rate=1, burst=1, amount=1),
        store.settle(key, rate=1, burst=1, amount=1),
        store.acquire_slot(key, limit=1, lease_id="a", ttl_seconds=1),
        store.refresh_slot(key, "a", 1),
        store.release_slot(key, "a"),
        store.charge_budget(key, amount=1, ttl_seconds=1),
        store.budget_used(key),
    ]
    messages = []
    for operation in operations:
        with pytest.raises(LimitStoreUnavailable) as raised:
            await operation
        assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no redis-py error shown
        messages.append(str(raised.value))
    return messages


async def test_an_unreachable_redis_raises_limit_store_unavailable() -> None:
    port = free_port()  # nobody listens: connection refused
    store = RedisLimitStore(f"redis://user:secret@127.0.0.1:{port}/0")
    try:
        messages = await _every_operation(store)
    finally:
        await store.close()
    for message in messages:
        assert f"redis://127.0.0.1:{port}/0" in message and "unreachable" in message
        assert "secret" not in message


async def test_a_redis_that_never_answers_raises_after_the_timeout() -> None:
    # A socket that listens but never accepts: connecting works, no reply ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        store = RedisLimitStore(f"redis://127.0.0.1:{port}/0", timeout_seconds=0.05)
        try:
            messages = await _every_operation(store)
        finally:
            await store.close()
    assert all(f"127.0.0.1:{port}" in message and "did not answer" in message for message in messages)


def test_open_limit_store_picks_redis_only_with_a_url() -> None:
    assert isinstance(open_limit_store(None), MemoryLimitStore)
    assert isinstance(open_limit_store(""), MemoryLimitStore)
    store = open_limit_store("redis://127.0.0.1:6379/0", timeout_seconds=0.5)
    assert isinstance(store, RedisLimitStore) and store.address == "redis://127.0.0.1:6379/0"


async def test_memory_store_forgets_idle_tenants() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    await store.take("bucket", rate=1, burst=10, amount=5)
    await store.acquire_slot("slots", limit=1, lease_id="a", ttl_seconds=30)
    await store.charge_budget("budget", amount=1, ttl_seconds=30)
    await store.charge_budget("forever", amount=1)
    assert len(store) == 4
    clock.now += 61  # past every expiry and the sweep interval
    assert await store.budget_used("other") == 0
    assert len(store) == 1  # only the counter without a TTL
