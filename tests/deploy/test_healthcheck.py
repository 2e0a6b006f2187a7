"""The image health check (`python -m switchboard.common.healthcheck`) against a real gRPC server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from grpc_health.v1 import health_pb2
from switchboard.cli.processes import free_port
from switchboard.common import healthcheck
from switchboard.common.service import GrpcService
from switchboard.common.settings import ServerSettings


async def test_exit_codes_follow_the_health_service() -> None:
    service = GrpcService("probe-target", ServerSettings(port=0, metrics_port=0))
    task = asyncio.create_task(service.run(["switchboard.v1.Router"], handle_signals=False))
    await service.started.wait()
    address = f"127.0.0.1:{service.port}"
    try:
        assert await asyncio.to_thread(healthcheck.main, [address]) == healthcheck.EXIT_SERVING
        assert await asyncio.to_thread(healthcheck.main, [address, "--service", "switchboard.v1.Router"]) == 0
        await service.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await asyncio.to_thread(healthcheck.main, [address]) == healthcheck.EXIT_NOT_SERVING
        # The exact command of the Dockerfiles' HEALTHCHECK, as a process.
        probe = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "switchboard.common.healthcheck", address], capture_output=True, text=True
        )
        assert probe.returncode == 1 and "NOT_SERVING" in probe.stderr
    finally:
        await service.aclose()
        await task


def test_unreachable_server_exits_2() -> None:
    code = healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"])
    assert code == healthcheck.EXIT_UNREACHABLE
