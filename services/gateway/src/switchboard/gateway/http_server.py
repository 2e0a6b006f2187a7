"""Run an ASGI app with uvicorn inside the gateway's event loop, beside the gRPC server.

uvicorn normally owns the process (signals, logging); here the gateway's `GrpcService` owns both,
so the server is started without uvicorn's signal capture and its log config, and stopped by the
gateway's drain: it stops accepting, lets in-flight responses finish for the grace period, then
closes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

STOP_GRACE_SECONDS = 10.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the gateway handles SIGTERM/SIGINT and drains this server itself


class HttpServer:
    """One uvicorn server on host:port (port 0 picks a free one), started and stopped as a task."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        grace_seconds: float = STOP_GRACE_SECONDS,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls`: (certificate, key) files for HTTPS; None: plain HTTP."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(grace_seconds),
            server_header=False,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when configured as 0)."""
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self._server.config.port

    async def start(self) -> None:
        """Start serving; raise RuntimeError if the port cannot be bound."""
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                raise RuntimeError(f"the HTTP front cannot listen on {self._server.config.host}:{self._server.config.port}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting and finish in-flight responses (idempotent)."""
        if self._task is None:
            return
        self._server.should_exit = True
        task, self._task = self._task, None
        with contextlib.suppress(asyncio.CancelledError):
            await task
