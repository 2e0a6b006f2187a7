"""The I/O adapter of the remote backend: HTTP to an OpenAI-compatible engine server (httpx).

Only transport lives here; framing, parsing and mapping are in `core.py`. A completion streams
from `POST /v1/completions`; leaving the `stream_completion` generator early (the caller closed
it: the gRPC call was cancelled) closes the response, and with it the connection, which is how
an OpenAI-compatible server learns that the client went away and stops the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from switchboard.generator.remote.core import (
    DONE,
    CompletionChunk,
    RemoteProtocolError,
    SseDecoder,
    parse_completion_chunk,
)


class EngineUnavailable(RuntimeError):
    """The engine could not be reached, or failed, before or during a stream."""


class EngineRefused(Exception):
    """The engine answered a completion with a client error (4xx): `status` and its detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"the engine refused the request (HTTP {status}): {detail}")
        self.status = status
        self.detail = detail


class RemoteClient:
    """HTTP client of one engine server at `base_url` (e.g. http://127.0.0.1:8011)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 2.0,
        probe_timeout: float = 5.0,
        api_key: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout on streams: a long prefill sends nothing for a while; the gateway's
        # deadline cancels the call (and with it this stream) instead.
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(None, connect=connect_timeout),
            transport=transport,
        )
        self._probe_timeout = probe_timeout

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def stream_completion(self, body: dict[str, Any]) -> AsyncIterator[CompletionChunk]:
        """The chunks of one streaming completion. Raises EngineUnavailable (connection refused or
        lost, 5xx, an error event, a broken stream) and EngineRefused (4xx)."""
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    detail = (await response.aread()).decode("utf-8", "replace")[:500]
                    if 400 <= response.status_code < 500:
                        raise EngineRefused(response.status_code, detail)
                    raise EngineUnavailable(f"the engine answered HTTP {response.status_code}: {detail}")
                decoder = SseDecoder()
                async for text in response.aiter_text():
                    for data in decoder.feed(text):
                        if data.strip() == DONE:
                            return
                        yield parse_completion_chunk(data)
                for data in decoder.close():
                    if data.strip() != DONE:
                        yield parse_completion_chunk(data)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the engine connection failed: {type(exc).__name__}: {exc}") from None
        except RemoteProtocolError as exc:
            raise EngineUnavailable(f"the engine sent a broken stream: {exc}") from None

    async def get(self, path: str) -> httpx.Response | None:
        """GET `path` with the probe timeout; None when the engine cannot be reached."""
        try:
            return await self._http.get(path, timeout=self._probe_timeout)
        except httpx.HTTPError:
            return None

    async def healthy(self) -> bool:
        """`/health` answers 2xx; an engine without `/health` (404) is healthy when `/v1/models` is."""
        response = await self.get("/health")
        if response is None:
            return False
        if response.status_code == 404:
            response = await self.get("/v1/models")
            return response is not None and response.is_success
        return response.is_success

    async def metrics_text(self) -> str | None:
        """The engine's Prometheus `/metrics` text, or None when it has none (or is down)."""
        response = await self.get("/metrics")
        if response is None or not response.is_success:
            return None
        return response.text

    async def models(self) -> object | None:
        """The `/v1/models` document, or None."""
        response = await self.get("/v1/models")
        if response is None or not response.is_success:
            return None
        try:
            return response.json()
        except ValueError:
            return None
