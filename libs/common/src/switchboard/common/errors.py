"""Canonical gRPC errors with rich details (google.rpc BadRequest, RetryInfo, ErrorInfo).

Servicer code raises `ServiceError` (usually through the helpers below); the
`ErrorInterceptor` that every service installs turns it into a status whose
message says what to fix and whose trailing metadata carries the details.
Clients read them back with `error_details`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "switchboard.dev"
# ErrorInfo reason of a generator's RESOURCE_EXHAUSTED when its waiting queue is at its bound: the
# replica is busy, the request is fine (the gateway fails over to the next candidate on it).
REPLICA_QUEUE_FULL = "REPLICA_QUEUE_FULL"
# ErrorInfo reason of a generator's INTERNAL when its engine traced a failed step to this request
# and took it out of the batch (the replica serves on): the request is the problem, so another
# replica would fail the same way (the gateway does not fail over on it).
REQUEST_FAILED_IN_ENGINE = "REQUEST_FAILED_IN_ENGINE"
# ErrorInfo reason of a generator's UNAVAILABLE refused by its fault injection
# (GENERATOR_FAULT_ERROR_RATIO, for rollback and failover drills): the gateway fails over on it.
INJECTED_FAULT = "INJECTED_FAULT"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class ServiceError(Exception):
    """An error with a canonical status code, a message for the caller and rich details."""

    code: grpc.StatusCode
    message: str
    field_violations: Sequence[tuple[str, str]] = ()
    retry_after_seconds: float | None = None
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # google.rpc.QuotaFailure violations: (subject, description), e.g. ("tenant:acme", "tokens_per_second: ...").
    quota_violations: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self) -> grpc.Status:
        """The grpc.Status (code, message, details in trailing metadata) to abort with."""
        details: list[Any] = []
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        if self.quota_violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                        for subject, description in self.quota_violations
                    ]
                )
            )
        if self.retry_after_seconds is not None:
            seconds = max(self.retry_after_seconds, 0.0)
            whole = math.floor(seconds)
            delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.reason:
            details.append(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata))
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return rpc_status.to_status(status)


def invalid_argument(field_name: str, description: str) -> ServiceError:
    """INVALID_ARGUMENT naming the field, e.g. ('sampling.max_tokens', 'must be at least 1, got -3')."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {description}", field_violations=[(field_name, description)]
    )


def unauthenticated(message: str, reason: str = "UNAUTHENTICATED") -> ServiceError:
    """UNAUTHENTICATED with an ErrorInfo reason."""
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason=reason)


def unavailable(message: str, retry_after_seconds: float | None = 1.0, reason: str | None = None) -> ServiceError:
    """UNAVAILABLE with RetryInfo telling the client when to try again."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, retry_after_seconds=retry_after_seconds, reason=reason)


def not_found(message: str, reason: str | None = None) -> ServiceError:
    """NOT_FOUND."""
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, reason=reason)


def already_exists(message: str, reason: str | None = None, retry_after_seconds: float | None = None) -> ServiceError:
    """ALREADY_EXISTS: the thing the call would create is there already (the message says whose)."""
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, retry_after_seconds=retry_after_seconds, reason=reason)


def failed_precondition(message: str, reason: str | None = None) -> ServiceError:
    """FAILED_PRECONDITION."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason=reason)


def resource_exhausted(
    message: str,
    retry_after_seconds: float | None = None,
    reason: str | None = None,
    quota_violations: Sequence[tuple[str, str]] = (),
    metadata: dict[str, str] | None = None,
) -> ServiceError:
    """RESOURCE_EXHAUSTED (quotas, rate limits, a full queue); QuotaFailure names the spent limit."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        retry_after_seconds=retry_after_seconds,
        reason=reason,
        quota_violations=quota_violations,
        metadata=metadata or {},
    )


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """Code, message and decoded rich details of an RPC error (sync or aio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    info: dict[str, Any] = {
        "code": code,
        "message": error.details() if hasattr(error, "details") else str(error),
        "field_violations": [],
        "retry_after": None,
        "reason": None,
        "quota_violations": [],
        "metadata": {},
    }
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                info["field_violations"] += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                info["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                info["reason"] = error_info.reason
                info["metadata"] = dict(error_info.metadata)
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                info["quota_violations"] += [(v.subject, v.description) for v in quota.violations]
    return info
