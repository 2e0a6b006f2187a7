"""`RemoteEngine`: the engine API the servicer and registrar use, served by a remote engine server.

It loads no model (and no torch). `generate` streams one completion from the engine per request
(`RemoteClient.stream_completion`) and turns its chunks into `EngineOutput`s; closing the
generator (the gRPC call was cancelled) closes the HTTP stream, so the engine stops the request.
A poller reads the engine's health (`/health`, else `/v1/models`) and `/metrics` every
`poll_seconds`: `load()` is vLLM's running/waiting requests and KV-cache use when the engine
exports them, else this replica's own in-flight count; while the engine is unhealthy new
requests fail at once with EngineUnavailable (the servicer answers UNAVAILABLE, the gateway
fails over) and `on_health` is told, so the replica's gRPC health follows the engine's.

The engine's flavour (`RemoteConfig.engine`, GENERATOR_REMOTE_ENGINE) decides which sampling fields
beyond OpenAI's are sent: vLLM's `top_k`, `repetition_penalty`, `min_tokens` and `ignore_eos`, or,
for a plain OpenAI-compatible engine, none, a request that sets one being refused
(RequestRejected: INVALID_ARGUMENT naming `sampling.<field>`) rather than served without it. With
"auto" the flavour is read from the engine's /metrics at each poll (vLLM's `vllm:` metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from switchboard.common.logging import get_logger
from switchboard.generator.engine.types import (
    EngineInfo,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    QueueFull,
    RequestRejected,
    Usage,
)
from switchboard.generator.remote.client import EngineRefused, EngineUnavailable, RemoteClient
from switchboard.generator.remote.core import (
    AUTO,
    OPENAI,
    UnsupportedSampling,
    completion_body,
    flavour_from_metrics,
    in_flight_load,
    load_from_metrics,
    max_model_len_from_models,
    parse_prometheus,
    sampling_extras,
)

log = get_logger(__name__)

# Without a local tokenizer the replica cannot check upstream ids against a vocabulary; the
# engine checks them.
UNKNOWN_VOCAB = 1 << 32
UNHEALTHY_AFTER_FAILED_PROBES = 2
REJECTED_STATUSES = (400, 404, 413, 422)
BUSY_STATUSES = (429,)


@dataclass(frozen=True)
class RemoteConfig:
    """What the remote engine needs from the settings."""

    url: str
    model: str
    max_model_len: int = 0  # 0: ask /v1/models, else use `fallback_max_model_len`
    fallback_max_model_len: int = 0  # the model folder's config.json, when there is one
    token_ids: bool = False  # send prompt ids and ask for `return_token_ids` (vLLM)
    # Flavour (core.FLAVOURS): the sampling fields beyond OpenAI's it honours; auto: from /metrics.
    engine: str = AUTO
    poll_seconds: float = 1.0
    # How long start() waits for the engine to answer healthy before serving anyway (failing over).
    start_wait_seconds: float = 10.0
    max_waiting: int = 256


@dataclass(frozen=True)
class _Fingerprint:
    fingerprint: str


class RemoteEngine:
    """Duck-types `switchboard.generator.engine.Engine` for the servicer, app and registrar."""

    kv_events = None  # the remote engine's prefix cache is not reported
    hash_seed = 0
    failed: BaseException | None = None  # an unreachable engine is not fatal: requests fail over

    def __init__(
        self,
        config: RemoteConfig,
        client: RemoteClient | None = None,
        tokenizer_fingerprint: str = "",
    ) -> None:
        self.remote = config
        self.config = config  # `config.max_waiting` is announced to the scheduler
        self.client = client or RemoteClient(config.url)
        self.tokenizer = _Fingerprint(tokenizer_fingerprint)
        self.vocab_size = UNKNOWN_VOCAB
        self.max_model_len = config.max_model_len
        self.healthy = False
        self.metrics_load: EngineLoad | None = None
        self.in_flight = 0
        self.on_health: Callable[[bool], None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._failed_probes = 0
        # Until /metrics shows vLLM's, an "auto" engine is sent OpenAI's fields only.
        self.flavour = OPENAI if config.engine == AUTO else config.engine

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.remote.model,
            architecture="remote",
            device=f"remote:{self.remote.url}",
            dtype="",
            max_model_len=self.max_model_len,
            vocab_size=0,
            block_size=0,
            kv_blocks_total=0,
            parameter_count=0,
            quantization="",
        )

    def load(self) -> EngineLoad:
        """The engine's own load (vLLM gauges) when it exports it, else this replica's in-flight count."""
        return self.metrics_load or in_flight_load(self.in_flight)

    async def start(self) -> None:
        """Probe the engine once (health, context length, metrics), then keep polling."""
        if not self.max_model_len:
            stated = max_model_len_from_models(await self.client.models(), self.remote.model)
            self.max_model_len = stated or self.remote.fallback_max_model_len
        deadline = time.monotonic() + self.remote.start_wait_seconds
        await self.poll()
        while not self.healthy and time.monotonic() < deadline:
            await asyncio.sleep(min(self.remote.poll_seconds, 0.5))
            await self.poll()
        if not self.healthy:
            log.warning(
                "the remote engine is not healthy yet; requests fail over until it is", url=self.remote.url
            )
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.client.aclose()

    async def poll(self) -> None:
        """One health and metrics read."""
        answered = await self.client.healthy()
        text = await self.client.metrics_text() if answered else None
        samples = parse_prometheus(text) if text else {}
        self.metrics_load = load_from_metrics(samples) if samples else None
        if text is not None:
            self._set_flavour(flavour_from_metrics(samples))
        # One slow or failed probe on a busy host does not take a healthy engine out: two in a row do.
        self._failed_probes = 0 if answered else self._failed_probes + 1
        healthy = answered or (self.healthy and self._failed_probes < UNHEALTHY_AFTER_FAILED_PROBES)
        if healthy != self.healthy:
            self.healthy = healthy
            log.info("remote engine health changed", healthy=healthy, url=self.remote.url)
            if self.on_health is not None:
                self.on_health(healthy)

    def _set_flavour(self, flavour: str) -> None:
        """The flavour an "auto" engine's latest /metrics answer shows (none, or a failed read, keeps
        the last; an engine without /metrics stays "openai")."""
        if self.remote.engine != AUTO or flavour == self.flavour:
            return
        log.info("remote engine flavour detected", flavour=flavour, url=self.remote.url)
        self.flavour = flavour

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.remote.poll_seconds)
            try:
                await self.poll()
            except Exception as exc:  # never let the poller die
                log.warning("remote engine poll failed", error=repr(exc))

    def _body(self, request: EngineRequest) -> dict[str, object]:
        sampling = request.sampling
        if request.prompt_token_ids is not None and self.remote.token_ids:
            prompt: str | list[int] = request.prompt_token_ids
        elif request.prompt:
            prompt = request.prompt
        else:
            raise RequestRejected(
                "prompt",
                "this replica fronts an engine that takes prompt text only; send the prompt text",
            )
        try:
            extras = sampling_extras(sampling, self.flavour)
        except UnsupportedSampling as exc:
            raise RequestRejected(f"sampling.{exc.field}", str(exc)) from None
        return completion_body(
            self.remote.model,
            prompt,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=sampling.stop,
            return_token_ids=self.remote.token_ids,
            extras=extras,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream one completion from the engine (see the module docstring for errors)."""
        if not self.healthy:
            raise EngineUnavailable(f"the remote engine at {self.remote.url} is not healthy")
        body = self._body(request)
        self.in_flight += 1
        usage: Usage | None = None
        finish: str | None = None
        streamed = 0
        first = True
        try:
            stream = self.client.stream_completion(body)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    finish = chunk.finish_reason or finish
                    if not chunk.text and not chunk.token_ids:
                        continue
                    streamed += len(chunk.token_ids)
                    yield EngineOutput(
                        request.request_id,
                        chunk.text,
                        chunk.token_ids,
                        first_scheduled_ns=time.time_ns() if first else None,
                    )
                    first = False
        except EngineRefused as exc:
            if exc.status in BUSY_STATUSES and first:
                raise QueueFull(self.in_flight, self.config.max_waiting) from None
            if exc.status in REJECTED_STATUSES and first:
                raise RequestRejected("prompt", str(exc)) from None
            raise EngineUnavailable(str(exc)) from None
        finally:
            self.in_flight -= 1
        if finish is None:
            raise EngineUnavailable("the engine ended the stream without a finish reason")
        if usage is None:
            usage = Usage(prompt_tokens=0, completion_tokens=streamed, cached_prompt_tokens=0)
        yield EngineOutput(request.request_id, "", [], finish_reason=finish, usage=usage)
