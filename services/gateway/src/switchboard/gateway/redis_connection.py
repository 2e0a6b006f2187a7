"""One fail-fast Redis connection for the gateway's shared state (limits, the response cache).

Both stores want the same thing from Redis: every operation bounded by one timeout (connect and
reply), redis-py's own retries off (a store that is down should cost a request one timeout, not
several; the caller decides what to do about it), and every failure turned into the caller's own
exception with a message naming the store's address without credentials.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError


def redis_address(url: str) -> str:
    """The store's address for messages and logs: the URL without credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisConnection:
    """A Redis client whose calls each finish within `timeout_seconds` or raise `error` naming `what`."""

    def __init__(
        self, url: str, timeout_seconds: float, what: str, error: type[Exception], decode_responses: bool = False
    ) -> None:
        self.address = redis_address(url)
        self._timeout = timeout_seconds
        self._what = what
        self._error = error
        self.client = redis_asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=decode_responses,
        )

    async def call(self, operation: str, awaitable: Any) -> Any:
        """Await a Redis command, turning every failure into the caller's exception."""
        name = f"{self._what} {self.address}"
        try:
            # The socket timeouts bound each connect and read; this bounds the whole operation
            # (a connect followed by a slow reply, or a NOSCRIPT reload, is still one timeout).
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except (TimeoutError, RedisTimeoutError):
            raise self._error(f"{name} did not answer {operation} within {self._timeout:g} s") from None
        except (RedisConnectionError, OSError) as error:
            raise self._error(f"{name} unreachable ({operation}): {error}") from None
        except RedisError as error:
            raise self._error(f"{name} failed {operation}: {type(error).__name__}: {error}") from None

    async def close(self) -> None:
        """Close the connection; closing one to a store that is gone is not worth an error."""
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass
