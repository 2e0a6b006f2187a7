"""The state behind the gateway's limits: token buckets, concurrency leases and monthly counters.

One async interface, `LimitStore`, with two implementations:

- `MemoryLimitStore`: in-process; the local default when no REDIS_URL is set. Every operation runs
  without an await inside, so it is atomic on the event loop. Its clock is injectable for tests.
- `RedisLimitStore`: shared by every gateway process. Each operation that reads and writes is one
  Lua script, so it is atomic across gateways, and the scripts read the Redis server's `TIME`, so
  gateways with skewed clocks still agree on how much a bucket has refilled.

Both keep no state for idle tenants: a bucket expires once it would be full again (a missing bucket
is a full one), a lease set once its last lease expires, a budget counter when the caller's TTL ends.

A store that cannot be reached raises `LimitStoreUnavailable` (never a redis-py exception) within
`timeout_seconds`, so the limiter can apply the tenant's fail mode quickly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from switchboard.gateway.redis_connection import RedisConnection

KEY_PREFIX = "sb:gw:"
DEFAULT_TIMEOUT_SECONDS = 0.25
# A bucket's key outlives the moment it is full again by this much, so a key never expires
# while its level still matters because of rounding between the script and Redis' expiry.
_BUCKET_TTL_MARGIN_SECONDS = 1.0
_SLOT_TTL_MARGIN_SECONDS = 1.0
# The memory store drops expired state at most this often (an O(keys) sweep).
_SWEEP_INTERVAL_SECONDS = 60.0


class LimitStoreUnavailable(Exception):
    """The limit store cannot be reached (refused, timed out, or erroring); the message names it."""


@dataclass(frozen=True)
class Decision:
    """The answer of `LimitStore.take`.

    `remaining` is the bucket's level after the take (negative = debt); on a refusal,
    `retry_after_seconds` is when the bucket will hold enough for the same take (0 when allowed).
    """

    allowed: bool
    retry_after_seconds: float
    remaining: float


def limit_key(tenant: str, *parts: str) -> str:
    """`sb:gw:{tenant}:part:...`: namespaced, and hash-tagged so a tenant's keys share one Cluster slot."""
    return f"{KEY_PREFIX}{{{tenant}}}:" + ":".join(parts)


class LimitStore(Protocol):
    """Atomic limit state shared by the requests of a tenant (and, for Redis, by gateways)."""

    async def take(self, key: str, *, rate: float, burst: float, amount: float) -> Decision:
        """Take `amount` from the token bucket `key` (capacity `burst`, refilled at `rate`/s).

        Allowed when the bucket holds at least min(amount, burst): a take larger than the burst is
        admitted once the bucket is full and leaves it in debt, rather than never being admitted.
        A refusal changes nothing.
        """
        ...

    async def settle(self, key: str, *, rate: float, burst: float, amount: float) -> float:
        """Charge `amount` to the bucket without a check (negative refunds, capped at `burst`); the new level."""
        ...

    async def acquire_slot(self, key: str, *, limit: int, lease_id: str, ttl_seconds: float) -> bool:
        """Hold one of `limit` concurrent leases until released or `ttl_seconds` pass.

        Re-acquiring a lease already held renews it and succeeds.
        """
        ...

    async def refresh_slot(self, key: str, lease_id: str, ttl_seconds: float) -> bool:
        """Extend a held lease to `ttl_seconds` from now; False when it is no longer held (expired)."""
        ...

    async def release_slot(self, key: str, lease_id: str) -> None:
        """Give the lease back (no-op when not held)."""
        ...

    async def charge_budget(self, key: str, *, amount: int, ttl_seconds: float | None = None) -> int:
        """Add `amount` to the counter `key` and return its new value.

        `ttl_seconds` (when given) makes the counter expire that long from now; the caller puts the
        period in the key and sets a TTL past the period's end. None leaves the expiry as it is.
        """
        ...

    async def budget_used(self, key: str) -> int:
        """The counter's value (0 when absent)."""
        ...

    async def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...


def _check_bucket(rate: float, burst: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"bucket rate must be a positive number, got {rate!r}")
    if not (burst > 0 and math.isfinite(burst)):
        raise ValueError(f"bucket burst must be a positive number, got {burst!r}")


def _check_ttl(ttl_seconds: float) -> None:
    if not (ttl_seconds > 0 and math.isfinite(ttl_seconds)):
        raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")


def _bucket_ttl(level: float, rate: float, burst: float) -> float:
    """How long a bucket's state must be kept: until it is full again, plus a margin."""
    return max(0.0, burst - level) / rate + _BUCKET_TTL_MARGIN_SECONDS


# ---------------------------------------------------------------------------------------------
# In-process store
# ---------------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    level: float
    updated: float
    expires: float  # when it is full again (plus a margin), as the Redis key's TTL


class MemoryLimitStore:
    """Limit state in this process (one gateway); `clock` is monotonic seconds, injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, dict[str, float]] = {}  # key -> lease id -> expiry
        self._budgets: dict[str, tuple[int, float | None]] = {}  # key -> (value, expiry)
        self._last_sweep = clock()

    def __repr__(self) -> str:
        return "MemoryLimitStore()"

    def __len__(self) -> int:
        """How many keys hold state (expired ones go at the next periodic sweep)."""
        return len(self._buckets) + len(self._slots) + len(self._budgets)

    def _now(self) -> float:
        now = self._clock()
        if now - self._last_sweep >= _SWEEP_INTERVAL_SECONDS:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        """Drop the state of idle tenants, as key expiry does in Redis."""
        self._last_sweep = now
        for key in [key for key, bucket in self._buckets.items() if bucket.expires <= now]:
            del self._buckets[key]
        for key in list(self._slots):
            self._purge_slots(key, now)
        for key in [key for key, (_, expiry) in self._budgets.items() if expiry is not None and expiry <= now]:
            del self._budgets[key]

    def _level(self, key: str, rate: float, burst: float, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.expires <= now:
            return burst  # a missing bucket is a full one
        return min(burst, bucket.level + max(0.0, now - bucket.updated) * rate)

    def _store_level(self, key: str, level: float, rate: float, burst: float, now: float) -> None:
        if level >= burst:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = _Bucket(level, now, now + _bucket_ttl(level, rate, burst))

    async def take(self, key: str, *, rate: float, burst: float, amount: float) -> Decision:
        _check_bucket(rate, burst)
        _check_amount(amount)
        now = self._now()
        level = self._level(key, rate, burst, now)
        need = min(amount, burst)
        if level < need:
            return Decision(False, (need - level) / rate, level)
        level -= amount
        self._store_level(key, level, rate, burst, now)
        return Decision(True, 0.0, level)

    async def settle(self, key: str, *, rate: float, burst: float, amount: float) -> float:
        _check_bucket(rate, burst)
        now = self._now()
        level = min(burst, self._level(key, rate, burst, now) - amount)
        self._store_level(key, level, rate, burst, now)
        return level

    def _purge_slots(self, key: str, now: float) -> dict[str, float]:
        leases = self._slots.get(key)
        if leases is None:
            return {}
        for lease_id in [lease_id for lease_id, expiry in leases.items() if expiry <= now]:
            del leases[lease_id]
        if not leases:
            del self._slots[key]
        return leases

    async def acquire_slot(self, key: str, *, limit: int, lease_id: str, ttl_seconds: float) -> bool:
        _check_ttl(ttl_seconds)
        now = self._now()
        leases = self._purge_slots(key, now)
        if lease_id not in leases and len(leases) >= limit:
            return False
        self._slots.setdefault(key, leases)[lease_id] = now + ttl_seconds
        return True

    async def refresh_slot(self, key: str, lease_id: str, ttl_seconds: float) -> bool:
        _check_ttl(ttl_seconds)
        now = self._now()
        leases = self._purge_slots(key, now)
        if lease_id not in leases:
            return False
        leases[lease_id] = now + ttl_seconds
        return True

    async def release_slot(self, key: str, lease_id: str) -> None:
        leases = self._purge_slots(key, self._now())
        leases.pop(lease_id, None)
        if not leases:
            self._slots.pop(key, None)

    async def charge_budget(self, key: str, *, amount: int, ttl_seconds: float | None = None) -> int:
        if ttl_seconds is not None:
            _check_ttl(ttl_seconds)
        now = self._now()
        value, expiry = self._budgets.get(key, (0, None))
        if expiry is not None and expiry <= now:
            value, expiry = 0, None
        value += int(amount)
        self._budgets[key] = (value, expiry if ttl_seconds is None else now + ttl_seconds)
        return value

    async def budget_used(self, key: str) -> int:
        now = self._now()
        value, expiry = self._budgets.get(key, (0, None))
        return 0 if expiry is not None and expiry <= now else value

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Redis store
# ---------------------------------------------------------------------------------------------

# Shared by every script. The clock is the server's TIME, so gateways with skewed clocks agree;
# replicate_commands lets a Redis older than 5 replicate a script that reads TIME before writing
# (later versions replicate scripts by effects anyway).
_LUA_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.17g', x) end
"""

# KEYS[1] = bucket; ARGV = rate, burst, margin seconds. Defines `level` (refilled to now) and `save`.
_LUA_BUCKET = (
    _LUA_PRELUDE
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local margin = tonumber(ARGV[3])
local level = burst
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
if state[1] then
  level = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
end
local function save(new_level)
  if new_level >= burst then
    redis.call('DEL', KEYS[1])  -- a missing bucket is a full one
  else
    redis.call('HSET', KEYS[1], 'level', fmt(new_level), 'ts', fmt(now))
    -- Capped at about 30 years, and written as an integer (a huge number would print as 1e+15).
    local ttl_ms = math.min(math.ceil(((burst - new_level) / rate + margin) * 1000), 1e12)
    redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl_ms))
  end
end
"""
)

# ARGV[4] = amount. Returns {allowed (0/1), retry_after_seconds, level}.
_LUA_TAKE = (
    _LUA_BUCKET
    + """
local amount = tonumber(ARGV[4])
local need = math.min(amount, burst)
if level < need then
  return {0, fmt((need - level) / rate), fmt(level)}
end
level = level - amount
save(level)
return {1, '0', fmt(level)}
"""
)

# ARGV[4] = amount (negative refunds). Returns the new level.
_LUA_SETTLE = (
    _LUA_BUCKET
    + """
level = math.min(burst, level - tonumber(ARGV[4]))
save(level)
return fmt(level)
"""
)

# KEYS[1] = lease set (sorted set, score = expiry in server ms). Defines `purge` and `expire_with_last`.
_LUA_SLOTS = (
    _LUA_PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local function expire_with_last(margin_ms)
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now_ms + margin_ms))
  end
end
"""
)

# ARGV = limit, lease id, ttl ms, margin ms. Returns 1 when the lease is held.
_LUA_ACQUIRE = (
    _LUA_SLOTS
    + """
local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
if (not held) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[2])
expire_with_last(tonumber(ARGV[4]))
return 1
"""
)

# ARGV = lease id, ttl ms, margin ms. Returns 1 when the lease was still held.
_LUA_REFRESH = (
    _LUA_SLOTS
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
expire_with_last(tonumber(ARGV[3]))
return 1
"""
)

# KEYS[1] = counter; ARGV = amount, ttl ms (0 = leave the expiry). Returns the new value.
_LUA_CHARGE_BUDGET = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return value
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisLimitStore:
    """Limit state in Redis, shared by every gateway; each read-modify-write is one Lua script.

    Every operation is bounded by `timeout_seconds` (connect and reply) and redis-py's own retries
    are off: a store that is down should cost a request one timeout, not several, and the limiter
    decides what to do about it.
    """

    def __init__(self, url: str, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        _check_ttl(timeout_seconds)
        self._connection = RedisConnection(
            url, timeout_seconds, "limit store", LimitStoreUnavailable, decode_responses=True
        )
        self.address = self._connection.address
        self._client = self._connection.client
        self._take = self._client.register_script(_LUA_TAKE)
        self._settle = self._client.register_script(_LUA_SETTLE)
        self._acquire = self._client.register_script(_LUA_ACQUIRE)
        self._refresh = self._client.register_script(_LUA_REFRESH)
        self._charge_budget = self._client.register_script(_LUA_CHARGE_BUDGET)

    def __repr__(self) -> str:
        return f"RedisLimitStore({self.address!r})"

    async def _call(self, operation: str, awaitable: Any) -> Any:
        return await self._connection.call(operation, awaitable)

    async def take(self, key: str, *, rate: float, burst: float, amount: float) -> Decision:
        _check_bucket(rate, burst)
        _check_amount(amount)
        allowed, retry_after, level = await self._call(
            "take", self._take(keys=[key], args=[rate, burst, _BUCKET_TTL_MARGIN_SECONDS, amount])
        )
        return Decision(bool(int(allowed)), float(retry_after), float(level))

    async def settle(self, key: str, *, rate: float, burst: float, amount: float) -> float:
        _check_bucket(rate, burst)
        level = await self._call(
            "settle", self._settle(keys=[key], args=[rate, burst, _BUCKET_TTL_MARGIN_SECONDS, amount])
        )
        return float(level)

    async def acquire_slot(self, key: str, *, limit: int, lease_id: str, ttl_seconds: float) -> bool:
        _check_ttl(ttl_seconds)
        held = await self._call(
            "acquire_slot",
            self._acquire(keys=[key], args=[limit, lease_id, _ms(ttl_seconds), _ms(_SLOT_TTL_MARGIN_SECONDS)]),
        )
        return bool(int(held))

    async def refresh_slot(self, key: str, lease_id: str, ttl_seconds: float) -> bool:
        _check_ttl(ttl_seconds)
        held = await self._call(
            "refresh_slot", self._refresh(keys=[key], args=[lease_id, _ms(ttl_seconds), _ms(_SLOT_TTL_MARGIN_SECONDS)])
        )
        return bool(int(held))

    async def release_slot(self, key: str, lease_id: str) -> None:
        # One ZREM is atomic; removing the last member deletes the key.
        await self._call("release_slot", self._client.zrem(key, lease_id))

    async def charge_budget(self, key: str, *, amount: int, ttl_seconds: float | None = None) -> int:
        if ttl_seconds is not None:
            _check_ttl(ttl_seconds)
        ttl_ms = 0 if ttl_seconds is None else _ms(ttl_seconds)
        value = await self._call("charge_budget", self._charge_budget(keys=[key], args=[int(amount), ttl_ms]))
        return int(value)

    async def budget_used(self, key: str) -> int:
        value = await self._call("budget_used", self._client.get(key))
        return 0 if value is None else int(value)

    async def close(self) -> None:
        await self._connection.close()


def _check_amount(amount: float) -> None:
    if not (amount >= 0 and math.isfinite(amount)):
        raise ValueError(f"take amount must be a non-negative number, got {amount!r}")


def open_limit_store(redis_url: str | None, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> LimitStore:
    """The Redis store when a URL is configured, else the in-process store (one gateway only)."""
    if redis_url:
        return RedisLimitStore(redis_url, timeout_seconds=timeout_seconds)
    return MemoryLimitStore()
