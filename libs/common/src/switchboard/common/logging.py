"""structlog JSON logging: one JSON object per line on stdout, with trace context.

Every line carries the service name, and during a request the OpenTelemetry
trace_id/span_id of the current span and the request id bound with
`bind_request`. Standard-library loggers (grpc, asyncio, ...) are routed through
the same renderer so nothing prints plain text. Prompts and outputs are never
logged by the services (only lengths and ids).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import trace
from switchboard.common.redaction import RedactingProcessor

_configured_service: str | None = None


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time of the write.

    Binding the stream at configure time would keep a reference to a stream that
    may later be replaced and closed (pytest's capture, a redirected stdout).
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def _add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the current span's trace_id and span_id (hex, as trace viewers show them)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def _add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _configured_service is not None:
        event.setdefault("service", _configured_service)
    return event


def configure_logging(service: str, level: str = "info") -> None:
    """Set up JSON logging for the process; call once, before heavy imports log anything."""
    global _configured_service
    _configured_service = service
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service,
        _add_trace_context,
        # Services log lengths and ids, not text; where an operator opts into text (GATEWAY_LOG_TEXT),
        # the text fields pass this filter (e-mail addresses, phone and card numbers, keys and tokens).
        RedactingProcessor(),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStdout()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_CurrentStdout())  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if level.lower() == "debug" else numeric)


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; `name` is added as `logger_name`.

    The logger stays a lazy proxy until first use, so module-level loggers made
    before `configure_logging` still render JSON (binding here would freeze
    structlog's default console renderer into them).
    """
    return structlog.get_logger(logger_name=name) if name else structlog.get_logger()


@contextmanager
def bind_request(request_id: str, **fields: Any) -> Iterator[None]:
    """Every log line inside carries `request_id` (and any extra fields)."""
    tokens = structlog.contextvars.bind_contextvars(request_id=request_id, **fields)
    try:
        yield
    finally:
        try:
            structlog.contextvars.reset_contextvars(**tokens)
        except ValueError:
            # A stream abandoned at its deadline is closed from another context (grpc finalizes the
            # handler's generator elsewhere); its task's context goes away with it, nothing to reset.
            pass
