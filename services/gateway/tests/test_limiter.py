"""TenantLimiter: a tenant's limits applied to one request, over a spied-on in-process store.

Clocks are injected (monotonic and wall), so refill, lease refresh and month boundaries are exact.
A `SpyStore` records every store call (to prove None limits cost nothing and output is batched)
and can be told to fail operations, standing in for an unreachable Redis; one test uses a real
RedisLimitStore on a closed port for the same thing.
"""

from __future__ import annotations

import asyncio
import calendar
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from switchboard.gateway.limiter import (
    Admission,
    LimitExceeded,
    LimitKind,
    TenantLimiter,
    month_of,
    next_month_start,
)
from switchboard.gateway.limitstore import (
    Decision,
    LimitStoreUnavailable,
    MemoryLimitStore,
    RedisLimitStore,
    limit_key,
)
from switchboard.gateway.principal import FailMode, Principal, TenantLimits

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import free_port, running_redis_server

SLOW = 1e-6  # a refill too slow to matter: levels only move by what requests take
MAY_31_23_59 = float(calendar.timegm((2026, 5, 31, 23, 59, 0)))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SpyStore:
    """A MemoryLimitStore that records calls and raises LimitStoreUnavailable for `failing` operations."""

    def __init__(self, clock: Clock) -> None:
        self.inner = MemoryLimitStore(clock=clock)
        self.calls: list[tuple[str, str, Any]] = []  # (operation, key, amount or lease)
        self.failing: set[str] = set()
        self.error: type[Exception] = LimitStoreUnavailable

    def _record(self, operation: str, key: str, detail: Any = None) -> None:
        self.calls.append((operation, key, detail))
        if operation in self.failing or "*" in self.failing:
            raise self.error(f"limit store spy unreachable ({operation})")

    def ops(self) -> list[str]:
        return [operation for operation, _, _ in self.calls]

    async def take(self, key: str, *, rate: float, burst: float, amount: float) -> Decision:
        self._record("take", key, amount)
        return await self.inner.take(key, rate=rate, burst=burst, amount=amount)

    async def settle(self, key: str, *, rate: float, burst: float, amount: float) -> float:
        self._record("settle", key, amount)
        return await self.inner.settle(key, rate=rate, burst=burst, amount=amount)

    async def acquire_slot(self, key: str, *, limit: int, lease_id: str, ttl_seconds: float) -> bool:
        self._record("acquire_slot", key, lease_id)
        return await self.inner.acquire_slot(key, limit=limit, lease_id=lease_id, ttl_seconds=ttl_seconds)

    async def refresh_slot(self, key: str, lease_id: str, ttl_seconds: float) -> bool:
        self._record("refresh_slot", key, lease_id)
        return await self.inner.refresh_slot(key, lease_id, ttl_seconds)

    async def release_slot(self, key: str, lease_id: str) -> None:
        self._record("release_slot", key, lease_id)
        await self.inner.release_slot(key, lease_id)

    async def charge_budget(self, key: str, *, amount: int, ttl_seconds: float | None = None) -> int:
        self._record("charge_budget", key, amount)
        return await self.inner.charge_budget(key, amount=amount, ttl_seconds=ttl_seconds)

    async def budget_used(self, key: str) -> int:
        self._record("budget_used", key)
        return await self.inner.budget_used(key)

    async def close(self) -> None:
        await self.inner.close()


class Setup:
    def __init__(self, *, store_retry_seconds: float = 0.0) -> None:
        self.clock = Clock(5000.0)
        self.wall = Clock(MAY_31_23_59)
        self.store = SpyStore(self.clock)
        self.limiter = TenantLimiter(
            self.store,
            output_batch_tokens=16,
            slot_ttl_seconds=30,
            store_retry_seconds=store_retry_seconds,
            clock=self.clock,
            wall_clock=self.wall,
        )

    async def admit(self, principal: Principal, prompt: int = 10, max_output: int = 100, rid: str = "r") -> Admission:
        return await self.limiter.admit(principal, request_id=rid, prompt_tokens=prompt, max_output_tokens=max_output)

    async def level(self, tenant: str, name: str, burst: float) -> float:
        """A bucket's level, read without a change (and without a recorded call)."""
        return await self.store.inner.settle(limit_key(tenant, name), rate=SLOW, burst=burst, amount=0)

    async def budget(self, tenant: str) -> int:
        return await self.store.inner.budget_used(limit_key(tenant, "budget", month_of(self.wall.now)))

    async def streams_free(self, tenant: str, limit: int) -> bool:
        key = limit_key(tenant, "streams")
        if await self.store.inner.acquire_slot(key, limit=limit, lease_id="probe", ttl_seconds=1):
            await self.store.inner.release_slot(key, "probe")
            return True
        return False


def tenant(name: str = "acme", **limits: Any) -> Principal:
    return Principal(tenant=name, key_id="k1", limits=TenantLimits(**limits))


ALL_LIMITS = dict(
    requests_per_second=SLOW,
    request_burst=5,
    tokens_per_second=SLOW,
    token_burst=1000,
    max_concurrent_streams=2,
    monthly_token_budget=10_000,
)


async def test_no_limits_means_no_store_calls() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(), prompt=10_000, max_output=10_000)
    for _ in range(100):
        await admission.charge_output(1)
    await admission.finish(100)
    assert setup.store.calls == []


@pytest.mark.parametrize(
    ("limits", "prompt", "max_output", "limit"),
    [
        (dict(max_prompt_tokens=100), 101, 10, "max_prompt_tokens"),
        (dict(max_output_tokens=50), 10, 51, "max_output_tokens"),
    ],
)
async def test_a_request_too_large_for_the_tenant(
    limits: dict[str, int], prompt: int, max_output: int, limit: str
) -> None:
    setup = Setup()
    principal = tenant(**limits, **ALL_LIMITS)
    with pytest.raises(LimitExceeded) as refused:
        await setup.admit(principal, prompt=prompt, max_output=max_output)
    assert refused.value.limit == limit and refused.value.kind is LimitKind.TOO_LARGE
    assert refused.value.retry_after_seconds is None and refused.value.quota_subject == "tenant:acme"
    assert str(next(iter(limits.values()))) in refused.value.message
    assert setup.store.calls == []  # refused before any state is touched
    # At the limit is fine.
    await setup.admit(principal, prompt=min(prompt, 100), max_output=min(max_output, 50))


async def test_request_rate_refusal_says_when_to_retry() -> None:
    setup = Setup()
    principal = tenant(requests_per_second=2, request_burst=2)
    await setup.admit(principal)
    await setup.admit(principal)
    with pytest.raises(LimitExceeded) as refused:
        await setup.admit(principal)
    assert refused.value.limit == "requests_per_second" and refused.value.kind is LimitKind.RATE
    assert refused.value.retry_after_seconds == pytest.approx(0.5)
    assert "2 requests per second" in refused.value.message
    setup.clock.now += 0.5
    await setup.admit(principal)


async def test_burst_defaults_to_one_seconds_worth() -> None:
    setup = Setup()
    principal = tenant(requests_per_second=3)
    for _ in range(3):
        await setup.admit(principal)
    with pytest.raises(LimitExceeded):
        await setup.admit(principal)


async def test_token_refusal_gives_the_request_token_back() -> None:
    setup = Setup()
    principal = tenant(requests_per_second=SLOW, request_burst=5, tokens_per_second=SLOW, token_burst=100)
    await setup.admit(principal, prompt=60)
    with pytest.raises(LimitExceeded) as refused:
        await setup.admit(principal, prompt=60)
    assert refused.value.limit == "tokens_per_second"
    assert refused.value.retry_after_seconds == pytest.approx(20 / SLOW, rel=1e-3)
    assert await setup.level("acme", "requests", 5) == pytest.approx(4)  # only the admitted request's
    assert await setup.level("acme", "tokens", 100) == pytest.approx(40)


async def test_stream_refusal_gives_tokens_back_and_a_finish_frees_the_slot() -> None:
    setup = Setup()
    principal = tenant(**{**ALL_LIMITS, "max_concurrent_streams": 1})
    first = await setup.admit(principal, prompt=100)
    with pytest.raises(LimitExceeded) as refused:
        await setup.admit(principal, prompt=100)
    assert refused.value.limit == "max_concurrent_streams" and refused.value.kind is LimitKind.RATE
    assert refused.value.retry_after_seconds is None
    assert await setup.level("acme", "requests", 5) == pytest.approx(4)
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(900)
    assert await setup.budget("acme") == 100  # the refused prompt was never charged
    await first.finish(0)
    second = await setup.admit(principal, prompt=100)
    await second.finish(0)
    assert await setup.streams_free("acme", 1)


async def test_monthly_budget_refuses_until_the_next_month() -> None:
    setup = Setup()
    principal = tenant(**{**ALL_LIMITS, "monthly_token_budget": 100})
    admission = await setup.admit(principal, prompt=60)
    await admission.finish(20)
    assert await setup.budget("acme") == 80
    setup.store.calls.clear()
    with pytest.raises(LimitExceeded) as refused:
        await setup.admit(principal, prompt=30)
    assert refused.value.limit == "monthly_token_budget" and refused.value.kind is LimitKind.QUOTA
    assert refused.value.retry_after_seconds == pytest.approx(60.0)  # 23:59 -> June 1st 00:00 UTC
    assert "2026-06-01T00:00Z" in refused.value.message
    assert setup.store.ops() == ["budget_used"]  # checked first: no bucket touched
    await (await setup.admit(principal, prompt=20)).finish(0)  # exactly fills the budget
    with pytest.raises(LimitExceeded):
        await setup.admit(principal, prompt=0)
    setup.wall.now += 60  # a new month, a new counter
    await setup.admit(principal, prompt=30)
    assert await setup.budget("acme") == 30


async def test_output_is_charged_in_batches_and_settled_exactly() -> None:
    setup = Setup()
    principal = tenant(**ALL_LIMITS)
    admission = await setup.admit(principal, prompt=100)
    setup.store.calls.clear()
    for _ in range(40):
        await admission.charge_output(1)
    # Two batches of 16: each one settle of the token bucket and one budget charge.
    assert setup.store.ops() == ["settle", "charge_budget"] * 2
    assert [amount for _, _, amount in setup.store.calls] == [16, 16, 16, 16]
    await admission.finish(45)
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(1000 - 100 - 45)
    assert await setup.budget("acme") == 145
    assert await setup.streams_free("acme", 1)  # the slot is released


async def test_finish_refunds_what_charge_output_overcounted() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(**ALL_LIMITS), prompt=100)
    await admission.charge_output(32)
    await admission.finish(20)
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(880)
    assert await setup.budget("acme") == 120


async def test_output_may_drive_the_token_bucket_into_debt() -> None:
    setup = Setup()
    principal = tenant(tokens_per_second=SLOW, token_burst=100)
    admission = await setup.admit(principal, prompt=90)
    await admission.charge_output(50)  # never interrupted
    await admission.finish(50)
    assert await setup.level("acme", "tokens", 100) == pytest.approx(-40)
    with pytest.raises(LimitExceeded):
        await setup.admit(principal, prompt=1)


async def test_finish_is_idempotent() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(**ALL_LIMITS), prompt=100)
    await admission.finish(10)
    calls = len(setup.store.calls)
    await admission.finish(10)
    await admission.finish(999)
    await admission.charge_output(50)
    assert len(setup.store.calls) == calls
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(890)
    assert sum(1 for op in setup.store.ops() if op == "release_slot") == 1


async def test_finish_in_a_cancelled_task_still_releases() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(**{**ALL_LIMITS, "max_concurrent_streams": 1}), prompt=10)
    started = asyncio.Event()

    async def stream() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await admission.finish(5)

    task = asyncio.create_task(stream())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await setup.streams_free("acme", 1)
    assert await setup.budget("acme") == 15


async def test_long_streams_refresh_their_lease() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(max_concurrent_streams=1), prompt=10)
    setup.store.calls.clear()
    await admission.charge_output(1)
    assert setup.store.ops() == []  # not due yet
    setup.clock.now += 11  # past a third of the 30 s lease
    await admission.charge_output(1)
    assert setup.store.ops() == ["refresh_slot"]
    setup.clock.now += 25  # the original lease would have expired by now
    assert not await setup.streams_free("acme", 1)
    await admission.finish(2)
    assert await setup.streams_free("acme", 1)


def errors(operation: str) -> float:
    return REGISTRY.get_sample_value("switchboard_gateway_limit_store_errors_total", {"operation": operation}) or 0.0


async def test_fail_open_admits_and_counts_the_error() -> None:
    setup = Setup()
    setup.store.failing = {"*"}
    before = errors("budget_used")
    admission = await setup.admit(tenant(**ALL_LIMITS, on_store_unavailable=FailMode.OPEN))
    assert admission.degraded
    assert errors("budget_used") == before + 1
    for _ in range(40):
        await admission.charge_output(1)  # never raises
    await admission.finish(40)


async def test_fail_closed_raises_unavailable() -> None:
    setup = Setup()
    setup.store.failing = {"take"}
    with pytest.raises(LimitStoreUnavailable):
        await setup.admit(tenant(**ALL_LIMITS, on_store_unavailable=FailMode.CLOSED))
    # What was taken before the failure (nothing but the budget read) is untouched.
    assert await setup.streams_free("acme", 2)


async def test_fail_closed_gives_back_what_it_took() -> None:
    setup = Setup()
    setup.store.failing = {"acquire_slot"}
    with pytest.raises(LimitStoreUnavailable):
        await setup.admit(tenant(**ALL_LIMITS, on_store_unavailable=FailMode.CLOSED), prompt=100)
    assert await setup.level("acme", "requests", 5) == pytest.approx(5)
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(1000)


async def test_usage_missed_while_the_store_was_down_is_settled_later() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(**ALL_LIMITS), prompt=100)
    setup.store.failing = {"settle", "charge_budget"}
    for _ in range(32):
        await admission.charge_output(1)  # both batches fail, silently
    setup.store.failing = set()
    await admission.finish(40)
    assert await setup.level("acme", "tokens", 1000) == pytest.approx(860)
    assert await setup.budget("acme") == 140


async def test_no_accounting_error_reaches_the_stream() -> None:
    setup = Setup()
    admission = await setup.admit(tenant(**ALL_LIMITS), prompt=10)
    setup.store.failing, setup.store.error = {"*"}, RuntimeError
    await admission.charge_output(64)
    await admission.finish(64)
    assert admission.finished


async def test_a_failed_store_is_left_alone_for_a_while() -> None:
    setup = Setup(store_retry_seconds=1.0)
    setup.store.failing = {"*"}
    principal = tenant(**ALL_LIMITS)
    budget_errors, take_errors = errors("budget_used"), errors("take")
    await setup.admit(principal)
    assert len(setup.store.calls) == 1
    second = await setup.admit(principal)  # fail open without waiting on the store again
    assert second.degraded and len(setup.store.calls) == 1
    assert errors("budget_used") == budget_errors + 2 and errors("take") == take_errors
    setup.store.failing = set()
    setup.clock.now += 1.0
    third = await setup.admit(principal)
    assert not third.degraded and len(setup.store.calls) > 1


async def test_fail_modes_against_an_unreachable_redis() -> None:
    store = RedisLimitStore(f"redis://127.0.0.1:{free_port()}/0")
    limiter = TenantLimiter(store, store_retry_seconds=0)
    try:
        admission = await limiter.admit(tenant(**ALL_LIMITS), request_id="r", prompt_tokens=10, max_output_tokens=10)
        assert admission.degraded
        await admission.charge_output(20)
        await admission.finish(20)
        with pytest.raises(LimitStoreUnavailable, match=r"127\.0\.0\.1"):
            await limiter.admit(
                tenant(**ALL_LIMITS, on_store_unavailable=FailMode.CLOSED),
                request_id="r",
                prompt_tokens=10,
                max_output_tokens=10,
            )
    finally:
        await store.close()


async def test_limits_over_a_real_redis() -> None:
    async with running_redis_server() as url:
        store = RedisLimitStore(url, timeout_seconds=5.0)
        limiter = TenantLimiter(store, wall_clock=lambda: MAY_31_23_59)
        principal = tenant("redis-tenant", **{**ALL_LIMITS, "max_concurrent_streams": 1})
        try:
            first = await limiter.admit(principal, request_id="same", prompt_tokens=100, max_output_tokens=10)
            with pytest.raises(LimitExceeded, match="streams"):
                await limiter.admit(principal, request_id="same", prompt_tokens=100, max_output_tokens=10)
            for _ in range(5):
                await first.charge_output(7)
            await first.finish(35)
            tokens = await store.settle(limit_key("redis-tenant", "tokens"), rate=SLOW, burst=1000, amount=0)
            assert tokens == pytest.approx(1000 - 135, abs=1e-2)
            requests = await store.settle(limit_key("redis-tenant", "requests"), rate=SLOW, burst=5, amount=0)
            assert requests == pytest.approx(4, abs=1e-2)
            assert await store.budget_used(limit_key("redis-tenant", "budget", "2026-05")) == 135
        finally:
            await store.close()


def test_month_helpers() -> None:
    assert month_of(MAY_31_23_59) == "2026-05"
    assert next_month_start(MAY_31_23_59) == calendar.timegm((2026, 6, 1, 0, 0, 0))
    december = calendar.timegm((2026, 12, 15, 12, 0, 0))
    assert next_month_start(december) == calendar.timegm((2027, 1, 1, 0, 0, 0))
