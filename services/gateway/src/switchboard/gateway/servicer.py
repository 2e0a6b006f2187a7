"""The Gateway gRPC service: a thin adapter over `GatewayCore`.

The caller's principal was resolved by `AuthInterceptor` before any method here runs; each method
turns the gRPC deadline into the core's and the core's messages into the RPC's responses. Errors
are `ServiceError`s that the shared ErrorInterceptor turns into statuses with rich details.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from switchboard.gateway.auth_interceptor import current_principal
from switchboard.gateway.core import GatewayCore
from switchboard.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate, Complete, ListModels and Usage over the core."""

    def __init__(self, core: GatewayCore, default_timeout_seconds: float) -> None:
        self._core = core
        self._default_timeout = default_timeout_seconds

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """The request's deadline on time.monotonic(): the client's, else the configured default."""
        remaining = context.time_remaining()
        return time.monotonic() + (self._default_timeout if remaining is None else remaining)

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream the completion of a prompt."""
        async for message in self._core.generate(current_principal(), request, self._deadline(context)):
            yield message

    async def Complete(
        self, request: gateway_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CompleteResponse:
        """The whole completion in one response."""
        reply = gateway_pb2.CompleteResponse()
        parts: list[str] = []
        async for message in self._core.generate(current_principal(), request, self._deadline(context)):
            parts.append(message.text)
            reply.request_id = message.request_id
            if message.model:
                reply.model = message.model
            if message.finish_reason:
                reply.finish_reason = message.finish_reason
                reply.usage.CopyFrom(message.usage)
        reply.text = "".join(parts)
        return reply

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        """The expert pools the caller may use, with their ready replica counts."""
        return await self._core.list_models(current_principal())

    async def Usage(self, request: gateway_pb2.UsageRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.UsageResponse:
        """Token usage by tenant and expert (another tenant's needs the admin scope)."""
        return await self._core.usage(current_principal(), request.tenant)
