"""The router's `serve()`: build the gate from the experts config and run the gRPC service."""

from __future__ import annotations

from switchboard.common.channels import open_channel
from switchboard.common.experts_config import ExpertsConfigError, load_experts_config
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.router.config import RouterSettings
from switchboard.router.gate import NgramGate
from switchboard.router.servicer import RouterServicer
from switchboard.v1 import router_pb2_grpc, scheduler_pb2_grpc

log = get_logger(__name__)


async def serve(settings: RouterSettings, service: GrpcService | None = None, handle_signals: bool = True) -> int:
    """Run the router until SIGTERM/SIGINT (or `service.stop()`); returns the process exit code.

    Tests pass their own `service` (to read its bound port) and handle_signals=False.
    """
    try:
        experts = load_experts_config(settings.experts_config)
    except ExpertsConfigError as exc:
        log.error("bad experts config", error=str(exc))
        return 2
    gate = NgramGate(
        {spec.name: spec.description or spec.name for spec in experts},
        {spec.name: spec.relative_cost for spec in experts},
        temperature=settings.gate_temperature,
    )
    channel = open_channel(settings.scheduler_addr)
    service = service or GrpcService("router", settings.server)
    servicer = RouterServicer(experts, gate, scheduler_pb2_grpc.SchedulerStub(channel), settings)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)
    log.info("router configured", experts=[spec.name for spec in experts], scheduler=settings.scheduler_addr)
    try:
        await service.run(["switchboard.v1.Router"], handle_signals=handle_signals)
    finally:
        # Closed only after the drain, so in-flight Route calls can still reach the scheduler.
        await channel.close()
    return service.exit_code
