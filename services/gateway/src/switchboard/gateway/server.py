"""The gateway's `serve()`: load the keys, connect to the router, run the gRPC service."""

from __future__ import annotations

from switchboard.common.channels import open_channel
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.gateway.auth import KeysFileError, KeyStore
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.servicer import GatewayServicer
from switchboard.v1 import gateway_pb2_grpc, router_pb2_grpc

log = get_logger(__name__)


async def serve(settings: GatewaySettings, service: GrpcService | None = None, handle_signals: bool = True) -> int:
    """Run the gateway until SIGTERM/SIGINT (or `service.stop()`); returns the process exit code.

    Tests pass their own `service` (to read its bound port) and handle_signals=False.
    """
    try:
        keys = KeyStore(settings.keys_file.expanduser())
    except KeysFileError as exc:
        log.error("bad keys file", error=str(exc))
        return 2
    router_channel = open_channel(settings.router_addr)
    service = service or GrpcService("gateway", settings.server)
    servicer = GatewayServicer(settings, keys, router_pb2_grpc.RouterStub(router_channel))
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, service.server)
    log.info("gateway configured", router=settings.router_addr, keys=len(keys), keys_file=str(keys.path))
    try:
        await service.run(["switchboard.v1.Gateway"], handle_signals=handle_signals)
    finally:
        # After the drain: in-flight streams have finished (or been cancelled) by now.
        await servicer.close()
        await router_channel.close()
    return service.exit_code
