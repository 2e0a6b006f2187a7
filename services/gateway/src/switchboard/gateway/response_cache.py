"""The gateway's response cache: a deterministic request's whole answer, replayed without a replica.

Only deterministic requests are cached: `sampling.temperature` set to 0 (greedy), or a
`sampling.seed` set (the same seed, prompt and parameters give the same text). Unset temperature
means 1.0 (sampled), so a request that sets neither is never cached.

The key (`cache_key`) is a SHA-256 over, length-prefixed so no two tuples collide:

- the key format's version;
- the namespace: the tenant's name, or one shared namespace for the tenants whose entry in the
  tenants file says `share_cache: true` (only those read and write it);
- the expert the router chose (the first candidate), the revision its replica serves (as it
  registered: `GENERATOR_REVISION`, by default derived from the model folder's files), and its
  tokenizer fingerprint, with the prompt's
  token ids for that tokenizer as the router counted them: the lookup runs after routing, so the
  key names the expert that would serve, also for `model: auto` (a pinned-only cache would miss
  every routed request, and a key before routing cannot know which expert the gate picks);
- the prompt text;
- the normalized sampling parameters, whole (`SamplingParams` serialized deterministically:
  max_tokens after its default, temperature, top_p, top_k, repetition_penalty, stop, seed,
  min_tokens, ignore_eos, and any field added later).

New weights under the same expert name announce a new revision, so their answers get new keys and
the old revision's entries simply expire (`GATEWAY_CACHE_TTL_SECONDS`). A replica that announces
no revision (a remote engine without a model folder or GENERATOR_REVISION) keys by "" and serves
stale answers after a weight change until the entries expire or the cache is flushed.

An entry is an envelope (`encode_entry`): magic, format version, CRC-32 of the payload, then the
expert's name and the `GenerateResponse` messages of the stream as the client received them. An
entry that fails any check (another version, a bad checksum, a truncated or unparsable message, a
stream without a final message) is a miss, counted as `corrupt`.

Two stores behind one protocol, `ResponseCache`:

- `MemoryResponseCache(max_bytes, ttl_seconds)`: in this process, least recently used evicted first
  once the entries' bytes pass `max_bytes`; an entry expires `ttl_seconds` after it was stored.
- `RedisResponseCache(url, ttl_seconds, timeout_seconds)`: shared by every gateway; `SET ... EX`,
  so Redis expires the entries itself. Its memory bound is Redis' own (`maxmemory` with an
  `allkeys-lru` or `volatile-lru` policy, which a cache Redis should have); the gateway only refuses
  entries over `MAX_ENTRY_BYTES`. Each call is bounded by `timeout_seconds` with redis-py's retries
  off, as for the limits store.

A store that is down, slow or erroring raises `ResponseCacheUnavailable`; the core treats any cache
failure as a miss (logged and counted), never as a failed request.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge
from switchboard.gateway.redis_connection import RedisConnection
from switchboard.v1 import common_pb2, gateway_pb2

KEY_PREFIX = "sb:gw:cache:"
KEY_VERSION = b"sb-response-cache-key/2"
MAGIC = b"SBRC"
ENTRY_VERSION = 1
# The largest entry either store takes (a GATEWAY_MAX_TOKENS_LIMIT stream of 4,096 one-token
# messages is about 100 KB); a larger answer is simply not cached.
MAX_ENTRY_BYTES = 1024 * 1024
SHARED_NAMESPACE = "shared"

REQUESTS = Counter(
    "switchboard_gateway_cache_requests_total",
    "Response cache lookups by result (when the cache is on): hit, miss, skip (not deterministic: not looked up), "
    "error (the store failed or timed out: served as a miss) and corrupt (an unreadable entry: a miss).",
    ["result"],
)
STORED = Counter("switchboard_gateway_cache_stored_total", "Answers stored in the response cache.")
STORED_BYTES = Counter("switchboard_gateway_cache_stored_bytes_total", "Bytes of the answers stored in the response cache.")
BYTES = Gauge("switchboard_gateway_cache_bytes", "Bytes held by the in-process response cache (keys and entries).")


class ResponseCacheUnavailable(Exception):
    """The cache store cannot be reached, timed out or failed; the message names it."""


class CorruptEntry(Exception):
    """A cache entry that is not a readable envelope of this version."""


@dataclass(frozen=True)
class CachedAnswer:
    """A cached stream: the expert that served it and its messages as the client received them."""

    expert: str
    messages: tuple[gateway_pb2.GenerateResponse, ...]


def is_deterministic(sampling: common_pb2.SamplingParams) -> bool:
    """Greedy (temperature set to 0) or seeded: the same request gives the same answer."""
    greedy = sampling.HasField("temperature") and sampling.temperature == 0.0
    return greedy or sampling.HasField("seed")


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def cache_key(
    namespace: str,
    expert: str,
    tokenizer_fingerprint: str,
    token_ids: Sequence[int],
    prompt: str,
    sampling: common_pb2.SamplingParams,
    revision: str = "",
) -> str:
    """The store key of a request's answer (see the module docstring for what goes in)."""
    digest = hashlib.sha256(KEY_VERSION)
    for part in (
        namespace.encode("utf-8"),
        expert.encode("utf-8"),
        revision.encode("utf-8"),
        tokenizer_fingerprint.encode("utf-8"),
        b"".join(struct.pack(">Q", i & 0xFFFFFFFFFFFFFFFF) for i in token_ids),
        prompt.encode("utf-8"),
        sampling.SerializeToString(deterministic=True),
    ):
        digest.update(_field(part))
    return KEY_PREFIX + digest.hexdigest()


def namespace_for(tenant: str, share: bool) -> str:
    """The tenant's own namespace, or the shared one (a prefix no tenant name can take: "\\0")."""
    return "\0" + SHARED_NAMESPACE if share else "tenant:" + tenant


def encode_entry(expert: str, messages: Sequence[gateway_pb2.GenerateResponse]) -> bytes:
    """The envelope of an answer (magic, version, CRC-32, expert, messages)."""
    payload = _field(expert.encode("utf-8")) + b"".join(_field(m.SerializeToString()) for m in messages)
    return MAGIC + bytes([ENTRY_VERSION]) + struct.pack(">I", zlib.crc32(payload)) + payload


def decode_entry(data: bytes) -> CachedAnswer:
    """The answer in an envelope; CorruptEntry when any check fails."""
    header = len(MAGIC) + 5
    if len(data) < header or data[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a response cache entry")
    if data[len(MAGIC)] != ENTRY_VERSION:
        raise CorruptEntry(f"entry version {data[len(MAGIC)]}, expected {ENTRY_VERSION}")
    (crc,) = struct.unpack(">I", data[len(MAGIC) + 1 : header])
    payload = data[header:]
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("checksum mismatch")
    parts: list[bytes] = []
    offset = 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise CorruptEntry("truncated length")
        (size,) = struct.unpack(">I", payload[offset : offset + 4])
        offset += 4
        if offset + size > len(payload):
            raise CorruptEntry("truncated field")
        parts.append(payload[offset : offset + size])
        offset += size
    if len(parts) < 2:
        raise CorruptEntry("no messages")
    try:
        expert = parts[0].decode("utf-8")
        messages = tuple(gateway_pb2.GenerateResponse.FromString(p) for p in parts[1:])
    except (UnicodeDecodeError, DecodeError) as error:
        raise CorruptEntry(f"unreadable: {error}") from None
    if messages[-1].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED or any(
        m.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1]
    ):
        raise CorruptEntry("the stream does not end with exactly one final message")
    return CachedAnswer(expert, messages)


class ResponseCache(Protocol):
    """Raw entries by key, with a TTL; `get` None on a miss, ResponseCacheUnavailable on a failure."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> bool:
        """Store the entry; False when refused (too large)."""
        ...

    async def close(self) -> None: ...


class MemoryResponseCache:
    """In-process entries, least recently used evicted once their bytes pass `max_bytes`; TTL on each."""

    def __init__(self, max_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1 or not ttl_seconds > 0:
            raise ValueError(f"max_bytes must be >= 1 and ttl_seconds > 0, got {max_bytes}, {ttl_seconds}")
        self.max_bytes = max_bytes
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= self._size(key, value)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            self._drop(key)
            BYTES.set(self.bytes)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> bool:
        size = self._size(key, value)
        if size > min(self.max_bytes, MAX_ENTRY_BYTES + len(key)):
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self._ttl, value)
        self.bytes += size
        now = self._clock()
        # Expired entries go first (oldest stored first), then the least recently used.
        for old in [k for k, (expires, _) in self._entries.items() if expires <= now and k != key]:
            self._drop(old)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        BYTES.set(self.bytes)
        return True

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0
        BYTES.set(0)


class RedisResponseCache:
    """Entries in Redis (`SET key value PX ttl`), shared by every gateway; Redis' maxmemory bounds them."""

    def __init__(self, url: str, ttl_seconds: float, timeout_seconds: float) -> None:
        if not ttl_seconds > 0 or not timeout_seconds > 0:
            raise ValueError(f"ttl_seconds and timeout_seconds must be > 0, got {ttl_seconds}, {timeout_seconds}")
        self._ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._connection = RedisConnection(url, timeout_seconds, "response cache", ResponseCacheUnavailable)
        self.address = self._connection.address
        self._client = self._connection.client

    def __repr__(self) -> str:
        return f"RedisResponseCache({self.address!r})"

    async def _call(self, operation: str, awaitable: Any) -> Any:
        return await self._connection.call(operation, awaitable)

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", self._client.get(key))
        return None if value is None else bytes(value)

    async def put(self, key: str, value: bytes) -> bool:
        if len(value) > MAX_ENTRY_BYTES:
            return False
        await self._call("SET", self._client.set(key, value, px=self._ttl_ms))
        return True

    async def close(self) -> None:
        await self._connection.close()


def open_response_cache(
    mode: str, *, redis_url: str, ttl_seconds: float, max_bytes: int, timeout_seconds: float
) -> ResponseCache | None:
    """The configured store (GATEWAY_CACHE: off, memory or redis); None when off."""
    if mode == "off":
        return None
    if mode == "memory":
        return MemoryResponseCache(max_bytes, ttl_seconds)
    if mode == "redis":
        if not redis_url:
            raise ValueError("GATEWAY_CACHE=redis needs REDIS_URL")
        return RedisResponseCache(redis_url, ttl_seconds, timeout_seconds)
    raise ValueError(f"GATEWAY_CACHE must be off, memory or redis, got {mode!r}")
