"""The Switchboard gateway over gRPC: `Gateway.Generate` server streaming.

Each `GenerateResponse` carrying `token_count > 0` (or text) is one chunk; the last message's
`usage` gives the prompt, completion and cached-prompt token counts. The trace's output
length is asked for exactly with `max_tokens = min_tokens = N` and `ignore_eos` (unless
disabled). A non-OK status is recorded by its code name (e.g. `UNAVAILABLE`).
"""

from __future__ import annotations

import asyncio

import grpc
from switchboard.bench.records import STATUS_OK, RequestRecord
from switchboard.bench.workload import TraceRequest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class GatewayTarget:
    """Streams requests to a Switchboard gateway."""

    def __init__(self, address: str, api_key: str, model: str = "", exact_output: bool = True,
                 temperature: float | None = None, seed: int | None = None):
        self.address = address
        self.api_key = api_key
        self.model = model
        self.exact_output = exact_output
        self.temperature = temperature
        self.seed = seed
        self.clock_zero = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._stub: gateway_pb2_grpc.GatewayStub | None = None

    def describe(self) -> dict:
        """Target facts for the results file (the key itself is never written)."""
        return {"kind": "grpc", "api": "switchboard.v1.Gateway/Generate", "address": self.address,
                "model": self.model, "exact_output": self.exact_output,
                "temperature": self.temperature, "seed": self.seed, "api_key_set": bool(self.api_key)}

    async def start(self) -> None:
        """Open the channel."""
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def build_request(self, prompt: str, request: TraceRequest) -> gateway_pb2.GenerateRequest:
        """The GenerateRequest for one trace request."""
        sampling = common_pb2.SamplingParams(max_tokens=request.output_tokens)
        if self.exact_output:
            sampling.min_tokens = request.output_tokens
            sampling.ignore_eos = True
        if self.temperature is not None:
            sampling.temperature = self.temperature
        if self.seed is not None:
            sampling.seed = self.seed
        return gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling, model=self.model,
                                           request_id=f"bench-{request.index}" if request.index >= 0
                                           else f"bench-warmup{request.index}")

    async def send(self, prompt: str, request: TraceRequest, record: RequestRecord) -> None:
        """Stream one request into `record`; cancel the call if this task is cancelled."""
        assert self._stub is not None, "start() not called"
        metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        record.mark_sent(self.clock_zero)
        call = self._stub.Generate(self.build_request(prompt, request), metadata=metadata, wait_for_ready=False)
        try:
            async for message in call:
                if message.model and not record.model:
                    record.model = message.model
                tokens = message.token_count or (1 if message.text else 0)
                if tokens:
                    record.add_chunk(self.clock_zero, tokens)
                if message.finish_reason:
                    record.finish_reason = common_pb2.FinishReason.Name(message.finish_reason)
                if message.HasField("usage"):
                    record.prompt_tokens = message.usage.prompt_tokens
                    record.output_tokens = message.usage.completion_tokens
                    record.cached_prompt_tokens = message.usage.cached_prompt_tokens
            record.finish(self.clock_zero, STATUS_OK)
        except grpc.aio.AioRpcError as exc:
            record.finish(self.clock_zero, exc.code().name, exc.details() or "")
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
