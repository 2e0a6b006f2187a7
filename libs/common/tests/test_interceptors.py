"""The error stage: a failed handler's status, and a call that core ended before that status went out."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc._cython.cygrpc import ExecuteBatchError
from structlog.testing import capture_logs
from switchboard.common.errors import ServiceError
from switchboard.common.interceptors import ErrorInterceptor


class Context:
    """What the error stage uses of a grpc.aio servicer context: abort (grpc raises AbortError after it)."""

    def __init__(self, ended_in_core: bool = False) -> None:
        self.ended_in_core = ended_in_core
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        if self.ended_in_core:
            # What grpc raises when the status cannot be sent: the call already ended in core.
            raise ExecuteBatchError('Failed "execute_batch"')
        self.aborted.append((code, details))
        raise grpc.aio.AbortError()


def failing(exc: Exception) -> Any:
    async def behavior(request: Any, context: Any) -> Any:
        raise exc

    return behavior


def streaming_failing(exc: Exception) -> Any:
    async def behavior(request: Any, context: Any) -> Any:
        yield "first"
        raise exc

    return behavior


DEADLINE = ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request deadline passed before a token")


async def test_a_service_error_becomes_its_status() -> None:
    context = Context()
    unary = ErrorInterceptor().wrap(failing(DEADLINE), False, "/switchboard.v1.Gateway/Complete")
    with pytest.raises(grpc.aio.AbortError):
        await unary(None, context)
    assert context.aborted == [(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE.message)]


async def test_an_unexpected_error_is_internal_and_logged_without_its_text() -> None:
    context = Context()
    unary = ErrorInterceptor().wrap(failing(KeyError("secret internals")), False, "/switchboard.v1.Gateway/Complete")
    with capture_logs() as logs, pytest.raises(grpc.aio.AbortError):
        await unary(None, context)
    ((code, details),) = context.aborted
    assert code is grpc.StatusCode.INTERNAL and "secret" not in details
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["unhandled error in handler"]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_call_that_core_already_ended_ends_as_cancelled_not_as_an_error_in_core(streaming: bool) -> None:
    # The caller's deadline passed at the moment the handler failed with its own deadline: core
    # finished the call, so the status cannot go out. grpc treats CancelledError as a cancelled
    # call (nothing to send); ExecuteBatchError it would log as an error raised in core.
    context = Context(ended_in_core=True)
    if streaming:
        stream = ErrorInterceptor().wrap(streaming_failing(DEADLINE), True, "/switchboard.v1.Gateway/Generate")
        with pytest.raises(asyncio.CancelledError, match="DEADLINE_EXCEEDED status"):
            async for _ in stream(None, context):
                pass
    else:
        unary = ErrorInterceptor().wrap(failing(DEADLINE), False, "/switchboard.v1.Gateway/Complete")
        with pytest.raises(asyncio.CancelledError, match="DEADLINE_EXCEEDED status"):
            await unary(None, context)
