"""Targets: a client per serving API that streams one request into a `RequestRecord`.

Every target implements `Target`: `start()`, `send(prompt, request, record)` and `close()`.
`send` fills the record's chunks and usage and finishes it with a status; it never raises for
a server-side failure (it records the status instead). Cancellation (the request timeout)
propagates out of `send` after the underlying call has been cancelled.
"""

from __future__ import annotations

from typing import Protocol

from switchboard.bench.records import RequestRecord
from switchboard.bench.workload import TraceRequest


class Target(Protocol):
    """A serving endpoint the bench can replay requests against."""

    clock_zero: float

    def describe(self) -> dict:
        """JSON-ready description for the results file (no secrets)."""
        ...

    async def start(self) -> None:
        """Open connections (called once before the first request)."""
        ...

    async def send(self, prompt: str, request: TraceRequest, record: RequestRecord) -> None:
        """Stream one request into `record`."""
        ...

    async def close(self) -> None:
        """Close connections."""
        ...
