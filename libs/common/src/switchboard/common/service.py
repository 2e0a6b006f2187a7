"""One server bootstrap for every service: grpc.aio server, health, reflection,
metrics, interceptors, graceful drain.

`GrpcService.run` binds the port, marks every named service SERVING in the
standard `grpc.health.v1` service, serves until SIGTERM/SIGINT (or `stop()`),
then drains: health goes NOT_SERVING (so load balancers and the local stack stop
sending), the `on_drain` callbacks run (e.g. deregister from the scheduler), and
`server.stop(grace)` lets in-flight calls finish within the drain period before
cancelling them. `run_service` is the `main()` of every service.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from switchboard.common.interceptors import (
    DecodeInterceptor,
    ErrorInterceptor,
    MethodBound,
    MetricsInterceptor,
    ServerPipeline,
    Stage,
)
from switchboard.common.logging import configure_logging, get_logger
from switchboard.common.rpc_tracing import ServerTracing
from switchboard.common.settings import ServerSettings, SettingsError, method_message_limits
from switchboard.common.telemetry import configure_tracing, shutdown_tracing
from switchboard.common.tls import IdentityInterceptor

log = get_logger(__name__)
S = TypeVar("S")

# The grpc.health.v1 contract lets a server cap List ("a server-defined limit (e.g., 100)") and answer
# RESOURCE_EXHAUSTED beyond it; a service here registers a handful of names, so the cap only guards
# against a future bug that registers names per request.
HEALTH_LIST_LIMIT = 100


class HealthServicer(health.aio.HealthServicer):
    """The reference `grpc.health.v1` servicer plus `List`, which the reference leaves unimplemented.

    `List` answers every service whose status was set (the overall server "" included) with its
    current status, as grpc-health-checking's proto defines it; statuses are read from the same map
    that `Check` and `Watch` read, so the three never disagree.
    """

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """All known services and their statuses; RESOURCE_EXHAUSTED over HEALTH_LIST_LIMIT."""
        statuses = dict(self._server_status)
        if len(statuses) > HEALTH_LIST_LIMIT:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {HEALTH_LIST_LIMIT} services registered; use Check per service",
            )
        reply = health_pb2.HealthListResponse()
        for service_name, status in statuses.items():
            reply.statuses[service_name].status = status
        return reply


def method_bounds(settings: ServerSettings) -> dict[str, MethodBound]:
    """The per-method request bounds of one server ("Service/Method" -> bound), naming their setting."""
    setting = f"{settings.env_prefix}_MAX_METHOD_MESSAGE_BYTES" if settings.env_prefix else "MAX_METHOD_MESSAGE_BYTES"
    return {method: MethodBound(method, limit, setting) for method, limit in method_message_limits(settings).items()}


def check_method_bounds(bounds: Mapping[str, MethodBound], service_names: Sequence[str]) -> None:
    """Fail fast (SettingsError naming the setting) on a bound for a method this server does not serve.

    A mistyped method name would otherwise leave the method bounded only by the server-wide limit,
    silently. Services whose descriptors are not in the default pool (tests' generic handlers) are
    matched by name only.
    """
    served: dict[str, set[str] | None] = {}
    for full_name in (*service_names, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        try:
            methods: set[str] | None = {m.name for m in descriptor_pool.Default().FindServiceByName(full_name).methods}
        except KeyError:
            methods = None
        served[full_name.rpartition(".")[2]] = methods
    for key, bound in bounds.items():
        service, _, method = key.partition("/")
        if service not in served or (served[service] is not None and method not in served[service]):
            raise SettingsError(
                f"{bound.setting}: {key} is not a method this server serves (its services: {', '.join(sorted(served))})"
            )


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    """The grpc server options of one service: its limits and keepalive enforcement, from its settings.

    gRPC applies these before any handler or interceptor that reads the request runs: a message
    over max_receive_message_bytes or metadata over max_metadata_bytes is refused (RESOURCE_EXHAUSTED)
    without reaching a handler, auth included. Keepalive: the server pings every
    keepalive_time_seconds (a stream may idle while a long prompt is prefilled; pings keep NATs and
    proxies from dropping it); a client pinging more often than min_client_ping_interval_seconds
    collects strikes, and after max_ping_strikes the connection is closed.
    """
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(settings.min_client_ping_interval_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        ("grpc.so_reuseport", 0),
    ]


class GrpcService:
    """A grpc.aio server with the shared interceptors, health, reflection and drain."""

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        extra_interceptors: Sequence[Stage] = (),
        identity_policy: Mapping[str, frozenset[str]] | None = None,
        public: bool = False,
        public_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """`identity_policy` (method -> roles) applies when the server runs mutual TLS (settings.tls).
        A `public` server (the gateway) never asks for client certificates: it serves TLS with
        `public_credentials`, or plaintext without; settings.tls is then only its identity as a client."""
        self.name = name
        self.settings = settings
        self.extra_interceptors = tuple(extra_interceptors)
        self._credentials: grpc.ServerCredentials | None = public_credentials
        self.method_bounds = method_bounds(settings)
        identity: list[Stage] = []
        if not public and settings.tls is not None:
            if identity_policy is None:
                # Fail closed: mutual TLS without a policy would let any certified service call anything.
                raise ValueError(f"{name}: a server with mutual TLS needs its identity policy")
            self._credentials = settings.tls.server_credentials()
            identity.append(IdentityInterceptor(identity_policy))
        pipeline = ServerPipeline(
            [
                ServerTracing(),
                MetricsInterceptor(name),
                DecodeInterceptor(self.method_bounds),
                *identity,
                *extra_interceptors,
                ErrorInterceptor(),
            ]
        )
        self.server = grpc.aio.server(interceptors=[pipeline], options=server_options(settings))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.started = asyncio.Event()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._drain_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._service_names: list[str] = []

    def on_drain(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` when draining starts (after NOT_SERVING, before the server stops)."""
        self._drain_callbacks.append(callback)

    def stop(self, exit_code: int = 0) -> None:
        """Begin the drain; `exit_code` != 0 marks a fatal stop (the process exits with it)."""
        self.exit_code = self.exit_code or exit_code
        self._stop.set()

    async def _set_health(self, status: int) -> None:
        for service_name in ["", *self._service_names]:
            await self.health.set(service_name, status)

    async def run(self, service_names: Sequence[str], handle_signals: bool = True) -> None:
        """Serve `service_names` (full names, e.g. 'switchboard.v1.Router') until stopped, then drain."""
        self._service_names = list(service_names)
        check_method_bounds(self.method_bounds, service_names)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        if self._credentials is not None:
            self.port = self.server.add_secure_port(address, self._credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"{self.name}: cannot listen on {address} (port in use?)")
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.settings.host)
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
        log.info(
            "serving", address=f"{self.settings.host}:{self.port}", metrics_port=self.settings.metrics_port, services=list(service_names)
        )
        self.started.set()
        await self._stop.wait()
        await self._drain()

    async def _drain(self) -> None:
        grace = self.settings.drain_seconds
        log.info("draining", grace_seconds=grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for callback in self._drain_callbacks:
            try:
                await asyncio.wait_for(callback(), timeout=max(grace, 1.0))
            except Exception as exc:
                log.warning("drain callback failed", error=repr(exc))
        await self.server.stop(grace)
        log.info("stopped")

    async def aclose(self) -> None:
        """Stop and wait until the server has drained (for tests that run it as a task)."""
        self.stop()
        await self.server.wait_for_termination()


async def wait_started(task: asyncio.Task[Any], started: asyncio.Event) -> None:
    """Wait until a server run as `task` sets `started` (it is serving), or raise why it stopped first.

    For tests and benchmarks that run a service in-process: a startup error surfaces here instead
    of as a hang.
    """
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        raise RuntimeError(f"server exited during startup with {task.result()}")


def run_service(
    name: str, load: Callable[[], S], serve: Callable[[S], Awaitable[int | None]]
) -> None:
    """The main() of a service: settings, logging, tracing, then `serve` until drained.

    A settings error prints one line naming the variable and exits 2; `serve`
    returns the exit code (non-zero after a fatal error, so an orchestrator
    restarts the process).
    """
    try:
        settings = load()
    except SettingsError as exc:
        print(f"switchboard-{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    server_settings = getattr(settings, "server", None)
    configure_logging(name, server_settings.log_level if server_settings else "info")
    configure_tracing(name)
    code = 0
    try:
        code = asyncio.run(serve(settings)) or 0
    except KeyboardInterrupt:
        code = 0
    except SettingsError as exc:
        # A setting checked only once the server knows what it serves (a per-method bound's method).
        print(f"switchboard-{name}: configuration error: {exc}", file=sys.stderr)
        code = 2
    finally:
        shutdown_tracing()
    sys.exit(code)
