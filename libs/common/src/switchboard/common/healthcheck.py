"""`python -m switchboard.common.healthcheck HOST:PORT`: exit 0 when a service is SERVING.

Container health checks (Dockerfile `HEALTHCHECK`, compose `healthcheck`) run this
instead of grpcurl or grpc_health_probe, so the images need no extra binary: it
makes one standard `grpc.health.v1.Health/Check` call and exits 0 on SERVING,
1 on any other status, 2 when the service cannot be reached in time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.common.tls import (
    TlsError,
    blocking_channel,
    certificate_identity,
    load_tls_identity,
    role_of,
)

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_UNREACHABLE = 2


def check(address: str, service: str = "", timeout: float = 2.0) -> int:
    """One Health/Check against `address`; returns the exit code (0 means SERVING).

    With SWITCHBOARD_TLS_* set (a service running mutual TLS) the probe presents the container's
    own certificate and expects the server's to be issued to the same role: it checks its own service.
    """
    try:
        tls = load_tls_identity(os.environ)
    except TlsError as exc:
        print(f"{address}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    role = role_of(certificate_identity(tls.cert_file)) if tls is not None else None
    with blocking_channel(address, tls, role) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"{address}: health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_UNREACHABLE
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{address}: {name}", file=sys.stderr)
        return EXIT_NOT_SERVING
    return EXIT_SERVING


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `ADDRESS [--service NAME] [--timeout SECONDS]`."""
    parser = argparse.ArgumentParser(prog="python -m switchboard.common.healthcheck", description=__doc__)
    parser.add_argument("address", help="host:port of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline of the Check call in seconds")
    args = parser.parse_args(argv)
    return check(args.address, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
