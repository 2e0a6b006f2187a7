"""OpenAI-compatible HTTP servers: `/v1/completions` and `/v1/chat/completions` with SSE.

`parse_sse` turns a stream of lines into events per the Server-Sent Events spec (data lines
joined until a blank line; `[DONE]` ends the stream). Each event whose choice carries text is
one chunk of one token (the API does not say how many tokens a chunk holds); the `usage`
object, when the server sends it, replaces the counted output tokens. Exact output lengths
are asked for in the dialect the server understands: `vllm` (`min_tokens`, `ignore_eos`),
`transformers` (a `generation_config` without an EOS id and `min_new_tokens`), or `none`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
from switchboard.bench.records import STATUS_OK, RequestRecord
from switchboard.bench.workload import TraceRequest

DONE = "[DONE]"
EXACT_OUTPUT_DIALECTS = ("none", "vllm", "transformers")


class SSEProtocolError(ValueError):
    """The server sent something that is not a valid completion stream."""


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield the data of each SSE event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def chunk_text(event: dict, chat: bool) -> str:
    """The text an event adds (completions: choices[0].text; chat: choices[0].delta.content)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class OpenAITarget:
    """Streams requests to an OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str, chat: bool = False, api_key: str = "",
                 exact_output: str = "none", temperature: float | None = None, seed: int | None = None,
                 connect_timeout_s: float = 5.0):
        if exact_output not in EXACT_OUTPUT_DIALECTS:
            raise ValueError(f"exact_output must be one of {EXACT_OUTPUT_DIALECTS}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.chat = chat
        self.api_key = api_key
        self.exact_output = exact_output
        self.temperature = temperature
        self.seed = seed
        self.connect_timeout_s = connect_timeout_s
        self.clock_zero = 0.0
        self._client: httpx.AsyncClient | None = None

    @property
    def path(self) -> str:
        """The endpoint path."""
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def describe(self) -> dict:
        """Target facts for the results file (no key)."""
        return {"kind": "openai", "api": self.path, "base_url": self.base_url, "model": self.model,
                "exact_output": self.exact_output, "temperature": self.temperature, "seed": self.seed,
                "api_key_set": bool(self.api_key)}

    async def start(self) -> None:
        """Open the HTTP client (no read timeout: the runner's per-request timeout bounds reads)."""
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(None, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def build_body(self, prompt: str, request: TraceRequest) -> dict:
        """The JSON body for one trace request."""
        body: dict = {"model": self.model, "max_tokens": request.output_tokens, "stream": True}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.seed is not None:
            body["seed"] = self.seed
        if self.exact_output == "vllm":
            body.update(min_tokens=request.output_tokens, ignore_eos=True,
                        stream_options={"include_usage": True})
        elif self.exact_output == "transformers":
            # A fresh GenerationConfig has no eos_token_id, so generation runs to max_new_tokens.
            config: dict = {"max_new_tokens": request.output_tokens, "min_new_tokens": request.output_tokens}
            if self.temperature is not None:
                config.update(do_sample=self.temperature > 0, temperature=self.temperature or 1.0)
            body["generation_config"] = json.dumps(config)
        return body

    async def send(self, prompt: str, request: TraceRequest, record: RequestRecord) -> None:
        """Stream one request into `record`."""
        assert self._client is not None, "start() not called"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        record.mark_sent(self.clock_zero)
        try:
            async with self._client.stream("POST", self.path, json=self.build_body(prompt, request),
                                           headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:300].decode(errors="replace")
                    record.finish(self.clock_zero, f"http_{response.status_code}", detail)
                    return
                await self._consume(parse_sse(response.aiter_lines()), record)
        except httpx.ConnectError as exc:
            record.finish(self.clock_zero, "connect_error", str(exc) or type(exc).__name__)
        except (httpx.HTTPError, SSEProtocolError) as exc:
            record.finish(self.clock_zero, "protocol_error", f"{type(exc).__name__}: {exc}")

    async def _consume(self, events: AsyncIterator[str], record: RequestRecord) -> None:
        """Read events into the record until [DONE] or the end of the stream."""
        async for data in events:
            if data.strip() == DONE:
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise SSEProtocolError(f"event is not JSON: {data[:120]!r}") from None
            if not isinstance(event, dict):
                raise SSEProtocolError(f"event is not an object: {data[:120]!r}")
            if "error" in event:
                error = event["error"]
                message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
                record.finish(self.clock_zero, "stream_error", message)
                return
            if not record.model and isinstance(event.get("model"), str):
                record.model = event["model"]
            if chunk_text(event, self.chat):
                record.add_chunk(self.clock_zero, 1)
            for choice in event.get("choices") or []:
                if choice.get("finish_reason"):
                    record.finish_reason = str(choice["finish_reason"])
            usage = event.get("usage")
            if isinstance(usage, dict):
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = int(usage.get("completion_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                if isinstance(details, dict) and details.get("cached_tokens") is not None:
                    record.cached_prompt_tokens = int(details["cached_tokens"])
        record.finish(self.clock_zero, STATUS_OK)

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
