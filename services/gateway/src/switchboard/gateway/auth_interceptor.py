"""The gRPC authentication interceptor: every Gateway RPC gets a `Principal` before its handler runs.

Authentication is deny-by-default: the interceptor wraps every method of every service on the
gateway's server except the infrastructure ones (health, reflection), so an RPC added later cannot
forget it. A handler reads its caller with `current_principal()`, which raises rather than return
nothing if the interceptor was somehow bypassed.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from typing import Any

import grpc
from switchboard.common.errors import unauthenticated
from switchboard.common.interceptors import Behavior, Stage, is_infrastructure
from switchboard.common.logging import get_logger
from switchboard.gateway import metrics
from switchboard.gateway.auth import Authenticator, AuthError
from switchboard.gateway.principal import Principal

log = get_logger(__name__)

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("switchboard_principal", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled."""
    principal = _PRINCIPAL.get()
    if principal is None:
        # Only reachable if a handler runs outside AuthInterceptor: fail closed.
        raise unauthenticated("request not authenticated", reason="NOT_AUTHENTICATED")
    return principal


def _reset(token: contextvars.Token[Principal | None]) -> None:
    try:
        _PRINCIPAL.reset(token)
    except ValueError:
        pass  # a stream closed from another context (its task is gone): nothing left to reset


class AuthInterceptor(Stage):
    """Resolve the caller's principal from `authorization` metadata, or refuse with UNAUTHENTICATED."""

    def __init__(self) -> None:
        self._authenticator: Authenticator | None = None

    def bind(self, authenticator: Authenticator) -> None:
        """Set the authenticator (the server is built before the tenants file is loaded)."""
        self._authenticator = authenticator

    def _resolve(self, context: grpc.aio.ServicerContext) -> Principal:
        if self._authenticator is None:
            raise AuthError("GATEWAY_STARTING", "the gateway is starting; retry")
        return self._authenticator.authenticate_metadata(context.invocation_metadata())

    def apply(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return handler if is_infrastructure(method) else super().apply(handler, method)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        resolve = self._resolve

        async def refuse(error: AuthError, context: grpc.aio.ServicerContext) -> None:
            metrics.AUTH_FAILURES.labels(error.reason).inc()
            log.warning("authentication failed", reason=error.reason, peer=context.peer())
            status = unauthenticated(error.message, reason=error.reason).to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)

        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    principal = resolve(context)
                except AuthError as error:
                    await refuse(error, context)
                    return
                token = _PRINCIPAL.set(principal)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    _reset(token)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                principal = resolve(context)
            except AuthError as error:
                await refuse(error, context)
                return None
            token = _PRINCIPAL.set(principal)
            try:
                return await behavior(request, context)
            finally:
                _reset(token)

        return unary
